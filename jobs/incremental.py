"""`patchcore score --incremental`: nightly runs into one growing results location (DESIGN.md §5).

Owns: the run's flags, which inputs a run scores (those whose (uri, input_version) no committed
run scored with the same bank digest), the Hive-partitioned layout of a run and its commit:

- scores/run=ID/part-NNNNN.parquet: the columns of `patchcore score` plus bank_id, bank_digest,
  input_version ("<size>:<ETag or mtime ns>", storage.iter_image_versions) and scored_at (UTC).
- errors/run=ID/part-NNNNN.parquet: uri, error, input_version, bank_id, bank_digest, scored_at.
  An input that failed is not retried for the same version and bank (a fixed file is a new one).
- runs/run=ID/: the run's commit state (_shards/, _job.json, input_keys.npy: the hashed
  (uri, input_version) of its inputs, the index later runs read; manifest.json written last).
- reports/run=ID/report.html, report.md (jobs.nightly_report).
- maps/<rel>.png, masks/<rel>.png as `patchcore score` writes them (a changed input's are replaced).

One run at a time writes the location (its run lock); a run cut short resumes when rerun with the
same --run-id, redoing only uncommitted shards. Must not touch storage except through
patchcore_core.storage, nor compute scores (jobs.score does).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs import cluster, nightly_report
from jobs.config import Flags, arg, config_dict
from jobs.folders import (
    OutputFolder,
    OutputKeys,
    Shard,
    failed,
    input_root,
    inputs_digest,
    make_shards,
    score_rows,
)
from patchcore_core import knn, storage
from patchcore_core.spec import ModelSpec

if TYPE_CHECKING:
    from jobs.score import ScoreConfig

log = logging.getLogger("jobs.incremental")

RUNS_DIR = "runs"  # runs/run=ID/: commit state of each run
KEYS_FILE = "input_keys.npy"  # runs/run=ID/input_keys.npy: sorted version_keys of the run's inputs
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY_BYTES = 8  # bytes of the hash that stands for one (uri, input_version) in the index


@dataclass(frozen=True, kw_only=True)
class IncrementalFlags(Flags):
    """Nightly scoring of a growing archive into one results location (Hive partitions run=ID)."""

    incremental: bool = arg("score only inputs (URI + size + ETag/mtime) that no committed run in "
                            "--out scored with this bank; write the run as scores/run=ID/, "
                            "errors/run=ID/ and reports/run=ID/report.html", False)
    run_id: str = arg("--incremental: the run's partition name run=ID (letters, digits, . _ -); "
                      "'' = today's UTC date YYYY-MM-DD; rerun the same ID to resume a run cut "
                      "short", "")
    new_bank: bool = arg("--incremental: accept a bank other than the one --out's committed runs "
                         "used (its rows differ in bank_id/bank_digest; every input is scored "
                         "again with it); without it such a bank is refused", False)
    report_top: int = arg("--incremental: most anomalous images shown in the run's report", 8)
    drift_tolerance: float = arg("--incremental: the report raises a drift alarm when the run's "
                                 "95th or 99th score percentile exceeds the calibration one by more "
                                 "than this fraction of it", 0.25)

    def __post_init__(self) -> None:
        if self.run_id and not _RUN_ID.fullmatch(self.run_id):
            raise ValueError(f"--run-id must be 1-64 letters, digits, '.', '_' or '-' (not first), "
                             f"got {self.run_id!r}")
        if not self.incremental and (self.run_id or self.new_bank):
            raise ValueError("--run-id and --new-bank apply to --incremental runs; add --incremental")
        if self.report_top < 0:
            raise ValueError(f"--report-top must be >= 0, got {self.report_top}")
        if not self.drift_tolerance >= 0.0:
            raise ValueError(f"--drift-tolerance must be >= 0, got {self.drift_tolerance}")
        super().__post_init__()


# --------------------------------------------------------------------------- layout and identity


def run_name(run_id: str) -> str:
    """The Hive partition folder of a run: run=ID."""
    return f"run={run_id}"


def default_run_id(now: datetime.datetime | None = None) -> str:
    """Today's UTC date, YYYY-MM-DD."""
    return (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%d")


def scores_part(run_id: str, shard: Shard) -> str:
    """scores/run=ID/part-NNNNN.parquet, relative to the results location."""
    return f"scores/{run_name(run_id)}/{shard.name}.parquet"


def errors_part(run_id: str, shard: Shard) -> str:
    """errors/run=ID/part-NNNNN.parquet, relative to the results location."""
    return f"errors/{run_name(run_id)}/{shard.name}.parquet"


def bank_identity(bank_uri: str, manifest: Mapping[str, Any]) -> tuple[str, str]:
    """(bank_id, bank_digest): the manifest's info.bank_id (else the bank folder's name), and the
    sha256 (hex) of the manifest content (canonical JSON), which changes with any refit."""
    bank_id = (manifest.get("info") or {}).get("bank_id") or posixpath.basename(
        storage.normalise_uri(bank_uri))
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return str(bank_id), hashlib.sha256(canonical).hexdigest()


def version_keys(uris: Sequence[str], versions: Sequence[str]) -> np.ndarray:
    """(n,) uint64 hashes of (uri, input_version) pairs: the compact form of the scored index."""
    out = np.empty(len(uris), np.uint64)
    for i, (uri, version) in enumerate(zip(uris, versions)):
        digest = hashlib.blake2b(f"{uri}\n{version}".encode(), digest_size=_KEY_BYTES).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


# --------------------------------------------------------------------------- committed runs


def committed_runs(out: str, options: dict[str, Any], current: str) -> dict[str, dict[str, Any]]:
    """{run id: manifest} of the committed runs in `out` other than `current`.

    ValueError when another run is unfinished: its rows are already readable under scores/, and a
    new run would score its inputs again; it must be finished (rerun it) first.
    """
    runs: dict[str, dict[str, Any]] = {}
    for name in storage.subfolders(storage.join_uri(out, RUNS_DIR), options):
        if not name.startswith("run="):
            continue
        run_id = name[len("run="):]
        state = storage.join_uri(out, RUNS_DIR, name)
        if run_id == current:
            continue
        if not storage.is_committed(state, options):
            raise ValueError(f"{out}: run {run_id} is unfinished (no {RUNS_DIR}/{name}/manifest.json); "
                             f"finish it first with the same command and --run-id {run_id}, or redo "
                             f"it with --run-id {run_id} --overwrite")
        runs[run_id] = storage.read_manifest(state, "results", options)
    return runs


def check_bank(out: str, runs: Mapping[str, Mapping[str, Any]], bank_id: str, digest: str,
               new_bank: bool) -> None:
    """ValueError when committed runs of `out` used another bank digest, unless `new_bank`."""
    others = sorted({(m["bank_id"], m["bank_digest"]) for m in runs.values()
                     if m["bank_digest"] != digest})
    if others and not new_bank:
        shown = ", ".join(f"{i} (digest {d[:12]})" for i, d in others)
        raise ValueError(f"{out} holds runs scored with another bank: {shown}; this bank is "
                         f"{bank_id} (digest {digest[:12]}). Pass --new-bank to score every input "
                         "again with this bank (rows keep bank_id/bank_digest apart), or choose "
                         "another --out")


def scored_index(out: str, runs: Mapping[str, Mapping[str, Any]], digest: str,
                 options: dict[str, Any]) -> np.ndarray:
    """Sorted uint64 `version_keys` of every (uri, input_version) that a committed run in `out`
    scored, or recorded as an error, with the bank `digest`: each run's KEYS_FILE (8 bytes per
    input), or for a run without one, three columns of each of its parts."""
    keys = [np.empty(0, np.uint64)]
    for run_id, manifest in sorted(runs.items()):
        if manifest["bank_digest"] != digest:
            continue  # another bank's rows: not scored by this one
        if manifest.get("input_keys"):
            data = storage.read_bytes(storage.join_uri(out, RUNS_DIR, run_name(run_id),
                                                       manifest["input_keys"]), options)
            keys.append(np.load(io.BytesIO(data), allow_pickle=False).astype(np.uint64))
            continue
        for sub in ("scores", "errors"):
            folder = storage.join_uri(out, sub, run_name(run_id))
            for part in storage.list_files(folder, "part-*.parquet", options):
                table = storage.read_table(part, ["uri", "input_version", "bank_digest"], options)
                rows = table.to_pydict()
                same = [d == digest for d in rows["bank_digest"]]
                keys.append(version_keys([u for u, s in zip(rows["uri"], same) if s],
                                         [v for v, s in zip(rows["input_version"], same) if s]))
    return np.sort(np.concatenate(keys))


def is_scored(keys: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(n,) bool: which `version_keys` are in the sorted `index` (binary search, no set)."""
    if not len(index):
        return np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(index, keys), len(index) - 1)
    return index[at] == keys


def pending_inputs(listing: Sequence[tuple[str, int, str]], index: np.ndarray
                   ) -> list[tuple[str, int, str]]:
    """The listed (uri, size, version) whose (uri, version) is not in the sorted `index`."""
    if not listing:
        return []
    seen = is_scored(version_keys([u for u, _, _ in listing], [v for _, _, v in listing]), index)
    return [item for item, done in zip(listing, seen) if not done]


@dataclass(frozen=True)
class Plan:
    """The inputs one run scores, columnar (numpy StringDType: 16 B + text per row)."""

    uris: np.ndarray  # (n,) sorted, unique: the listed inputs whose version `index` lacks
    versions: np.ndarray  # (n,) input_version of each ("<size>:<ETag or mtime ns>")
    listed: int  # images in the whole listing, pending or not
    first: str  # smallest and largest listed URI: `input_root` of these two is that of every
    last: str  # input (URIs below a folder are contiguous in sorted order)


def plan_inputs(images: str, index: np.ndarray, options: dict[str, Any],
                chunk_size: int = storage.LISTING_CHUNK) -> Plan:
    """Stream the listing of `images` and keep the inputs whose (uri, version) `index` lacks.

    Driver memory while planning: `index` (8 B per scored input) + one listing chunk (about
    chunk_size x 1 KB) + the pending inputs (about 40 B + URI + version text each, twice while
    they are sorted at the end); never a row per already-scored input.
    """
    uris, versions = [], []
    listed, first, last = 0, None, None
    for chunk in storage.iter_image_versions(images, options, chunk_size=chunk_size):
        listed += len(chunk["uri"])
        lo, hi = chunk["uri"].min(), chunk["uri"].max()
        first, last = min(first or lo, lo), max(last or hi, hi)
        todo = ~is_scored(version_keys(chunk["uri"], chunk["version"]), index)
        uris.append(chunk["uri"][todo])
        versions.append(chunk["version"][todo])
    all_uris, all_versions = np.concatenate(uris), np.concatenate(versions)
    del uris, versions
    order = np.argsort(all_uris, kind="stable")
    all_uris, all_versions = all_uris[order], all_versions[order]
    # a URI a manifest lists twice is one input (its first listing)
    once = np.ones(len(all_uris), bool)
    once[1:] = all_uris[1:] != all_uris[:-1]
    return Plan(all_uris[once], all_versions[once], listed, str(first), str(last))


# --------------------------------------------------------------------------- writing a run


def write_shard(folder: OutputFolder, run_id: str, shard: Shard, columns: dict[str, np.ndarray],
                image_threshold: float | None, stamp: Mapping[str, Any],
                versions: Sequence[str]) -> dict[str, Any]:
    """scores/ and errors/ parts of one shard of run `run_id`, then its commit record.

    stamp: bank_id, bank_digest, scored_at (the same on every row of the shard); versions: the
    input_version of each input of the run, by position.
    """
    ok = columns["error"] == ""
    n = len(ok)
    uris = [str(u) for u in columns["uri"]]
    version = [versions[int(p)] for p in columns["position"]]  # position: index in the run's list

    def common(keep: np.ndarray) -> dict[str, tuple[str, Any]]:
        count = int(keep.sum())
        return {"input_version": ("string", [v for v, k in zip(version, keep) if k]),
                "bank_id": ("string", [stamp["bank_id"]] * count),
                "bank_digest": ("string", [stamp["bank_digest"]] * count),
                "scored_at": ("timestamp", [stamp["scored_at"]] * count)}

    storage.write_rows(folder.join(scores_part(run_id, shard)),
                       {**score_rows(columns, ok, image_threshold), **common(ok)}, folder.options)
    errors_uri = folder.join(errors_part(run_id, shard))
    if ok.all():
        storage.remove(errors_uri, folder.options)  # a stale one from an earlier try
    else:
        storage.write_rows(errors_uri, {
            "uri": ("string", [u for u, k in zip(uris, ok) if not k]),
            "error": ("string", [str(e) for e, k in zip(columns["error"], ok) if not k]),
            **common(~ok),
        }, folder.options)
    record: dict[str, Any] = {"inputs": n, "scored": int(ok.sum()), "errors": int((~ok).sum()),
                              "knn": sorted({str(r) for r in columns["knn"] if r})}
    files = {scores_part(run_id, shard): record["scored"]}
    if record["errors"]:
        files[errors_part(run_id, shard)] = record["errors"]
    folder.commit_shard(shard, record, files)
    return record


ScoreShards = Callable[..., Iterator[tuple[Shard, dict[str, np.ndarray]]]]


def run(cfg: ScoreConfig, bank_manifest: dict[str, Any], knn_options: knn.KnnOptions,
        score_shards: ScoreShards, summary: Callable[..., dict[str, Any]]) -> int:
    """One --incremental run of `patchcore score`; returns the exit status (2: too many errors).

    score_shards, summary: jobs.score's scoring stage and kNN summary (passed in: jobs.score
    imports this module).
    """
    options, out = cfg.options, cfg.out
    run_id = cfg.run_id or default_run_id()
    state = storage.join_uri(out, RUNS_DIR, run_name(run_id))
    if storage.is_committed(out, options):
        raise ValueError(f"{out} holds the results of a plain `patchcore score` run (manifest.json "
                         "at its top): --incremental needs a results location of its own; choose "
                         "another --out")
    bank_id, digest = bank_identity(cfg.bank, bank_manifest)
    if storage.is_committed(state, options) and not cfg.overwrite:
        manifest = storage.read_manifest(state, "results", options)
        if manifest["bank_digest"] != digest:
            raise ValueError(f"{out}: run {run_id} was committed with bank {manifest['bank_id']} "
                             f"(digest {manifest['bank_digest'][:12]}), not {bank_id} (digest "
                             f"{digest[:12]}); choose another --run-id for this bank")
        log.info("run %s is already committed in %s; nothing to do (--overwrite redoes it)",
                 run_id, out)
        return 2 if failed(manifest["counts"], cfg.max_failures, "scored") else 0
    spec = ModelSpec.from_json(bank_manifest["spec"])
    image_threshold = bank_manifest["image_threshold"]
    folder = OutputFolder(out, options, state=f"{RUNS_DIR}/{run_name(run_id)}")
    # the lock first: which inputs are new depends on what other runs committed (a dry run writes
    # nothing, so it takes no lock)
    with contextlib.nullcontext() if cfg.dry_run else folder.locked():
        runs = committed_runs(out, options, run_id)
        check_bank(out, runs, bank_id, digest, cfg.new_bank)
        index = scored_index(out, runs, digest, options)
        plan = plan_inputs(cfg.images, index, options)
        root = input_root(cfg.images, [plan.first, plan.last])  # from every input: stable keys
        uris, versions = plan.uris, plan.versions
        keys = OutputKeys(uris, root)
        shards = make_shards(uris, cfg.shard_size)
        log.info("run %s: %d inputs listed, %d already scored with bank %s, %d to score in %d shards",
                 run_id, plan.listed, plan.listed - len(uris), bank_id, len(uris), len(shards))
        identity = {"kind": "results-run", "run_id": run_id, "bank_digest": digest,
                    "inputs": inputs_digest(np.strings.add(np.strings.add(uris, "\n"), versions)),
                    "num_inputs": len(uris), "shard_size": cfg.shard_size, "maps": cfg.maps,
                    "raw_maps": cfg.raw_maps, "max_pixels": cfg.max_pixels,
                    "knn": knn.options_dict(knn_options)}
        if cfg.dry_run:
            log.info("dry run: stopping before any work")
            return 0
        folder.prepare(identity, cfg.overwrite, [f"{sub}/{run_name(run_id)}"
                                                 for sub in ("scores", "errors", "reports")])
        records, pending = folder.resume(shards, lambda s: scores_part(run_id, s))
        stamp = {"bank_id": bank_id, "bank_digest": digest,
                 "scored_at": datetime.datetime.now(datetime.timezone.utc)}
        if pending:
            with cluster.ray_session():
                device = cluster.resolve_device(cfg.device)
                for shard, columns in score_shards(
                    cfg.bank, spec, pending, cfg, device, out=out, maps=cfg.maps,
                    raw_maps=cfg.raw_maps, keys=keys,
                    done_images=sum(len(shards[i].uris) for i in records),
                    total_images=len(uris), knn_options=knn_options,
                ):
                    records[shard.index] = write_shard(folder, run_id, shard, columns,
                                                       image_threshold, stamp, versions)
        counts = {"listed": plan.listed, "already_scored": plan.listed - len(uris),
                  "inputs": len(uris), "scored": sum(r["scored"] for r in records.values()),
                  "errors": sum(r["errors"] for r in records.values())}
        assert counts["inputs"] == counts["scored"] + counts["errors"], counts
        manifest = {
            "run_id": run_id, "bank": storage.normalise_uri(cfg.bank), "bank_id": bank_id,
            "bank_digest": digest, "spec": spec.to_json(), "image_threshold": image_threshold,
            "pixel_threshold": bank_manifest["pixel_threshold"], "images": cfg.images,
            "input_root": root, "counts": counts, "shards": len(shards),
            "maps": {"png": cfg.maps, "mask": cfg.maps, "raw": cfg.raw_maps},
            "map_scale": "png value v = round(clip(map / (2 * pixel_threshold), 0, 1) * 255)",
            "knn": summary(knn_options, [records[i] for i in sorted(records)]),
            "identity": identity, "config": config_dict(cfg),
            "versions": storage.package_versions(),
        }
        # every input of the run is now in scores/ or errors/: its keys make tomorrow's index
        buffer = io.BytesIO()
        np.save(buffer, np.sort(version_keys(uris, versions)))
        storage.write_bytes(storage.join_uri(state, KEYS_FILE), buffer.getvalue(), options)
        manifest["input_keys"] = KEYS_FILE
        manifest["report"] = nightly_report.write(out, run_id, manifest, bank_manifest, options,
                                                  top=cfg.report_top,
                                                  drift_tolerance=cfg.drift_tolerance)
        folder.verify_lock()  # the commit point: only the run holding the location writes it
        storage.write_manifest(state, manifest, kind="results", storage_options=options)
        folder.finish()
        log.info("run %s committed in %s: %s", run_id, out, counts)
        return 2 if failed(counts, cfg.max_failures, "scored") else 0


def check_plain_target(out: str, options: dict[str, Any]) -> None:
    """ValueError when `out` holds --incremental runs: a plain run's scores/part-*.parquet would mix
    with their run=ID partitions."""
    if storage.subfolders(storage.join_uri(out, RUNS_DIR), options):
        raise ValueError(f"{out} holds --incremental runs ({RUNS_DIR}/run=ID); score into it with "
                         "--incremental, or choose another --out")
