"""Output folders of the jobs: deterministic shards, output keys, layouts, commit and resume.

Owns: `Shard`s (`shard_size` consecutive images of the sorted input list, named part-NNNNN by
position, so the same input gives the same shards on every run); output paths of inputs
(`input_root`, `relative_key`); the results layout of `patchcore score` (`RESULT_MAPS`,
`map_uri`, the scores table's columns `score_rows`); `OutputFolder`, the commit and resume state of one folder; and `reuse_committed`, the
one answer to "is this folder already committed by a run like this one?". Must not: import Ray,
compute anything, or call a filesystem except through patchcore_core.storage.

A shard is committed when `_shards/part-NNNNN.json` exists: it is written last, after the shard's
data files, and holds its counts plus the size and row count of each data file: a rerun redoes
every shard whose record is missing or unreadable or whose files disagree with it (a truncated or
half-written file is redone, never read). The job's manifest.json is written when every shard is
committed. `<out>/_lock.json` (RunLock) keeps a second run out of a folder that one run is writing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from jobs.lock import FolderLockedError, RunLock
from patchcore_core import storage

log = logging.getLogger("jobs.folders")

SHARD_DIR = "_shards"  # part-NNNNN.json commit records
JOB_FILE = "_job.json"  # identity of the run that owns an uncommitted folder
LOCK_FILE = "_lock.json"  # the run writing the folder now (RunLock)
_CHECK_THREADS = 16  # parallel footer reads when validating committed shards on resume
_DIGEST_CHUNK = 65536  # URIs joined at a time by inputs_digest
# what safe_relative_path escapes: an empty, '.' or '..' component, or '%', '\\', control characters
_NEEDS_ESCAPE = re.compile(r"(?:^|/)\.{0,2}(?:/|$)|[%\\\x00-\x1f\x7f]")

# Results layout of `patchcore score` (DESIGN.md §4): map kind -> (subfolder, suffix after <rel>)
RESULT_MAPS = {"png": ("maps", ".png"), "mask": ("masks", ".png"), "raw": ("maps_raw", ".npy")}
RESULT_DIRS = ("scores", "errors", "maps", "masks", "maps_raw")


# --------------------------------------------------------------------------- shards and output keys


@dataclass(frozen=True)
class Shard:
    """Inputs [start, start + len(uris)) of the sorted input list."""

    index: int
    start: int
    uris: tuple[str, ...]

    @property
    def name(self) -> str:
        """part-NNNNN (index, 5 digits): the base name of the shard's data and commit files."""
        return f"part-{self.index:05d}"


def make_shards(uris: Sequence[str], shard_size: int) -> list[Shard]:
    """Consecutive chunks of `shard_size` inputs, numbered by position (deterministic)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [
        Shard(i, lo, tuple(uris[lo : lo + shard_size]))
        for i, lo in enumerate(range(0, len(uris), shard_size))
    ]


def inputs_digest(uris: Sequence[str]) -> str:
    """sha256 of the input list: two runs with the same digest see the same images in order.

    The hash of "\n".join(uris), fed in chunks so the driver never holds the joined text (700 MB
    for 10M URIs).
    """
    digest = hashlib.sha256()
    for lo in range(0, len(uris), _DIGEST_CHUNK):
        if lo:
            digest.update(b"\n")
        digest.update("\n".join(uris[lo : lo + _DIGEST_CHUNK]).encode("utf-8"))
    return digest.hexdigest()



def _common_dir(uris: Sequence[str]) -> str:
    """Longest common '/'-separated folder prefix of all URIs (no trailing slash).

    The common text prefix of every URI is that of the smallest and largest one; its folders are
    the part before its last '/' (two passes in C, no split of every URI).
    """
    prefix = os.path.commonprefix([min(uris), max(uris)])
    cut = prefix.rfind("/")
    return prefix[:cut] if cut >= 0 else ""


def input_root(images: str, uris: Sequence[str]) -> str:
    """The folder that output paths are relative to: the --images folder/prefix (or a glob's fixed
    leading folders) when every input lies below it, otherwise the inputs' common folder."""
    if not uris:
        raise ValueError("input_root needs at least one input URI")
    candidate = storage.normalise_uri(images)
    if any(c in images for c in "*?["):
        parts = candidate.split("/")
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
        candidate = "/".join(parts[:fixed])
    if all(uri.startswith(candidate + "/") for uri in uris):
        return candidate
    return _common_dir(uris)


def _escape_component(part: str) -> str:
    """One path component made safe and unambiguous ('%' escapes, so the mapping is injective)."""
    if part == "":
        return "%"  # an empty component ('a//b', leading '/'); a literal '%' becomes '%25'
    if part in (".", ".."):
        return "%2E" * len(part)
    out = []
    for char in part:
        if char == "%" or char == "\\" or ord(char) < 0x20 or char == "\x7f":
            out.append(f"%{ord(char):02X}")
        else:
            out.append(char)
    return "".join(out)


