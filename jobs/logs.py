"""Log lines of the jobs: one format on stderr, and progress with rate and ETA for long work.

Owns: `setup_logging` (called once by each job's `main`) and `Progress`. Must not: decide what a
job logs, or log secrets (configs are logged through `config.config_json`, which redacts them).
"""

from __future__ import annotations

import logging
import math
import time

log = logging.getLogger("jobs")


def setup_logging(level: str = "INFO") -> None:
    """Timestamped log lines on stderr for the `jobs` and `patchcore_core` loggers.

    ValueError for a level other than DEBUG, INFO, WARNING or ERROR (any case). Through
    `logging.basicConfig`: a no-op when the root logger already has a handler (pytest, a host app).
    """
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"log level must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


class Progress:
    """Logs `label: done/total (rate/s, ETA)` at most every `interval_s` seconds.

    done: units already finished when this run started (e.g. resumed shards); they count towards
    done/total but not towards the rate, so the ETA reflects this run's speed.
    """

    def __init__(self, label: str, total: int, *, done: int = 0, interval_s: float = 10.0) -> None:
        self.label = label
        self.total = total
        self.interval_s = interval_s
        self._start_done = done
        self._start_time = time.monotonic()
        self._last_log = -math.inf

    def update(self, done: int, *, force: bool = False) -> None:
        """Report that `done` of `total` units are finished; `force` logs within the interval too."""
        now = time.monotonic()
        if not force and now - self._last_log < self.interval_s:
            return
        self._last_log = now
        elapsed = now - self._start_time
        rate = (done - self._start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else math.inf
        log.info(
            "%s: %d/%d (%.1f%%, %.1f/s, ETA %s)",
            self.label, done, self.total, 100.0 * done / max(1, self.total), rate, _duration(eta),
        )


def _duration(seconds: float) -> str:
    """12s, 3m04s, 2h05m; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
