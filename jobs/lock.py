"""Run lock of an output folder: `<out>/_lock.json`, so that one run at a time writes it (DESIGN.md §4).

Atomic where storage has conditional writes (local POSIX files, S3 and S3-compatible stores);
elsewhere a check-then-write that narrows, but does not close, the race.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any

from patchcore_core import storage

log = logging.getLogger("jobs.lock")

LOCK_LEASE_S = 120.0  # a lock whose heartbeat is older than this belongs to a dead run
LOCK_HEARTBEAT_S = 20.0  # how often a running job rewrites its lock


class FolderLockedError(FileExistsError):
    """Another run is writing the output folder (or took it over from this run)."""


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _stale_reason(holder: dict[str, Any] | None, now: float) -> str | None:
    """Why the lock `holder` belongs to a dead run, or None while that run may be alive."""
    if holder is None:
        return "the lock file is unreadable"
    age = now - float(holder.get("heartbeat", 0))
    if age > LOCK_LEASE_S:
        return f"its last heartbeat is {age:.0f} s old (lease {LOCK_LEASE_S:.0f} s)"
    pid = int(holder.get("pid", 0))
    # a pid means something only on the host that wrote it; elsewhere only the lease decides
    if holder.get("host") == socket.gethostname() and pid > 0 and not _pid_alive(pid):
        return f"its process {pid} on this host is gone"
    return None


def _parse_lock(data: bytes) -> dict[str, Any] | None:
    """The lock's fields, or None when it is not a lock this code wrote (treated as stale)."""
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(holder, dict) or "run_id" not in holder:
        return None
    numbers = (holder.get("heartbeat", 0), holder.get("started", 0), holder.get("pid", -1))
    # bool is an int subclass: a hand-edited `true` must not pass as a timestamp or pid
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        return None
    return holder


class RunLock:
    """`<out>/_lock.json`: at most one run writes an output folder at a time.

    `acquire` creates the file exclusively (storage.create_exclusive: O_EXCL-style link locally,
    If-None-Match on S3). The lock of a dead run (heartbeat older than LOCK_LEASE_S, or its process
    gone on this host) is taken over by compare-and-swap, so two runs cannot both take it over.
    A daemon thread renews the heartbeat every LOCK_HEARTBEAT_S, again by compare-and-swap;
    `verify` (before each commit) raises FolderLockedError if another run holds the file.

    uri: the lock file, `<out>/_lock.json`; nothing is written before `acquire`. The file holds
    JSON {run_id, host, pid, started, heartbeat} (times in Unix seconds).
    """

    def __init__(self, uri: str, storage_options: dict[str, Any]) -> None:
        self.uri = uri
        self.options = storage_options
        self.run_id = uuid.uuid4().hex
        self._started = time.time()
        self._body: bytes | None = None  # what this run last wrote; None when not held
        self._lost: str | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()  # heartbeat vs release
        self._thread: threading.Thread | None = None

    def _new_body(self) -> bytes:
        """The lock file's bytes with a fresh heartbeat; compared byte for byte by the swaps."""
        body = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "started": self._started, "heartbeat": time.time()}
        return json.dumps(body, sort_keys=True).encode("utf-8")

    def _refusal(self, holder: dict[str, Any]) -> FolderLockedError:
        """The error for a folder that the live run `holder` writes: who, since when, what to do."""
        age = time.time() - float(holder.get("heartbeat", 0))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        return FolderLockedError(
            f"{posixpath.dirname(self.uri)} is being written by another run (run "
            f"{holder.get('run_id')} on host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{started}, heartbeat {age:.0f} s ago); two runs cannot write one output at once. Wait "
            f"for it to finish, or choose another --out. The lock of a run that died is taken over "
            f"once its heartbeat is {LOCK_LEASE_S:.0f} s old (at once on the same host); to force "
            f"it, delete {self.uri}"
        )

    def acquire(self) -> None:
        """Take the lock or raise FolderLockedError naming the run that holds it.

        Writes `uri` (or takes over a dead run's lock, logged as a warning) and starts the
        heartbeat thread. Also FolderLockedError when 5 attempts all lose races to other runs.
        """
        body = self._new_body()
        for _ in range(5):  # the holder may release between our create and our read
            if storage.create_exclusive(self.uri, body, self.options):
                break
            try:
                current = storage.read_bytes(self.uri, self.options)
            except FileNotFoundError:  # released after our create failed: try to create again
                continue
            holder = _parse_lock(current)
            reason = _stale_reason(holder, time.time())
            if reason is None:
                assert holder is not None
                raise self._refusal(holder)
            if storage.replace_if_unchanged(self.uri, body, current, self.options):
                log.warning("took over %s from a dead run: %s", self.uri, reason)
                break
        else:
            raise FolderLockedError(f"could not take {self.uri}: other runs keep claiming it")
        self._body = body
        self._thread = threading.Thread(target=self._heartbeat, name="patchcore-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        """Thread body: renew the lock every LOCK_HEARTBEAT_S until released; if the swap finds
        another body, record why in `_lost` (for `verify`) and stop renewing."""
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            with self._mutex:
                if self._stop.is_set() or self._body is None:
                    return
                body = self._new_body()
                try:
                    renewed = storage.replace_if_unchanged(self.uri, body, self._body, self.options)
                except OSError as err:  # transient storage trouble: the lease outlasts a few misses
                    log.warning("could not renew %s: %s", self.uri, err)
                    continue
                if not renewed:
                    self._lost = "another run replaced or removed the lock file"
                    return
                self._body = body

    def verify(self) -> None:
        """Raise FolderLockedError unless this run still holds the lock (one read)."""
        if self._body is None:
            raise FolderLockedError(f"{self.uri} is not held by this run")
        if self._lost is None:
            try:
                holder = _parse_lock(storage.read_bytes(self.uri, self.options))
            except FileNotFoundError:
                holder = None
            if holder is None:
                self._lost = "the lock file is gone or unreadable"
            elif holder["run_id"] != self.run_id:
                self._lost = f"the lock now names run {holder['run_id']}"
        if self._lost is not None:
            raise FolderLockedError(
                f"this run lost {self.uri} ({self._lost}); it stops without committing. Another "
                "run took the folder over, probably because this one stalled past the lease"
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._mutex:
            if self._body is None:
                return
            body, self._body = self._body, None
            if not storage.remove_if_unchanged(self.uri, body, self.options):
                log.warning("lock %s was no longer ours; left as it is", self.uri)