def safe_relative_path(rel: str) -> str:
    """A relative path that cannot leave the folder it is joined to.

    Components '..' and '.' and empty ones (absolute paths, '//') are escaped, never resolved, as
    are '%', backslashes and control characters, so different inputs never share an output path.
    """
    if not _NEEDS_ESCAPE.search(rel):  # the common case, one regex pass: nothing to escape
        return rel
    return "/".join(_escape_component(part) for part in rel.split("/"))


def relative_key(uri: str, root: str) -> str:
    """Output path of an input, relative to the output subfolder: its path below `root`, sanitised."""
    prefix = root + "/"
    rel = uri[len(prefix) :] if uri.startswith(prefix) else uri
    return safe_relative_path(rel)


class OutputKeys(Sequence[str]):
    """`relative_key` of each input by position, computed when read: the driver keeps no second
    string per input (10M keys would be about 1 GB of Python strings). Holds `uris`, not a copy."""

    def __init__(self, uris: Sequence[str], root: str) -> None:
        self.uris = uris
        self.root = root

    def __len__(self) -> int:
        return len(self.uris)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [relative_key(u, self.root) for u in self.uris[i]]
        return relative_key(self.uris[i], self.root)


def map_uri(results: str, rel: str, kind: str) -> str:
    """Where a results folder keeps the `kind` ("png", "mask" or "raw") map of the input whose
    output key is `rel` (the scores table's `rel` column, `relative_key` of its URI)."""
    if kind not in RESULT_MAPS:
        raise ValueError(f"map kind must be one of {sorted(RESULT_MAPS)}, got {kind!r}")
    sub, suffix = RESULT_MAPS[kind]
    return storage.join_uri(results, sub, rel + suffix)


def scores_file(shard: Shard) -> str:
    """scores/part-NNNNN.parquet, relative to the results folder."""
    return f"scores/{shard.name}.parquet"


def errors_file(shard: Shard) -> str:
    """errors/part-NNNNN.parquet (uri, error of the inputs that failed), relative to the folder."""
    return f"errors/{shard.name}.parquet"


# --------------------------------------------------------------------------- committed folders


def check_same_run(uri: str, saved: Mapping[str, Any], identity: Mapping[str, Any], what: str,
                   fix: str) -> None:
    """ValueError naming the differing settings unless `saved` (what an earlier run recorded in
    `uri`) equals this run's `identity`; `what` and `fix` complete the message."""
    if saved == identity:
        return
    changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    raise ValueError(f"{uri} {what} with other inputs or settings (differing: {changed}); "
                     f"pass --overwrite to {fix}, or choose another --out")


def reuse_committed(
    uri: str, kind: str, options: dict[str, Any], *, overwrite: bool,
    identity: Mapping[str, Any] | None = None,
    saved_identity: Callable[[dict[str, Any]], Mapping[str, Any] | None] = lambda m: m.get("identity", {}),
) -> dict[str, Any] | None:
    """The manifest of `uri` when a run like this one committed it, so the job has nothing to do.

    None when nothing is committed there, or --overwrite replaces it, or `saved_identity` of the
    manifest is None (an earlier step of the same recipe committed it and this run goes on).
    ValueError when it is another artifact kind, or when `identity` is given and differs from the
    one the manifest records.
    """
    if overwrite or not storage.is_committed(uri, options):
        return None
    manifest = storage.read_manifest(uri, kind, options)
    if identity is not None:
        saved = saved_identity(manifest)
        if saved is None:
            return None
        check_same_run(uri, saved, identity, f"is a committed {kind} folder", "replace it")
    log.info("%s %s is already committed; nothing to do (--overwrite redoes it)", kind, uri)
    return manifest


