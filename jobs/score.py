"""`patchcore score`: image scores, anomaly maps and masks for many images (paper §3.3, DESIGN.md §4).

Ray Data: a CPU stage decodes, an actor pool holds backbone + bank + kNN index (`--knn`; the engine
each actor runs, and for approximate indexes recall@1 on its first scored patches, go into the
manifest's `knn`) and calls the single-process reference `model.predict`; CPU tasks after the
actors write the per-image files from the crop-space maps (`write_files`: for 2448x2048 inputs
twice the actor's own CPU time with efficientnet_lite0, benchmarks/maps_offload_bench.py, now
off the model actor); the driver writes the small per-shard tables once all of a shard's files
are written. Outputs, with <rel> = the input's path below the input root,
sanitised (`folders.relative_key`), so `maps/good/000.png.png` is the map of `<root>/good/000.png`:

- scores/part-NNNNN.parquet: uri, rel, score (float64, Eq. 7), anomalous (score > the bank's
  image threshold; null when the bank has none), max_y, max_x (the crop-space maximum of the map,
  as the input pixel that contains it, within the pixels the map covers), width, height.
- maps/<rel>.png: 8-bit gray anomaly map at the input's resolution (preprocess.uncrop_map; 0
  outside the crop). Fixed range: value = round(clip(map / (2 * pixel_threshold), 0, 1) * 255),
  so the bank's pixel threshold sits at 127.5 and v stands for v / 255 * 2 * pixel_threshold.
- masks/<rel>.png: 0/255 at the input's resolution, 255 where the map > pixel threshold.
- maps_raw/<rel>.npy (--raw-maps): the (crop, crop) map as scored, rounded to float16.
- errors/part-NNNNN.parquet: uri, error. Invariant: inputs = scored + errors, each once.
With --incremental, runs share one location as Hive partitions run=ID (jobs.incremental).
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jobs import cluster, incremental, logs
from jobs.config import (
    KnnFlags,
    PipelineFlags,
    arg,
    config_dict,
    config_json,
    parse_config,
)
from jobs.folders import (
    RESULT_DIRS,
    OutputFolder,
    OutputKeys,
    Shard,
    errors_file,
    failed,
    input_root,
    inputs_digest,
    make_shards,
    map_uri,
    reuse_committed,
    score_rows,
    scores_file,
)
from jobs.pipeline import stream_shards
from patchcore_core import ensemble, knn, model, preprocess, storage
from patchcore_core.spec import ModelSpec

log = logging.getLogger("jobs.score")

RECALL_IMAGES = 4  # images of an actor's first batch whose patches sample the recall@1 queries


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(incremental.IncrementalFlags, KnnFlags, PipelineFlags):
    """Score images with a PatchCore bank: scores, anomaly maps and masks (PatchCore §3.3)."""

    bank: str = arg("bank folder/URI written by `patchcore fit` or `patchcore coreset`")
    images: str = arg("images: folder/prefix, glob, or .txt/.csv/.parquet manifest of URIs")
    out: str = arg("results folder/URI to write (manifest.json last)")
    maps: bool = arg("write maps/<rel>.png (8-bit) and masks/<rel>.png", True)
    raw_maps: bool = arg("also write maps_raw/<rel>.npy float16 crop-space maps (exact evaluation)",
                         False)

    def __post_init__(self) -> None:
        if not self.bank or not self.images or not self.out:
            raise ValueError("--bank, --images and --out must be non-empty paths or URIs")
        super().__post_init__()  # the pipeline flag checks


def heatmap_pixels(amap: torch.Tensor, pixel_threshold: float) -> np.ndarray:
    """Anomaly map (score units) -> uint8 on the fixed range [0, 2 * pixel_threshold]."""
    scaled = (amap / (2.0 * pixel_threshold)).clamp(0, 1) * 255.0
    return scaled.round().to(torch.uint8).numpy()


def write_files(batch: dict[str, np.ndarray], *, out: str, maps: bool, raw_maps: bool, resize: int,
                crop: int, frame: str, pixel_threshold: float | None, keep_maps: bool,
                storage_options: dict[str, Any]) -> dict[str, np.ndarray]:
    """CPU stage after the score actors: the maps/, masks/ (`maps`) and maps_raw/ (`raw_maps`)
    files of each scored row, from its `map` (crop, crop) float32 in score units and its key,
    width and height; the batch comes back without `map` unless `keep_maps`. Each write is
    whole-file and idempotent, so a retried batch rewrites the same bytes."""
    for i in np.flatnonzero(batch["error"] == ""):
        key, amap = str(batch["key"][i]), torch.from_numpy(batch["map"][i])
        width, height = int(batch["width"][i]), int(batch["height"][i])
        if raw_maps:
            buffer = io.BytesIO()
            np.save(buffer, amap.numpy().astype(np.float16))
            storage.write_bytes(map_uri(out, key, "raw"), buffer.getvalue(), storage_options)
        if maps:
            assert pixel_threshold is not None  # run() refuses --maps without one
            full = preprocess.uncrop_map(amap, width, height, resize, crop, frame=frame)  # (H, W)
            storage.write_bytes(map_uri(out, key, "png"),
                                preprocess.encode_png(heatmap_pixels(full, pixel_threshold)),
                                storage_options)
            mask = np.where((full > pixel_threshold).numpy(), 255, 0).astype(np.uint8)
            storage.write_bytes(map_uri(out, key, "mask"), preprocess.encode_png(mask),
                                storage_options)
    return batch if keep_maps else {k: v for k, v in batch.items() if k != "map"}


class ScoreActor:
    """Ray actor: backbone, bank and kNN index loaded once; batches go through `model.predict`.

    return_maps: add the (B, crop, crop) float32 maps to the output (calibration, and the input
    of `write_files`); knn_options: how the bank is searched (None: exact). Output column `knn`:
    the actor's kNN report as JSON (engine, params, recall on its first scored patches) on every
    row once it has one, else "".
    """

    def __init__(self, bank: str, device: str, return_maps: bool, storage_options: dict[str, Any],
                 threads: int, knn_options: knn.KnnOptions | None = None) -> None:
        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor (stream_shards)
        cluster.keep_freed_memory()  # activations reused batch to batch, not page-faulted in again
        self.knn_options = knn_options if knn_options is not None else knn.KnnOptions()
        # one index per bank (an ensemble: per member), the one --knn asks for, searching on the
        # CPUs Ray reserved for this actor
        self.model = ensemble.load(bank, device, storage_options=storage_options,
                                   knn_options=self.knn_options, threads=threads)
        self.members = ensemble.members_of(self.model)
        for member in self.members:
            if member.index.engine == "torch-cuda-exact":
                log.warning("the installed faiss has no GPU support: exact kNN runs through torch "
                            "on %s", member.device)
            log.info("kNN engine %s", json.dumps(member.index.describe(), sort_keys=True))
        self.knn_report = ""  # JSON, set by the first batch with a readable image
        self.return_maps = return_maps
        self.device = device

    def _measure_knn(self, images: torch.Tensor, uris: Sequence[str]) -> str:
        """The kNN report (JSON): index.describe(), plus for approximate indexes `recall` (see
        knn.measure_recall) on a seeded sample of knn.RECALL_QUERIES patches of `images`
        (B, 3, S, S), the first RECALL_IMAGES of the actor's first readable batch. An ensemble
        reports its members' engines comma-joined, their params by member name, and recall
        summed over members (hits and queries; the distance ratio weighted by queries)."""
        described = [m.index.describe() for m in self.members]
        report: dict[str, Any] = dict(described[0])
        if isinstance(self.model, ensemble.Ensemble):
            report["engine"] = ",".join(sorted({d["engine"] for d in described}))
            report["params"] = {n: d["params"] for n, d in zip(self.model.names, described)}
        if self.members[0].index.method != "exact":
            measured = [self._member_recall(m, images) for m in self.members]
            report["recall"] = {**pooled_recall(measured),
                                "images": [str(u) for u in uris[:RECALL_IMAGES]]}
        return json.dumps(report, sort_keys=True)

    def _member_recall(self, member: model.PatchCore, images: torch.Tensor) -> dict[str, Any]:
        patches = model.embed_images(member.extractor, images[:RECALL_IMAGES], member.spec,
                                     batch_size=RECALL_IMAGES)
        queries = patches.reshape(-1, patches.shape[-1])  # (n * h * w, W)
        generator = torch.Generator().manual_seed(self.knn_options.seed)
        pick = torch.randperm(queries.shape[0], generator=generator)[: knn.RECALL_QUERIES]
        return knn.measure_recall(member.index, queries[pick])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        n, crop = len(ok), self.model.spec.crop
        scores = np.full(n, np.nan, np.float64)
        max_y, max_x = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        maps = np.zeros((n, crop, crop), np.float32) if self.return_maps else None
        rows = np.flatnonzero(ok)
        if len(rows):
            images = torch.from_numpy(batch["image"][rows])
            if not self.knn_report:
                self.knn_report = self._measure_knn(images, [batch["uri"][i] for i in rows])
            prediction = ensemble.predict(self.model, images,
                                          batch_size=cluster.forward_batch(self.device, len(rows)))
            spec = self.model.spec
            for j, i in enumerate(rows):
                width, height = int(batch["width"][i]), int(batch["height"][i])
                scores[i] = float(prediction.scores[j])
                left, top, right, bottom = preprocess.crop_box(width, height, spec.resize, crop,
                                                                 frame=spec.frame)
                max_y[i] = preprocess.input_pixel(int(prediction.max_yx[j, 0]), top, bottom, crop,
                                                  height)
                max_x[i] = preprocess.input_pixel(int(prediction.max_yx[j, 1]), left, right, crop,
                                                  width)
                if maps is not None:
                    maps[i] = prediction.maps[j].numpy()
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update({"score": scores, "max_y": max_y, "max_x": max_x,
                    "knn": np.full(n, self.knn_report, dtype=object)})
        if maps is not None:
            out["map"] = maps
        return out


def _write_shard(folder: OutputFolder, shard: Shard, columns: dict[str, np.ndarray],
                 image_threshold: float | None) -> dict[str, Any]:
    """errors/ and scores/ tables of one shard, then its commit record; returns the record."""
    ok = columns["error"] == ""
    uris = [str(u) for u in columns["uri"]]
    folder.write_errors(shard, [u for u, keep in zip(uris, ok) if not keep],
                        [str(e) for e, keep in zip(columns["error"], ok) if not keep])
    storage.write_rows(folder.join(scores_file(shard)), score_rows(columns, ok, image_threshold),
                       folder.options)
    record: dict[str, Any] = {"inputs": len(uris), "scored": int(ok.sum()),
                              "errors": int((~ok).sum()),
                              "knn": sorted({str(r) for r in columns["knn"] if r})}
    files = {scores_file(shard): record["scored"]}
    if record["errors"]:
        files[errors_file(shard)] = record["errors"]
    folder.commit_shard(shard, record, files)
    return record


def score_shards(
    bank: str, spec: ModelSpec, shards: Sequence[Shard], flags: PipelineFlags, device: str, *,
    out: str | None = None, maps: bool = False, raw_maps: bool = False, return_maps: bool = False,
    keys: Sequence[str] | None = None, label: str = "score", done_images: int = 0,
    total_images: int | None = None, knn_options: knn.KnnOptions | None = None,
    timing: dict[str, Any] | None = None,
) -> Iterator[tuple[Shard, dict[str, np.ndarray]]]:
    """The scoring stage on the connected Ray: each shard's columns once all its rows are scored.

    Columns: uri, error, width, height, score, max_y, max_x, knn (the actors' kNN reports, JSON)
    (+ key, + map (n, crop, crop) float32 with `return_maps`). out: results folder whose map files
    `write_files` tasks write after the actors (needs `keys`, the output keys by input position),
    before the shard is yielded; None writes nothing (fit's calibration). knn_options: how the
    bank is searched (None: exact). timing: start-up and steady-state figures
    (`pipeline.stream_shards`).
    """
    files = out is not None and (maps or raw_maps)
    after_kwargs: dict[str, Any] | None = None
    if files:
        assert out is not None and keys is not None, "map files need --out and the output keys"
        threshold = storage.read_manifest(bank, "bank", flags.options)["pixel_threshold"]
        after_kwargs = {"out": out, "maps": maps, "raw_maps": raw_maps, "resize": spec.resize,
                        "crop": spec.crop, "frame": spec.frame,
                        "pixel_threshold": None if threshold is None else float(threshold),
                        "keep_maps": return_maps, "storage_options": flags.options}
    actor_kwargs = {"bank": bank, "device": device, "return_maps": return_maps or files,
                    "storage_options": flags.options, "knn_options": knn_options}
    extra: Mapping[str, Sequence[Any]] = {"key": keys} if keys is not None else {}
    yield from stream_shards(shards, ScoreActor, actor_kwargs, flags, device=device, spec=spec,
                             label=label, extra=extra, done_images=done_images,
                             total_images=total_images, after=write_files if files else None,
                             after_kwargs=after_kwargs, timing=timing)


def pooled_recall(measured: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several `knn.measure_recall` results as one: hits and queries summed, recall_at_1 =
    hits / queries, distance_ratio_mean weighted by queries (None without queries)."""
    hits, queries = sum(m["hits"] for m in measured), sum(m["num_queries"] for m in measured)
    return {"recall_at_1": hits / queries if queries else None, "hits": hits,
            "num_queries": queries,
            "distance_ratio_mean": (sum(m["distance_ratio_mean"] * m["num_queries"]
                                        for m in measured) / queries if queries else None)}


def knn_summary(options: knn.KnnOptions, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest's `knn`: what --knn asked for and what the actors ran, from the shards' records.

    engine: the engines the actors reported, comma-joined (one, unless actors differed); recall
    (approximate methods): hits and queries summed over every actor's measurement, recall_at_1 =
    hits / num_queries, distance_ratio_mean weighted by queries, and the images sampled.
    """
    reports = [json.loads(text) for text in sorted({t for r in records for t in r.get("knn", [])})]
    summary: dict[str, Any] = {
        "method": options.method,
        "requested": knn.options_dict(options),
        "engine": ",".join(sorted({r["engine"] for r in reports})),
        "params": reports[0]["params"] if reports else None,
        "threads": sorted({r["threads"] for r in reports if r["threads"] is not None}),
        "recall": None,
    }
    measured = [r["recall"] for r in reports if "recall" in r]
    if measured:
        summary["recall"] = {
            **pooled_recall(measured),
            "measurements": len(measured),
            "queries": "up to knn.RECALL_QUERIES seeded patches of the first "
                       f"{RECALL_IMAGES} readable images each actor scored",
            "images": sorted({u for m in measured for u in m["images"]}),
        }
    return summary


def run(cfg: ScoreConfig) -> int:
    """The job; returns the exit status (2 when more inputs failed than --max-failures)."""
    log.info("config %s", config_json(cfg))
    options = cfg.options
    bank_manifest = storage.read_manifest(cfg.bank, "bank", options)  # fail before any work
    spec = ModelSpec.from_json(bank_manifest["spec"])
    image_threshold, pixel_threshold = bank_manifest["image_threshold"], bank_manifest["pixel_threshold"]
    if cfg.maps and not (pixel_threshold or 0) > 0:
        raise ValueError(f"bank {cfg.bank} has pixel threshold {pixel_threshold!r}; maps/ are scaled "
                         "by a positive calibrated pixel threshold, which also defines masks/; use a "
                         "bank from `patchcore fit`, or pass --no-maps (with --raw-maps for "
                         "crop-space maps)")
    if image_threshold is None:
        log.warning("bank %s has no image threshold: the anomalous column will be null", cfg.bank)
    knn_options = cfg.knn_options()
    member_counts = ([e["counts"] for e in ensemble.member_entries(bank_manifest)]
                     if ensemble.is_ensemble(bank_manifest) else [bank_manifest.get("counts", {})])
    for bank_counts in member_counts:  # bad --knn-* fail here, before any work
        if "num_entries" in bank_counts and ("feature_width" in bank_counts
                                              or "embed_dim" in bank_counts):
            num_entries = bank_counts["num_entries"]
            dim = bank_counts.get("feature_width", bank_counts.get("embed_dim"))
            knn_params = knn.ivf_params(knn_options, num_entries, dim)
            log.info("knn %s on a bank of %d x %d: params %s", knn_options.method, num_entries,
                     dim, json.dumps(knn_params, sort_keys=True))
    if cfg.incremental:  # nightly runs into one location: jobs.incremental
        return incremental.run(cfg, bank_manifest, knn_options, score_shards, knn_summary)
    incremental.check_plain_target(cfg.out, options)
    uris = storage.list_images(cfg.images, options)
    root = input_root(cfg.images, uris)
    keys = OutputKeys(uris, root)  # computed when read: no second string per input
    bank_uri = storage.normalise_uri(cfg.bank)  # works from any folder
    identity = {"kind": "results", "bank": bank_uri, "inputs": inputs_digest(uris),
                "num_inputs": len(uris), "shard_size": cfg.shard_size, "maps": cfg.maps,
                "raw_maps": cfg.raw_maps, "max_pixels": cfg.max_pixels,
                "knn": knn.options_dict(knn_options),
                "bank_identity": {k: bank_manifest.get(k) for k in (
                    "spec", "counts", "coverage_radius", "image_threshold", "pixel_threshold")}}
    manifest = reuse_committed(cfg.out, "results", options, overwrite=cfg.overwrite, identity=identity)
    if manifest is not None:
        return 2 if failed(manifest["counts"], cfg.max_failures, "scored") else 0
    shards = make_shards(uris, cfg.shard_size)
    log.info("score %d images under %s with bank %s into %d shards at %s",
             len(uris), root, cfg.bank, len(shards), cfg.out)
    if cfg.dry_run:
        log.info("dry run: stopping before any work")
        return 0
    folder = OutputFolder(cfg.out, options)
    with folder.locked():  # a second run into the same --out stops here (FolderLockedError)
        folder.prepare(identity, cfg.overwrite, RESULT_DIRS)
        records, pending = folder.resume(shards, scores_file)
        reported: set[str] = set()
        timing: dict[str, Any] = {}
        started = time.monotonic()
        if pending:  # else every shard is committed and only the manifest is missing
            with cluster.ray_session():
                device = cluster.resolve_device(cfg.device)
                for shard, columns in score_shards(
                    cfg.bank, spec, pending, cfg, device, out=cfg.out, maps=cfg.maps,
                    raw_maps=cfg.raw_maps, keys=keys,
                    done_images=sum(len(shards[i].uris) for i in records), total_images=len(uris),
                    knn_options=knn_options, timing=timing,
                ):
                    records[shard.index] = _write_shard(folder, shard, columns, image_threshold)
                    for text in records[shard.index]["knn"]:
                        if text not in reported:  # each actor's report once
                            reported.add(text)
                            log.info("knn report of an actor: %s", text)
        counts = {"inputs": len(uris), "scored": sum(r["scored"] for r in records.values()),
                  "errors": sum(r["errors"] for r in records.values())}
        assert counts["inputs"] == counts["scored"] + counts["errors"], counts
        manifest = {
            "bank": bank_uri,
            "spec": spec.to_json(),
            "image_threshold": image_threshold,
            "pixel_threshold": pixel_threshold,
            "images": cfg.images,
            "input_root": root,
            "counts": counts,
            "shards": len(shards),
            "maps": {"png": cfg.maps, "mask": cfg.maps, "raw": cfg.raw_maps},
            "map_scale": "png value v = round(clip(map / (2 * pixel_threshold), 0, 1) * 255)",
            "knn": knn_summary(knn_options, [records[i] for i in sorted(records)]),
            # this invocation's figures (a resumed run: the part it did); start-up apart
            "timing": {"wall_s": time.monotonic() - started, **timing},
            "identity": identity,
            "config": config_dict(cfg),
            "versions": storage.package_versions(),
        }
        folder.verify_lock()  # the commit point: only the run holding the folder writes it
        storage.write_manifest(cfg.out, manifest, kind="results", storage_options=options)
        folder.finish()
        log.info("results %s committed: %s; knn %s", cfg.out, counts,
                 json.dumps(manifest["knn"], sort_keys=True))
        return 2 if failed(counts, cfg.max_failures, "scored") else 0


def main(argv: Sequence[str] | None = None) -> None:
    logs.setup_logging()
    status = run(parse_config(ScoreConfig, argv, prog="patchcore score"))
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
