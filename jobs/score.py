"""`patchcore score`: image scores, anomaly maps and masks for many images (paper §3.3, DESIGN.md §4).

Ray Data: a CPU stage decodes, an actor pool holds backbone + bank + exact kNN index and calls the
single-process reference `model.predict`. Actors write the per-image files; the driver writes the
small per-shard tables. Outputs, with <rel> = the input's path below the input root, sanitised
(`_shards.relative_key`), so `maps/good/000.png.png` is the map of `<root>/good/000.png`:

- scores/part-NNNNN.parquet: uri, rel, score (float64, Eq. 7), anomalous (score > the bank's
  image threshold; null when the bank has none), max_y, max_x (the crop-space maximum of the map,
  as the input pixel that contains it, within the pixels the map covers), width, height.
- maps/<rel>.png: 8-bit gray anomaly map at the input's resolution (preprocess.uncrop_map; 0
  outside the crop). Fixed range: value = round(clip(map / (2 * pixel_threshold), 0, 1) * 255),
  so the bank's pixel threshold sits at 127.5 and v stands for v / 255 * 2 * pixel_threshold.
- masks/<rel>.png: 0/255 at the input's resolution, 255 where the map > pixel threshold.
- maps_raw/<rel>.npy (--raw-maps): the (crop, crop) map as scored, rounded to float16.
- errors/part-NNNNN.parquet: uri, error. Invariant: inputs = scored + errors, each once.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from jobs import _cli, _ray
from jobs._shards import (
    OutputFolder,
    PipelineFlags,
    Shard,
    check_pipeline_flags,
    failed,
    input_root,
    inputs_digest,
    make_shards,
    relative_key,
    resolve_device,
    stream_shards,
)
from patchcore_core import model, preprocess, storage
from patchcore_core.spec import ModelSpec

log = logging.getLogger("jobs.score")

# kind -> (subfolder, suffix appended to <rel>)
MAP_KINDS = {"png": ("maps", ".png"), "mask": ("masks", ".png"), "raw": ("maps_raw", ".npy")}
DATA_DIRS = ("scores", "errors", "maps", "masks", "maps_raw")


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(PipelineFlags):
    """Score images with a PatchCore bank: scores, anomaly maps and masks (PatchCore §3.3)."""

    bank: str = _cli.arg("bank folder/URI written by `patchcore fit` or `patchcore coreset`")
    images: str = _cli.arg("images: folder/prefix, glob, or .txt/.csv/.parquet manifest of URIs")
    out: str = _cli.arg("results folder/URI to write (manifest.json last)")
    maps: bool = _cli.arg("write maps/<rel>.png (8-bit) and masks/<rel>.png", True)
    raw_maps: bool = _cli.arg("also write maps_raw/<rel>.npy float16 crop-space maps (exact evaluation)",
                              False)

    def __post_init__(self) -> None:
        if not self.bank or not self.images or not self.out:
            raise ValueError("--bank, --images and --out must be non-empty paths or URIs")
        check_pipeline_flags(self)


def map_uri(folder: str, manifest: dict[str, Any], uri: str, kind: str) -> str:
    """Where a results folder keeps the `kind` ("png", "mask" or "raw") map of input `uri`."""
    if kind not in MAP_KINDS:
        raise ValueError(f"map kind must be one of {sorted(MAP_KINDS)}, got {kind!r}")
    sub, suffix = MAP_KINDS[kind]
    return storage.join_uri(folder, sub, relative_key(uri, manifest["input_root"]) + suffix)


def _png(pixels: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes (8-bit gray)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def heatmap_pixels(amap: torch.Tensor, pixel_threshold: float) -> np.ndarray:
    """Anomaly map (score units) -> uint8 on the fixed range [0, 2 * pixel_threshold]."""
    scaled = (amap / (2.0 * pixel_threshold)).clamp(0, 1) * 255.0
    return scaled.round().to(torch.uint8).numpy()


def input_pixel(index: int, low: float, high: float, crop: int, size: int) -> int:
    """Input-pixel index holding the centre of crop pixel `index` (the crop spans [low, high) in
    input pixels), kept among the pixels that `preprocess.uncrop_map` covers (centre in the box)."""
    centre = low + (index + 0.5) * (high - low) / crop
    first, last = math.ceil(low - 0.5), math.ceil(high - 0.5) - 1
    return min(max(int(math.floor(centre)), first, 0), last, size - 1)


class ScoreActor:
    """Ray actor: backbone, bank and kNN index loaded once; batches go through `model.predict`.

    out: results folder whose map files this actor writes (None: write nothing, e.g. calibration);
    return_maps: add the (B, crop, crop) float32 maps to the output (calibration).
    """

    def __init__(self, bank: str, device: str, out: str | None, maps: bool, raw_maps: bool,
                 return_maps: bool, storage_options: dict[str, Any], threads: int) -> None:
        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor (stream_shards)
        _ray.keep_freed_memory()  # activations reused batch to batch, not page-faulted in again
        self.model = model.load(bank, device, storage_options=storage_options)
        self.out, self.maps, self.raw_maps = out, maps, raw_maps
        self.return_maps = return_maps
        self.options = storage_options

    def _write_files(self, key: str, amap: torch.Tensor, width: int, height: int) -> None:
        """maps/, masks/ and maps_raw/ files of one image; each write is whole-file and idempotent."""
        spec, bank = self.model.spec, self.model.bank
        if self.raw_maps:
            buffer = io.BytesIO()
            np.save(buffer, amap.numpy().astype(np.float16))
            storage.write_bytes(storage.join_uri(self.out, "maps_raw", key + ".npy"),
                                buffer.getvalue(), self.options)
        if self.maps:
            full = preprocess.uncrop_map(amap, width, height, spec.resize, spec.crop,
                                         frame=spec.frame)  # (H, W)
            threshold = float(bank.pixel_threshold)
            storage.write_bytes(storage.join_uri(self.out, "maps", key + ".png"),
                                _png(heatmap_pixels(full, threshold)), self.options)
            mask = np.where((full > threshold).numpy(), 255, 0).astype(np.uint8)
            storage.write_bytes(storage.join_uri(self.out, "masks", key + ".png"), _png(mask),
                                self.options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        n, crop = len(ok), self.model.spec.crop
        scores = np.full(n, np.nan, np.float64)
        max_y, max_x = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        maps = np.zeros((n, crop, crop), np.float32) if self.return_maps else None
        rows = np.flatnonzero(ok)
        if len(rows):
            prediction = model.predict(self.model, torch.from_numpy(batch["image"][rows]),
                                       batch_size=len(rows))
            spec = self.model.spec
            for j, i in enumerate(rows):
                width, height = int(batch["width"][i]), int(batch["height"][i])
                scores[i] = float(prediction.scores[j])
                left, top, right, bottom = preprocess.crop_box(width, height, spec.resize, crop,
                                                                 frame=spec.frame)
                max_y[i] = input_pixel(int(prediction.max_yx[j, 0]), top, bottom, crop, height)
                max_x[i] = input_pixel(int(prediction.max_yx[j, 1]), left, right, crop, width)
                if self.out is not None:
                    self._write_files(str(batch["key"][i]), prediction.maps[j], width, height)
                if maps is not None:
                    maps[i] = prediction.maps[j].numpy()
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update({"score": scores, "max_y": max_y, "max_x": max_x})
        if maps is not None:
            out["map"] = maps
        return out


def _write_shard(folder: OutputFolder, shard: Shard, columns: dict[str, np.ndarray],
                 image_threshold: float | None) -> dict[str, int]:
    """errors/ and scores/ tables of one shard, then its commit record; returns the record."""
    ok = columns["error"] == ""
    uris = [str(u) for u in columns["uri"]]
    folder.write_errors(shard, [u for u, keep in zip(uris, ok) if not keep],
                        [str(e) for e, keep in zip(columns["error"], ok) if not keep])
    scores = columns["score"][ok].astype(np.float64)
    anomalous = (pa.array(scores > image_threshold, pa.bool_()) if image_threshold is not None
                 else pa.nulls(len(scores), pa.bool_()))
    table = pa.table({
        "uri": pa.array([u for u, keep in zip(uris, ok) if keep], pa.string()),
        "rel": pa.array([str(k) for k, keep in zip(columns["key"], ok) if keep], pa.string()),
        "score": pa.array(scores, pa.float64()),
        "anomalous": anomalous,
        "max_y": pa.array(columns["max_y"][ok], pa.int32()),
        "max_x": pa.array(columns["max_x"][ok], pa.int32()),
        "width": pa.array(columns["width"][ok], pa.int32()),
        "height": pa.array(columns["height"][ok], pa.int32()),
    })
    scores_file = f"scores/{shard.name}.parquet"
    storage.write_table(folder.join(scores_file), table, folder.options)
    record = {"inputs": len(uris), "scored": int(ok.sum()), "errors": int((~ok).sum())}
    files = {scores_file: record["scored"]}
    if record["errors"]:
        files[f"errors/{shard.name}.parquet"] = record["errors"]
    folder.commit_shard(shard, record, files)
    return record


def _absolute(uri: str) -> str:
    """Local paths made absolute so that the manifest's bank reference works from any folder."""
    return uri if "://" in uri else os.path.abspath(uri)


