"""Inputs -> deterministic shards -> Ray Data decode + actor stages -> per-shard commits (DESIGN.md §4, §6).

Shared by `patchcore extract`, `score` and `fit`. A shard is `shard_size` consecutive images of the
sorted input list, named part-NNNNN by its position, so the same input gives the same shards on
every run. A shard is committed when `_shards/part-NNNNN.json` exists: it is written last, after
the shard's data files, and holds its counts plus the size and row count of each data file: a
rerun redoes every shard whose record is missing or unreadable or whose files disagree with it
(a truncated or half-written file is redone, never read). The job's manifest.json is written
when every shard is committed. `<out>/_lock.json` (RunLock) keeps a second run out of a folder
that one run is writing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import os
import posixpath
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from jobs import _cli, _ray
from jobs._lock import FolderLockedError, RunLock
from patchcore_core import preprocess, storage

log = logging.getLogger("jobs.shards")

SHARD_DIR = "_shards"  # part-NNNNN.json commit records
JOB_FILE = "_job.json"  # identity of the run that owns an uncommitted folder
LOCK_FILE = "_lock.json"  # the run writing the folder now (RunLock)
_CHECK_THREADS = 16  # parallel footer reads when validating committed shards on resume
DEVICES = ("auto", "cpu", "cuda")
# Least CPUs a read+decode task reserves (it reserves one when the model actors leave one).
# Decoding is a few ms of an image's work against tens for the model, so a fraction of a CPU keeps
# up on a small machine whose actors hold the rest; with none left no decode task could start.
DECODE_CPUS = 0.25


# --------------------------------------------------------------------------- flags shared by the jobs


@dataclass(frozen=True, kw_only=True)
class PipelineFlags:
    """Resources and fault handling of a Ray Data image job (base of the job configs)."""

    workers: int = _cli.arg("model actors; 0 = one per GPU, or on CPU one per --cpus-per-worker CPUs, "
                            "sharing all CPUs but a quarter (for decoding)", 0)
    batch_size: int = _cli.arg("images per model call (per actor)", 32)
    cpus_per_worker: float = _cli.arg("CPUs Ray reserves for each model actor", 1.0)
    device: str = _cli.arg("auto|cpu|cuda; auto = cuda when the Ray cluster has GPUs", "auto")
    shard_size: int = _cli.arg("images per output shard part-NNNNN (the unit of commit and resume)", 256)
    max_pixels: int = _cli.arg("larger inputs are recorded as errors (decompression bombs)",
                               preprocess.DEFAULT_MAX_PIXELS)
    max_failures: int = _cli.arg("unreadable inputs tolerated; more = exit status 2 after writing all", 0)
    retries: int = _cli.arg("times a batch is retried after its worker process died (actors restart)", 3)
    overwrite: bool = _cli.arg("replace a committed output folder", False)
    dry_run: bool = _cli.arg("resolve the config, list the inputs, log the plan, then stop", False)
    storage_options: str = _cli.arg("JSON object of fsspec options for every URI (never logged)", "")


def check_pipeline_flags(cfg: PipelineFlags) -> None:
    """Validate the PipelineFlags fields of a job config (called from its __post_init__)."""
    if cfg.workers < 0:
        raise ValueError(f"--workers must be >= 0 (0 = automatic), got {cfg.workers}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if not 0.0 < cfg.cpus_per_worker <= 1024:
        raise ValueError(f"--cpus-per-worker must be in (0, 1024], got {cfg.cpus_per_worker}")
    if cfg.device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {cfg.shard_size}")
    if cfg.max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {cfg.max_pixels}")
    if cfg.max_failures < 0:
        raise ValueError(f"--max-failures must be >= 0, got {cfg.max_failures}")
    if cfg.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {cfg.retries}")
    _cli.parse_storage_options(cfg.storage_options)  # raises on bad JSON, without echoing it


def failed(counts: dict[str, int], max_failures: int, what: str) -> bool:
    """Whether more inputs failed than --max-failures tolerates (logged as an error if so)."""
    if counts["errors"] > max_failures:
        log.error("%d of %d inputs could not be %s (--max-failures %d); see errors/ in the output",
                  counts["errors"], counts["inputs"], what, max_failures)
        return True
    return False


# --------------------------------------------------------------------------- shards and output keys


@dataclass(frozen=True)
class Shard:
    """Inputs [start, start + len(uris)) of the sorted input list."""

    index: int
    start: int
    uris: tuple[str, ...]

    @property
    def name(self) -> str:
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
    """sha256 of the input list: two runs with the same digest see the same images in order."""
    return hashlib.sha256("\n".join(uris).encode("utf-8")).hexdigest()


def _normalise(uri: str) -> str:
    """Comparable form of a path or URI, as list_images returns it (local: absolute, no file://)."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return uri.rstrip("/") if uri.rstrip("/") else uri


def _common_dir(uris: Sequence[str]) -> str:
    """Longest common '/'-separated folder prefix of all URIs (no trailing slash)."""
    common = uris[0].split("/")[:-1]
    for uri in uris[1:]:
        parts = uri.split("/")[:-1]
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return "/".join(common)


def input_root(images: str, uris: Sequence[str]) -> str:
    """The folder that output paths are relative to: the --images folder/prefix (or a glob's fixed
    leading folders) when every input lies below it, otherwise the inputs' common folder."""
    if not uris:
        raise ValueError("input_root needs at least one input URI")
    candidate = _normalise(images)
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
    return "/".join(_escape_component(part) for part in rel.split("/"))


def relative_key(uri: str, root: str) -> str:
    """Output path of an input, relative to the output subfolder: its path below `root`, sanitised."""
    prefix = root + "/"
    rel = uri[len(prefix) :] if uri.startswith(prefix) else uri
    return safe_relative_path(rel)


# --------------------------------------------------------------------------- output folder state


class OutputFolder:
    """Commit and resume state of one job's output folder (manifest, _job.json, _shards/, lock)."""

    def __init__(self, uri: str, storage_options: dict[str, Any]) -> None:
        self.uri = uri
        self.options = storage_options
        self.fs, self.path = storage.url_to_fs(uri, storage_options)
        self.lock: RunLock | None = None
        self._records: dict[int, dict[str, Any]] = {}  # validated commit records

    def join(self, *parts: str) -> str:
        return storage.join_uri(self.uri, *parts)

    def is_committed(self) -> bool:
        return storage.is_committed(self.uri, self.options)

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
        folder = posixpath.join(self.path, sub) if sub else self.path
        self.fs.invalidate_cache(folder)
        if not self.fs.isdir(folder):
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in self.fs.ls(folder, detail=True) if e.get("type") != "directory"}

    def prepare(self, identity: dict[str, Any], overwrite: bool, data: Sequence[str]) -> None:
        """Claim the folder for the run `identity` (run lock first); with `overwrite`, clear it.

        data: our subfolders (e.g. "scores") and top-level globs (e.g. "part-*.parquet") to delete.
        Resuming a folder that an earlier run with another identity left uncommitted is refused,
        and so is a folder that another run committed since this one checked.
        """
        self.acquire_lock()
        job_uri = self.join(JOB_FILE)
        if overwrite:
            storage.remove(self.join(storage.MANIFEST_NAME), self.options)  # un-commit first
            for name in (*data, SHARD_DIR, JOB_FILE):
                for path in self.fs.glob(posixpath.join(self.path, name)):
                    self.fs.rm(path, recursive=True)
        elif self.is_committed():
            raise FileExistsError(f"{self.uri} was committed by another run while this one started; "
                                  "rerun to reuse it, or pass --overwrite to replace it")
        if storage.exists(job_uri, self.options):
            saved = json.loads(storage.read_bytes(job_uri, self.options).decode("utf-8"))
            if saved != identity:
                changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
                raise ValueError(
                    f"{self.uri} holds an unfinished run with other settings (differing: {changed}); "
                    "pass --overwrite to discard it, or choose another --out"
                )
            return
        body = json.dumps(identity, sort_keys=True).encode("utf-8")
        storage.write_bytes(job_uri, body, self.options)

    def _load_record(self, shard: Shard) -> dict[str, Any]:
        data = storage.read_bytes(self.join(SHARD_DIR, f"{shard.name}.json"), self.options)
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
        records = self.names_in(SHARD_DIR)
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
        meta = {}
        for rel, rows in files.items():
            path = posixpath.join(self.path, rel)
            self.fs.invalidate_cache(path)
            meta[rel] = {"bytes": int(self.fs.info(path)["size"]), "rows": rows}
        body = json.dumps({**record, "files": meta}, sort_keys=True).encode("utf-8")
        storage.write_bytes(self.join(SHARD_DIR, f"{shard.name}.json"), body, self.options)

    def write_errors(self, shard: Shard, uris: Sequence[str], errors: Sequence[str]) -> None:
        """errors/part-NNNNN.parquet with uri, error; a stale one from an earlier try is removed."""
        import pyarrow as pa  # only jobs that write errors need it

        uri = self.join("errors", f"{shard.name}.parquet")
        if not uris:
            storage.remove(uri, self.options)
            return
        table = pa.table({"uri": pa.array(list(uris), pa.string()),
                          "error": pa.array(list(errors), pa.string())})
        storage.write_table(uri, table, self.options)

    def finish(self) -> None:
        """Drop the run-identity file once the manifest is written, and release the lock."""
        storage.remove(self.join(JOB_FILE), self.options)
        self.release_lock()


