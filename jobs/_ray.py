"""Ray session, logging and progress helpers shared by the jobs (DESIGN.md §5, §6).

`RAY_ADDRESS` set: connect to that cluster. Unset: start a local Ray for the run. A Ray that is
already initialised (tests, notebooks) is reused and left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ray

log = logging.getLogger("jobs")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def setup_logging(level: str = "INFO") -> None:
    """Timestamped log lines on stderr for the `jobs` and `patchcore_core` loggers."""
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"log level must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Connect to `RAY_ADDRESS` or start a local Ray; shut down on exit only what was started here."""
    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        # Token-auth clusters read ~/.ray/auth_token (or RAY_AUTH_TOKEN) themselves.
        ray.init(address=address)
        log.info("connected to Ray cluster at %s", address)
    else:
        ray.init(include_dashboard=False)
        log.info("no RAY_ADDRESS: started a local Ray with %s", ray.cluster_resources())
    try:
        yield
    finally:
        ray.shutdown()


def on_remote_cluster() -> bool:
    """Whether jobs run on the cluster at `RAY_ADDRESS`, whose autoscaler may add nodes, rather
    than on a local Ray whose resources are fixed for the run."""
    return bool(os.environ.get("RAY_ADDRESS", "").strip())


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let this process reuse the memory it frees, up to `limit_bytes` (glibc); True if set.

    glibc serves allocations above a threshold (128 KiB, rising to at most 32 MiB) with fresh
    pages from the kernel and unmaps them when freed, so a model actor that allocates the same
    activations for every batch page-faults them all in again: on CPU up to 40% of a
    wide_resnet50_2 forward at batch 32. With the threshold and the heap-trim limit raised, freed
    activations stay in the heap for the next batch; the process keeps its peak memory, which
    every batch needs anyway. Not glibc (macOS, musl): nothing changes, False.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes)
                and libc.mallopt(_M_TRIM_THRESHOLD, limit_bytes))


def cluster_gpus() -> int:
    """Number of GPUs the connected Ray cluster advertises."""
    return int(ray.cluster_resources().get("GPU", 0))


def get_all(refs: Sequence[ray.ObjectRef]) -> list[Any]:
    """`ray.get` of every ref, raising the first failure as soon as it happens.

    Plain `ray.get(refs)` waits on refs in order, so a task stuck in a collective whose peer
    died would hide the peer's error until a timeout.
    """
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)  # raises the task's or actor's error now
    return ray.get(list(refs))


class Progress:
    """Logs `label: done/total (rate/s, ETA)` at most every `interval_s` seconds."""

    def __init__(self, label: str, total: int, *, done: int = 0, interval_s: float = 10.0) -> None:
        self.label = label
        self.total = total
        self.interval_s = interval_s
        self._start_done = done
        self._start_time = time.monotonic()
        self._last_log = -math.inf

    def update(self, done: int, *, force: bool = False) -> None:
        """Report that `done` of `total` units are finished."""
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
