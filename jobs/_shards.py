"""Inputs -> deterministic shards -> Ray Data decode + actor stages -> per-shard commits (DESIGN.md §4, §6).

Shared by `patchcore extract`, `score` and `fit`. A shard is `shard_size` consecutive images of the
sorted input list, named part-NNNNN by its position, so the same input gives the same shards on
every run. A shard is committed when `_shards/part-NNNNN.json` exists: it is written last, after
the shard's data files, and holds its counts. A rerun redoes only uncommitted shards; the job's
manifest.json is written when every shard is committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from jobs import _cli, _ray
from patchcore_core import preprocess, storage

log = logging.getLogger("jobs.shards")

SHARD_DIR = "_shards"  # part-NNNNN.json commit records
JOB_FILE = "_job.json"  # identity of the run that owns an uncommitted folder
DEVICES = ("auto", "cpu", "cuda")


# --------------------------------------------------------------------------- flags shared by the jobs


@dataclass(frozen=True, kw_only=True)
class PipelineFlags:
    """Resources and fault handling of a Ray Data image job (base of the job configs)."""

    workers: int = _cli.arg("model actors; 0 = one per GPU, or on CPU one per free CPU (minus one)", 0)
    batch_size: int = _cli.arg("images per model call (per actor)", 32)
    cpus_per_worker: float = _cli.arg("CPUs Ray reserves for each model actor", 1.0)
    device: str = _cli.arg("auto|cpu|cuda; auto = cuda when the Ray cluster has GPUs", "auto")
    shard_size: int = _cli.arg("images per output shard part-NNNNN (the unit of commit and resume)", 256)
    max_pixels: int = _cli.arg("larger inputs are recorded as errors (decompression bombs)",
                               preprocess.DEFAULT_MAX_PIXELS)
    max_failures: int = _cli.arg("unreadable inputs tolerated; more = exit status 2 after writing all", 0)
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
    """Commit and resume state of one job's output folder (manifest, _job.json, _shards/)."""

    def __init__(self, uri: str, storage_options: dict[str, Any]) -> None:
        self.uri = uri
        self.options = storage_options
        self.fs, self.path = storage.url_to_fs(uri, storage_options)

    def join(self, *parts: str) -> str:
        return storage.join_uri(self.uri, *parts)

    def is_committed(self) -> bool:
        return storage.is_committed(self.uri, self.options)

    def names_in(self, sub: str) -> set[str]:
        """Base names of the files directly in `sub` (one listing, not one request per shard)."""
        folder = posixpath.join(self.path, sub) if sub else self.path
        if not self.fs.isdir(folder):
            return set()
        return {posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)}

    def prepare(self, identity: dict[str, Any], overwrite: bool, data: Sequence[str]) -> None:
        """Claim the folder for the run `identity`; with `overwrite`, clear it first.

        data: our subfolders (e.g. "scores") and top-level globs (e.g. "part-*.parquet") to delete.
        Resuming a folder that an earlier run with another identity left uncommitted is refused.
        """
        job_uri = self.join(JOB_FILE)
        if overwrite:
            storage.remove(self.join(storage.MANIFEST_NAME), self.options)  # un-commit first
            for name in (*data, SHARD_DIR, JOB_FILE):
                for path in self.fs.glob(posixpath.join(self.path, name)):
                    self.fs.rm(path, recursive=True)
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

    def committed_shards(self, shards: Sequence[Shard], data_files: Callable[[Shard], str]) -> set[int]:
        """Shards whose commit record and main data file `data_files(shard)` (relative) both exist."""
        records = self.names_in(SHARD_DIR)
        listings: dict[str, set[str]] = {}
        done = set()
        for shard in shards:
            sub, name = posixpath.split(data_files(shard))
            if sub not in listings:
                listings[sub] = self.names_in(sub)
            if f"{shard.name}.json" in records and name in listings[sub]:
                done.add(shard.index)
        return done

    def read_record(self, shard: Shard) -> dict[str, Any]:
        data = storage.read_bytes(self.join(SHARD_DIR, f"{shard.name}.json"), self.options)
        return json.loads(data.decode("utf-8"))

    def commit_shard(self, shard: Shard, record: dict[str, Any]) -> None:
        """Write the shard's commit record (after all its data files)."""
        body = json.dumps(record, sort_keys=True).encode("utf-8")
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
        """Drop the run-identity file once the manifest is written."""
        storage.remove(self.join(JOB_FILE), self.options)