class OutputFolder:
    """Commit and resume state of one job's output folder (manifest, _job.json, _shards/, lock).

    state: subfolder holding manifest.json, _job.json and _shards/ ("" = the folder itself), so
    several runs can share one folder (`patchcore score --incremental`: runs/run=ID); the run lock
    is always the folder's own, so one run at a time writes the folder.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any], state: str = "") -> None:
        self.uri = uri
        self.options = storage_options
        self.state_uri = storage.join_uri(uri, state) if state else uri
        self.lock: RunLock | None = None
        self._records: dict[int, dict[str, Any]] = {}  # validated commit records

    def join(self, *parts: str) -> str:
        """URI of `parts` below the folder."""
        return storage.join_uri(self.uri, *parts)

    def is_committed(self) -> bool:
        """Whether the folder's (state's) manifest.json exists: the whole job finished."""
        return storage.is_committed(self.state_uri, self.options)

    def acquire_lock(self) -> None:
        """Claim the folder for this run (FolderLockedError if another run writes it); idempotent.

        Released by `finish`/`release_lock`, or when this object is garbage-collected.
        """
        if self.lock is None:
            lock = RunLock(self.join(LOCK_FILE), self.options)
            lock.acquire()
            self.lock = lock
            weakref.finalize(self, lock.release)

    def release_lock(self) -> None:
        """Release the run lock if held (idempotent); a later `acquire_lock` takes a new one."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[OutputFolder]:
        """`with folder.locked():` hold the run lock for the block, released on any exit."""
        self.acquire_lock()
        try:
            yield self
        finally:
            self.release_lock()

    def verify_lock(self) -> None:
        """Before a commit: raise FolderLockedError unless this run still holds the folder."""
        if self.lock is None:
            raise FolderLockedError(f"{self.uri}: commit without holding the run lock")
        self.lock.verify()

    def names_in(self, sub: str) -> set[str]:
        """Base names of the files directly in `sub` (one listing, not one request per shard)."""
        return set(self.sizes_in(sub))

    def sizes_in(self, sub: str) -> dict[str, int]:
        """Base name -> size in bytes of the files directly in `sub` (one listing)."""
        return storage.file_sizes(self.join(sub) if sub else self.uri, self.options)

    def prepare(self, identity: dict[str, Any], overwrite: bool, data: Sequence[str]) -> None:
        """Claim the folder for the run `identity` (run lock first); with `overwrite`, clear it.

        data: our subfolders (e.g. "scores") and top-level globs (e.g. "part-*.parquet") to delete.
        Resuming a folder that an earlier run with another identity left uncommitted is refused,
        and so is a folder that another run committed since this one checked.
        """
        self.acquire_lock()
        job_uri = storage.join_uri(self.state_uri, JOB_FILE)
        if overwrite:
            # un-commit first
            storage.remove(storage.join_uri(self.state_uri, storage.MANIFEST_NAME), self.options)
            for name in data:
                storage.remove_tree(self.join(name), self.options)
            for name in (SHARD_DIR, JOB_FILE):
                storage.remove_tree(storage.join_uri(self.state_uri, name), self.options)
        elif self.is_committed():
            raise FileExistsError(f"{self.uri} was committed by another run while this one started; "
                                  "rerun to reuse it, or pass --overwrite to replace it")
        if storage.exists(job_uri, self.options):
            saved = json.loads(storage.read_bytes(job_uri, self.options).decode("utf-8"))
            check_same_run(self.uri, saved, identity, "holds an unfinished run", "discard it")
            return
        body = json.dumps(identity, sort_keys=True).encode("utf-8")
        storage.write_bytes(job_uri, body, self.options)

    def _load_record(self, shard: Shard) -> dict[str, Any]:
        """The shard's commit record; FileNotFoundError, ValueError or UnicodeDecodeError if bad."""
        data = storage.read_bytes(storage.join_uri(self.state_uri, SHARD_DIR, f"{shard.name}.json"),
                                  self.options)
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict):
            raise ValueError(f"commit record of {shard.name} is not a JSON object")
        return record

    def _problem(self, rel: str, meta: dict[str, Any] | None, sizes: dict[str, int]) -> str | None:
        """Why the committed data file `rel` cannot be trusted, or None when it matches its record."""
        listed = sizes.get(posixpath.basename(rel))
        if listed is None:
            return f"{rel} is missing"
        if meta and meta.get("bytes") is not None and listed != meta["bytes"]:
            return f"{rel} has {listed} bytes, its commit record says {meta['bytes']}"
        if rel.endswith(".parquet"):
            try:
                rows = storage.parquet_num_rows(self.join(rel), self.options)
            except (ValueError, FileNotFoundError) as err:
                return str(err)
            if meta and meta.get("rows") is not None and rows != meta["rows"]:
                return f"{rel} has {rows} rows, its commit record says {meta['rows']}"
        return None

    def committed_shards(self, shards: Sequence[Shard], data_files: Callable[[Shard], str]) -> set[int]:
        """Shards committed intact: a readable commit record, and every data file it lists (at
        least `data_files(shard)`, relative) present with the recorded size and row count and a
        readable Parquet footer. Any other shard is logged and will be redone."""
        records = set(storage.file_sizes(storage.join_uri(self.state_uri, SHARD_DIR), self.options))
        candidates = [s for s in shards if f"{s.name}.json" in records]

        def load(shard: Shard) -> tuple[Shard, dict[str, Any] | None, str]:
            try:
                return shard, self._load_record(shard), ""
            except (ValueError, UnicodeDecodeError, FileNotFoundError) as err:
                return shard, None, f"unreadable commit record ({err})"

        with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
            loaded = list(pool.map(load, candidates))
            files = {s.index: (r.get("files") or {data_files(s): None}) for s, r, _ in loaded if r}
            subs = {posixpath.dirname(rel) for f in files.values() for rel in f}
            sizes = {sub: self.sizes_in(sub) for sub in sorted(subs)}

            def check(item: tuple[Shard, dict[str, Any] | None, str]) -> tuple[Shard, str]:
                shard, record, problem = item
                if record is not None:
                    wanted = {**files[shard.index]}
                    wanted.setdefault(data_files(shard), None)
                    for rel, meta in wanted.items():
                        problem = self._problem(rel, meta, sizes.get(posixpath.dirname(rel), {}))
                        if problem:
                            break
                return shard, problem

            checked = list(pool.map(check, loaded))
        done = set()
        for (shard, problem), (_, record, _) in zip(checked, loaded):
            if problem:
                log.warning("shard %s is not committed intact (%s): it will be redone", shard.name, problem)
            else:
                assert record is not None
                self._records[shard.index] = record
                done.add(shard.index)
        return done

    def resume(
        self, shards: Sequence[Shard], data_files: Callable[[Shard], str]
    ) -> tuple[dict[int, dict[str, Any]], list[Shard]]:
        """(commit records of the shards committed intact by index, shards still to do), logged."""
        committed = self.committed_shards(shards, data_files)
        records = {i: self.read_record(shards[i]) for i in sorted(committed)}
        if committed:
            log.info("resuming: %d of %d shards already committed", len(committed), len(shards))
        return records, [s for s in shards if s.index not in committed]

    def read_record(self, shard: Shard) -> dict[str, Any]:
        """The commit record of a shard (as validated by `committed_shards` when it was)."""
        if shard.index in self._records:
            return self._records[shard.index]
        return self._load_record(shard)

    def commit_shard(self, shard: Shard, record: dict[str, Any],
                     files: Mapping[str, int | None] | None = None) -> None:
        """Write the shard's commit record, after all its data files (checks the run lock first).

        files: data files (relative path -> row count or None) whose size and row count the record
        keeps for validation on resume; default `{record["file"]: record["rows"]}` when present.
        """
        self.verify_lock()
        if files is None:
            files = {record["file"]: record.get("rows")} if "file" in record else {}
        meta = {rel: {"bytes": storage.file_size(self.join(rel), self.options), "rows": rows}
                for rel, rows in files.items()}
        body = json.dumps({**record, "files": meta}, sort_keys=True).encode("utf-8")
        storage.write_bytes(storage.join_uri(self.state_uri, SHARD_DIR, f"{shard.name}.json"), body,
                            self.options)

    def write_errors(self, shard: Shard, uris: Sequence[str], errors: Sequence[str]) -> None:
        """errors/part-NNNNN.parquet with uri, error; a stale one from an earlier try is removed."""
        uri = self.join(errors_file(shard))
        if not uris:
            storage.remove(uri, self.options)
            return
        storage.write_rows(uri, {"uri": ("string", uris), "error": ("string", errors)}, self.options)

    def finish(self) -> None:
        """Drop the run-identity file once the manifest is written, and release the lock."""
        storage.remove(storage.join_uri(self.state_uri, JOB_FILE), self.options)
        self.release_lock()