def run(cfg: ScoreConfig) -> int:
    """The job; returns the exit status (2 when more inputs failed than --max-failures)."""
    log.info("config %s", _cli.config_json(cfg))
    options = _cli.parse_storage_options(cfg.storage_options)
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
    uris = storage.list_images(cfg.images, options)
    root = input_root(cfg.images, uris)
    keys = [relative_key(u, root) for u in uris]
    identity = {"kind": "results", "bank": _absolute(cfg.bank), "inputs": inputs_digest(uris),
                "num_inputs": len(uris), "shard_size": cfg.shard_size, "maps": cfg.maps,
                "raw_maps": cfg.raw_maps, "max_pixels": cfg.max_pixels,
                "bank_identity": {k: bank_manifest.get(k) for k in (
                    "spec", "counts", "coverage_radius", "image_threshold", "pixel_threshold")}}
    folder = OutputFolder(cfg.out, options)
    if folder.is_committed() and not cfg.overwrite:
        manifest = storage.read_manifest(cfg.out, "results", options)
        if manifest.get("identity") != identity:
            raise ValueError(f"results {cfg.out} are committed for other inputs, bank or settings; "
                             "pass --overwrite to replace them, or choose another --out")
        log.info("results %s are already committed; nothing to do (--overwrite redoes them)", cfg.out)
        return 2 if failed(manifest["counts"], cfg.max_failures, "scored") else 0
    shards = make_shards(uris, cfg.shard_size)
    log.info("score %d images under %s with bank %s into %d shards at %s",
             len(uris), root, cfg.bank, len(shards), cfg.out)
    if cfg.dry_run:
        log.info("dry run: stopping before any work")
        return 0
    with folder.locked():  # a second run into the same --out stops here (FolderLockedError)
        folder.prepare(identity, cfg.overwrite, DATA_DIRS)
        records, pending = folder.resume(shards, lambda s: f"scores/{s.name}.parquet")
        if pending:  # else every shard is committed and only the manifest is missing
            with _ray.ray_session():
                device = resolve_device(cfg.device)
                actor_kwargs = {"bank": cfg.bank, "device": device, "out": cfg.out,
                                "maps": cfg.maps, "raw_maps": cfg.raw_maps, "return_maps": False,
                                "storage_options": options}
                for shard, columns in stream_shards(
                    pending, ScoreActor, actor_kwargs, cfg, device=device, resize=spec.resize,
                    crop=spec.crop, frame=spec.frame, label="score", extra={"key": keys},
                    done_images=sum(len(shards[i].uris) for i in records),
                    total_images=len(uris),
                ):
                    records[shard.index] = _write_shard(folder, shard, columns, image_threshold)
        counts = {"inputs": len(uris), "scored": sum(r["scored"] for r in records.values()),
                  "errors": sum(r["errors"] for r in records.values())}
        assert counts["inputs"] == counts["scored"] + counts["errors"], counts
        manifest = {
            "bank": _absolute(cfg.bank),
            "spec": spec.to_json(),
            "image_threshold": image_threshold,
            "pixel_threshold": pixel_threshold,
            "images": cfg.images,
            "input_root": root,
            "counts": counts,
            "shards": len(shards),
            "maps": {"png": cfg.maps, "mask": cfg.maps, "raw": cfg.raw_maps},
            "map_scale": "png value v = round(clip(map / (2 * pixel_threshold), 0, 1) * 255)",
            "identity": identity,
            "config": _cli.config_dict(cfg),
            "versions": storage.package_versions(),
        }
        folder.verify_lock()  # the commit point: only the run holding the folder writes it
        storage.write_manifest(cfg.out, manifest, kind="results", storage_options=options)
        folder.finish()
        log.info("results %s committed: %s", cfg.out, counts)
        return 2 if failed(counts, cfg.max_failures, "scored") else 0


def main(argv: Sequence[str] | None = None) -> None:
    _ray.setup_logging()
    status = run(_cli.parse_config(ScoreConfig, argv, prog="patchcore score"))
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