# --------------------------------------------------------------------------- Ray Data pipeline


def decode_batch(
    batch: dict[str, np.ndarray], *, resize: int, crop: int, frame: str, max_pixels: int,
    storage_options: dict[str, Any],
) -> dict[str, np.ndarray]:
    """CPU stage: read and decode each `uri`, keep its size, preprocess to the crop (or full frame).

    Adds image (B, 3, crop, crop) float32 (zeros for failures), width, height (input pixels; 0 for
    failures) and error ("" when fine). An unreadable input becomes an error row, never an exception.
    """
    n = len(batch["uri"])
    images = np.zeros((n, 3, crop, crop), np.float32)
    widths, heights = np.zeros(n, np.int64), np.zeros(n, np.int64)
    errors = []
    for i, uri in enumerate(batch["uri"]):
        try:
            image = preprocess.decode_image(storage.read_bytes(str(uri), storage_options),
                                            max_pixels=max_pixels)
            images[i] = preprocess.to_tensor(image, resize, crop, frame=frame,
                                             max_pixels=max_pixels).numpy()
        # One input's failure must never stop the job: decode_image turns what Pillow raises on
        # bad data into ValueError and storage raises OSError, but a hostile file can reach
        # plugin code that raises anything else; every such input is recorded with its reason.
        except Exception as err:  # noqa: BLE001
            errors.append(f"{type(err).__name__}: {err}")
            continue
        widths[i], heights[i] = image.size
        errors.append("")
    return {**batch, "image": images, "width": widths, "height": heights,
            "error": np.asarray(errors, dtype=object)}