# --------------------------------------------------------------------------- Ray Data pipeline


def decode_batch(
    batch: dict[str, np.ndarray], *, resize: int, crop: int, max_pixels: int,
    storage_options: dict[str, Any],
) -> dict[str, np.ndarray]:
    """CPU stage: read and decode each `uri`, keep its size, preprocess to the crop.

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
        except (ValueError, OSError) as err:  # decode failures, missing/forbidden/unreachable files
            errors.append(f"{type(err).__name__}: {err}")
            continue
        widths[i], heights[i] = image.size
        images[i] = preprocess.to_tensor(image, resize, crop).numpy()
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


def resolve_workers(flags: PipelineFlags, device: str) -> int:
    """Actor pool size: --workers, or one per GPU, or one per CPU leaving one for decoding."""
    if flags.workers:
        return flags.workers
    if device == "cuda":
        return max(1, _ray.cluster_gpus())
    cpus = float(ray.cluster_resources().get("CPU", 1))
    return max(1, int((cpus - 1) // flags.cpus_per_worker))


def stream_shards(
    shards: Sequence[Shard],
    actor: type,
    actor_kwargs: dict[str, Any],
    flags: PipelineFlags,
    *,
    device: str,
    resize: int,
    crop: int,
    label: str,
    extra: Mapping[str, Sequence[Any]] | None = None,
    done_images: int = 0,
    total_images: int | None = None,
) -> Iterator[tuple[Shard, dict[str, np.ndarray]]]:
    """Run decode -> `actor` over the inputs of `shards`; yield each shard once all its rows are back.

    Rows carry shard, position (index in the full input list), uri, plus `extra[name][position]`.
    The yielded columns are sorted by position. Only the shards' own rows are buffered on the
    driver, and a shard leaves the buffer as soon as it is complete; rows arrive in any order.
    """
    rows = [
        {"shard": s.index, "position": s.start + i, "uri": uri,
         **{name: values[s.start + i] for name, values in (extra or {}).items()}}
        for s in shards for i, uri in enumerate(s.uris)
    ]
    if not rows:
        return
    options = _cli.parse_storage_options(flags.storage_options)
    workers = resolve_workers(flags, device)
    log.info("%s: %d images in %d shards on %d %s actor(s), batch size %d",
             label, len(rows), len(shards), workers, device, flags.batch_size)
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(
        decode_batch, batch_size=flags.batch_size, batch_format="numpy",
        fn_kwargs={"resize": resize, "crop": crop, "max_pixels": flags.max_pixels,
                   "storage_options": options},
    )
    ds = ds.map_batches(
        actor, batch_size=flags.batch_size, batch_format="numpy",
        fn_constructor_kwargs=actor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=flags.cpus_per_worker, num_gpus=1 if device == "cuda" else 0,
    )
    by_index = {s.index: s for s in shards}
    pending: dict[int, list[dict[str, Any]]] = {s.index: [] for s in shards}
    total = total_images if total_images is not None else len(rows)
    progress = _ray.Progress(label, total, done=done_images)
    done, shards_done, start = done_images, 0, time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        names = list(batch)
        for j in range(len(batch["shard"])):
            index = int(batch["shard"][j])
            pending[index].append({name: batch[name][j] for name in names})
            if len(pending[index]) == len(by_index[index].uris):
                shard_rows = sorted(pending.pop(index), key=lambda r: int(r["position"]))
                columns = {name: np.stack([r[name] for r in shard_rows]) for name in names}
                yield by_index[index], columns
                done += len(shard_rows)
                shards_done += 1
                progress.label = f"{label} ({shards_done}/{len(shards)} shards) images"
                progress.update(done, force=shards_done == len(shards))
    assert not pending, f"shards {sorted(pending)} did not receive all their rows"
    log.info("%s: %d images in %.1f s", label, len(rows), time.monotonic() - start)