def failed(counts: dict[str, int], max_failures: int, what: str) -> bool:
    """Whether more inputs failed than --max-failures tolerates (logged as an error if so)."""
    if counts["errors"] > max_failures:
        log.error("%d of %d inputs could not be %s (--max-failures %d); see errors/ in the output",
                  counts["errors"], counts["inputs"], what, max_failures)
        return True
    return False


def score_rows(columns: Mapping[str, np.ndarray], ok: np.ndarray, image_threshold: float | None
               ) -> dict[str, tuple[str, Any]]:
    """The scores table of one shard (DESIGN.md §4 "Results"), as storage.write_rows columns.

    columns: the scoring stage's output by input position (uri, key, score, max_y, max_x, width,
    height); ok: (n,) bool, the inputs that were scored (the others go to errors/). anomalous is
    score > the bank's image threshold, None for every row when the bank has none.
    """
    scores = columns["score"][ok].astype(np.float64)
    anomalous = ([bool(v) for v in scores > image_threshold] if image_threshold is not None
                 else [None] * len(scores))
    return {
        "uri": ("string", [str(u) for u, keep in zip(columns["uri"], ok) if keep]),
        "rel": ("string", [str(k) for k, keep in zip(columns["key"], ok) if keep]),
        "score": ("float64", scores),
        "anomalous": ("bool", anomalous),
        "max_y": ("int32", columns["max_y"][ok]),
        "max_x": ("int32", columns["max_x"][ok]),
        "width": ("int32", columns["width"][ok]),
        "height": ("int32", columns["height"][ok]),
    }