def resolve_device(flag: str) -> str:
    """'cpu' or 'cuda' for the model actors, from --device and the connected cluster."""
    gpus = _ray.cluster_gpus()
    if flag == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if flag == "cuda" and gpus < 1:
        raise ValueError("--device cuda but the Ray cluster has no GPUs; use --device cpu or auto")
    return flag


def _floor_ray(cpus: float) -> float:
    """`cpus` rounded down to Ray's resource unit (1/10000)."""
    return math.floor(cpus * 1e4) / 1e4


def node_cpus() -> list[float]:
    """CPUs of each alive node of the connected Ray that has any (a KubeRay head has none)."""
    counts = [float(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    return [c for c in counts if c > 0]


def _actors_on(node_cpus: float, share: float) -> int:
    """Automatic CPU actors of `share` CPUs on a node: as many as leave DECODE_CPUS, at least one."""
    return max(1, int((node_cpus - DECODE_CPUS) // share))


def _auto_cpu_actors(nodes: list[float], cpus_per_worker: float) -> tuple[int, float]:
    """(actors, CPUs each) filling every node with CPU actors but DECODE_CPUS.

    Each node takes floor(its CPUs / --cpus-per-worker) actors (at least one); one reservation
    for all actors, trimmed so that the smallest node's actors leave DECODE_CPUS (2 CPUs: two
    actors of 0.875). Per node, because a decode task must fit on one node.
    """
    smallest = min(nodes)
    per_smallest = max(1, int(smallest // cpus_per_worker))
    share = min(cpus_per_worker, _floor_ray((smallest - DECODE_CPUS) / per_smallest))
    if share <= 0:  # a node with at most DECODE_CPUS CPUs: nothing fits; the caller explains
        return len(nodes), cpus_per_worker
    return sum(_actors_on(c, share) for c in nodes), share


def resolve_resources(flags: PipelineFlags, device: str) -> tuple[int, float, float]:
    """(model actors, CPUs each actor reserves, CPUs each decode task reserves) on the Ray now
    connected.

    Actors: --workers of --cpus-per-worker CPUs; or one per GPU; or on CPU as many as fill every
    node but DECODE_CPUS (`_auto_cpu_actors`). A decode task reserves one CPU if the actors
    leave one, else what they leave (at least DECODE_CPUS): one decode task per spare CPU keeps
    up, and every concurrent task is a worker process that imports torch.
    ValueError when the actors leave less than DECODE_CPUS of a local Ray: no decode task could
    ever start and the job would wait forever. A remote cluster may grow (its autoscaler adds
    nodes for the waiting decode tasks), so there it is only logged.
    """
    nodes = node_cpus() or [0.0]
    cpus = sum(nodes)
    actor_cpus = flags.cpus_per_worker
    if flags.workers:
        workers = flags.workers
    elif device == "cuda":
        workers = max(1, _ray.cluster_gpus())
    else:
        workers, actor_cpus = _auto_cpu_actors(nodes, actor_cpus)
    reserved = workers * actor_cpus
    spare = cpus - reserved
    if not flags.workers and device != "cuda":  # actors packed per node: what one node keeps
        spare = min(c - _actors_on(c, actor_cpus) * actor_cpus for c in nodes)
    decode_cpus = min(1.0, max(DECODE_CPUS, _floor_ray(spare)))
    if spare >= DECODE_CPUS:
        return workers, actor_cpus, decode_cpus
    if _ray.on_remote_cluster():
        log.info("the model actors reserve %g of the cluster's %g CPUs: reading and decoding "
                 "waits until the autoscaler adds CPUs", reserved, cpus)
        return workers, actor_cpus, decode_cpus
    fit = int((cpus - DECODE_CPUS) // actor_cpus)
    hints = [f"--workers {fit}"] if fit >= 1 else []
    if cpus > DECODE_CPUS:
        hints.append(f"--cpus-per-worker {_floor_ray((cpus - DECODE_CPUS) / workers):g} "
                     f"with --workers {workers}")
    raise ValueError(
        f"--workers {flags.workers or f'0 (automatic: {workers})'} x --cpus-per-worker "
        f"{actor_cpus:g} reserve {reserved:g} of the local Ray's {cpus:g} CPUs for model actors, "
        f"leaving {max(0.0, spare):g} for reading and decoding images, which needs "
        f"{DECODE_CPUS:g}: the job would wait forever. Use {' or '.join(hints) or 'a Ray with more CPUs'}"
    )


def stream_shards(
    shards: Sequence[Shard],
    actor: type,
    actor_kwargs: dict[str, Any],
    flags: PipelineFlags,
    *,
    device: str,
    resize: int,
    crop: int,
    frame: str,
    label: str,
    extra: Mapping[str, Sequence[Any]] | None = None,
    done_images: int = 0,
    total_images: int | None = None,
) -> Iterator[tuple[Shard, dict[str, np.ndarray]]]:
    """Run decode -> `actor` over the inputs of `shards`; yield each shard once all its rows are back.

    `actor` is built with `actor_kwargs` plus threads: the torch threads it should run, its
    reserved CPUs rounded (Ray's OMP_NUM_THREADS rounds a fractional reservation down).
    Rows carry shard, position (index in the full input list), uri, plus `extra[name][position]`.
    The yielded columns are sorted by position. Only the shards' own rows are buffered on the
    driver, and a shard leaves the buffer as soon as it is complete; rows arrive in any order.
    Fault tolerance: a dead actor is restarted (max_restarts=-1) and its batch retried up to
    `flags.retries` times, as is a decode task; a row delivered twice (a retried batch) is kept
    once, by position, so each input is yielded exactly once.
    """
    rows = [
        {"shard": s.index, "position": s.start + i, "uri": uri,
         **{name: values[s.start + i] for name, values in (extra or {}).items()}}
        for s in shards for i, uri in enumerate(s.uris)
    ]
    if not rows:
        return
    options = _cli.parse_storage_options(flags.storage_options)
    workers, actor_cpus, decode_cpus = resolve_resources(flags, device)
    threads = max(1, round(actor_cpus))
    log.info("%s: %d images in %d shards on %d %s actor(s) of %g CPUs (%d torch threads), batch size "
             "%d; %g CPUs per decode task", label, len(rows), len(shards), workers, device,
             actor_cpus, threads, flags.batch_size, decode_cpus)
    ds = ray.data.from_items(rows)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates remote options passed to map_batches (removal planned for 2.64) but
        # offers no named parameter for retries: keep them explicit here, and revisit on upgrade
        # (tests/test_reliability.py checks that --retries takes effect).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            decode_batch, batch_size=flags.batch_size, batch_format="numpy",
            fn_kwargs={"resize": resize, "crop": crop, "frame": frame, "max_pixels": flags.max_pixels,
                       "storage_options": options},
            num_cpus=decode_cpus,
            max_retries=flags.retries,  # a decode worker that dies (OOM kill, node loss)
        )
        ds = ds.map_batches(
            actor, batch_size=flags.batch_size, batch_format="numpy",
            fn_constructor_kwargs={**actor_kwargs, "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=actor_cpus, num_gpus=1 if device == "cuda" else 0,
            # Explicit (Ray Data's defaults are -1/-1): restart dead actors always, but retry one
            # batch only `retries` times, so a batch that kills its actor every time fails the
            # job (its committed shards stay) instead of looping forever.
            max_restarts=-1, max_task_retries=flags.retries,
        )
    by_index = {s.index: s for s in shards}
    pending: dict[int, dict[int, dict[str, Any]]] = {s.index: {} for s in shards}
    total = total_images if total_images is not None else len(rows)
    progress = _ray.Progress(label, total, done=done_images)
    done, shards_done, duplicates, start = done_images, 0, 0, time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        names = list(batch)
        for j in range(len(batch["shard"])):
            index, position = int(batch["shard"][j]), int(batch["position"][j])
            if index not in pending or position in pending[index]:
                duplicates += 1  # a retried batch delivered this row again
                continue
            pending[index][position] = {name: batch[name][j] for name in names}
            if len(pending[index]) == len(by_index[index].uris):
                shard_rows = [row for _, row in sorted(pending.pop(index).items())]
                columns = {name: np.stack([r[name] for r in shard_rows]) for name in names}
                yield by_index[index], columns
                done += len(shard_rows)
                shards_done += 1
                progress.label = f"{label} ({shards_done}/{len(shards)} shards) images"
                progress.update(done, force=shards_done == len(shards))
    if duplicates:
        log.warning("%s: %d rows arrived twice (retried batches) and were kept once", label, duplicates)
    if pending:
        raise RuntimeError(f"{label}: shards {sorted(pending)} did not receive all their rows; "
                           "rerun the same command to redo only those shards")
    log.info("%s: %d images in %.1f s", label, len(rows), time.monotonic() - start)
