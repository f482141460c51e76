"""Peak memory and CPU time of a process and all its descendants (Ray raylet, workers), from /proc.

Used by the benchmarks only (Linux). A thread samples every `interval_s`; Ray workers are
descendants of the raylet, which the driver started, so one tree covers a whole local job.
"""

from __future__ import annotations

import bisect
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20


def _children_map() -> dict[int, list[int]]:
    """ppid -> pids of every process on the machine."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    return children


def descendants(root: int) -> list[int]:
    """root and every process below it."""
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _read(pid: int) -> tuple[str, int, int, int, float] | None:
    """(role, rss, pss, anonymous rss (bytes), cpu seconds) of one process; None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        pss = rss = anon = 0
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith(b"Anonymous:"):  # private heap, not shared memory (object store)
                    anon = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    role = "worker" if cmd.startswith("ray::") else "ray" if ("ray" in cmd or "raylet" in cmd) else "other"
    return role, rss, pss, anon, cpu


@dataclass
class TreeStats:
    """Peaks over the samples. rss_*: largest single process of that role; pss_total: the
    largest sum of PSS over the whole tree at one instant (shared pages counted once)."""

    samples: int = 0
    driver_rss: int = 0
    worker_rss: int = 0  # ray:: processes (tasks and actors)
    ray_rss: int = 0  # raylet, gcs, dashboard agents
    driver_anon: int = 0  # anonymous (private heap) part of the driver's RSS
    worker_anon: int = 0  # ... of the largest Ray worker's
    pss_total: int = 0
    worker_pss_total: int = 0
    cpu_s: dict[int, float] = field(default_factory=dict)  # last seen cumulative CPU per pid
    roles: dict[int, str] = field(default_factory=dict)  # pid -> driver | worker | ray | other
    # (unix time, cumulative CPU seconds of the driver, of ray:: workers, of everything)
    series: list[tuple[float, float, float, float]] = field(default_factory=list)

    @property
    def cpu_total_s(self) -> float:
        return sum(self.cpu_s.values())

    def cpu_at(self, when: float) -> tuple[float, float, float]:
        """(driver, workers, all) cumulative CPU seconds at unix time `when` (interpolated)."""
        times = [s[0] for s in self.series]
        i = max(1, min(len(times) - 1, bisect.bisect_left(times, when)))
        (t0, *a), (t1, *b) = self.series[i - 1], self.series[i]
        w = 0.0 if t1 == t0 else min(1.0, max(0.0, (when - t0) / (t1 - t0)))
        return tuple(x + w * (y - x) for x, y in zip(a, b))  # type: ignore[return-value]


class TreeSampler(threading.Thread):
    """Background thread: samples the tree of `root_pid` until `stop()`."""

    def __init__(self, root_pid: int, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root, self.interval_s = root_pid, interval_s
        self.stats = TreeStats()
        self._stop_event = threading.Event()

    def sample(self) -> None:
        stats, pss_total, worker_pss = self.stats, 0, 0
        for pid in descendants(self.root):
            info = _read(pid)
            if info is None:
                continue
            role, rss, pss, anon, cpu = info
            stats.cpu_s[pid] = cpu
            stats.roles[pid] = "driver" if pid == self.root else role
            pss_total += pss
            if pid == self.root:
                stats.driver_rss = max(stats.driver_rss, rss)
                stats.driver_anon = max(stats.driver_anon, anon)
            elif role == "worker":
                stats.worker_rss = max(stats.worker_rss, rss)
                stats.worker_anon = max(stats.worker_anon, anon)
                worker_pss += pss
            else:
                stats.ray_rss = max(stats.ray_rss, rss)
        stats.pss_total = max(stats.pss_total, pss_total)
        stats.worker_pss_total = max(stats.worker_pss_total, worker_pss)
        stats.samples += 1
        driver = sum(c for p, c in stats.cpu_s.items() if stats.roles[p] == "driver")
        workers = sum(c for p, c in stats.cpu_s.items() if stats.roles[p] == "worker")
        stats.series.append((time.time(), driver, workers, stats.cpu_total_s))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> TreeStats:
        self._stop_event.set()
        self.join()
        return self.stats


@dataclass
class RunResult:
    returncode: int
    wall_s: float
    stats: TreeStats
    log_tail: str


def run_monitored(
    argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
    interval_s: float = 0.25,
) -> RunResult:
    """Run `argv` as a child process and sample its whole process tree until it exits."""
    start = time.monotonic()
    with subprocess.Popen(argv, env=dict(env) if env is not None else None, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        sampler = TreeSampler(proc.pid, interval_s)
        sampler.start()
        output = proc.stdout.read() if proc.stdout else b""
        proc.wait()
        stats = sampler.stop()
    tail = "\n".join(output.decode(errors="replace").splitlines()[-30:])
    return RunResult(proc.returncode, time.monotonic() - start, stats, tail)


def job_env(worker_niceness: int) -> dict[str, str]:
    """Environment for a local Ray job: no cluster address; Ray workers at `worker_niceness`.

    Ray runs its workers at nice 15 by default, so on a shared machine they lose every contest
    for the cores to other users' nice-0 processes, while the in-process baselines run at nice 0;
    0 puts both on equal terms (a dedicated cluster node has nothing to lose against).
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_worker_niceness"] = str(worker_niceness)
    return env
