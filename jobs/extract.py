"""`patchcore extract`: locally aware patch features (paper §3.1) of many images into a feature store.

Ray Data: a CPU stage decodes and resizes, an actor pool holds the backbone and calls the
single-process reference (`model.embed_images`). The driver collects each input shard's features
and writes `part-NNNNN.parquet` (one row per patch: image_id, y, x, feature; DESIGN.md §4).
Trade-off: collecting on the driver keeps one file per input shard with rows in input order (the
global patch order the coreset's tie-break uses) at the cost of moving B*h*w*D float16 values
(1.6 MB per 224 px WRN50 image) through it; shards are written as soon as they complete.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jobs import cluster, logs
from jobs.config import ModelFlags, PipelineFlags, arg, config_dict, config_json, parse_config
from jobs.folders import OutputFolder, Shard, failed, inputs_digest, make_shards, reuse_committed
from jobs.pipeline import stream_shards
from patchcore_core import backbone, features, model, storage
from patchcore_core.spec import ModelSpec

log = logging.getLogger("jobs.extract")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(PipelineFlags, ModelFlags):
    """Extract patch features of images into a sharded Parquet feature store (PatchCore §3.1)."""

    train: str = arg("images: folder/prefix, glob, or .txt/.csv/.parquet manifest of URIs")
    out: str = arg("feature store folder/URI to write (manifest.json last)")

    def __post_init__(self) -> None:
        if not self.train or not self.out:
            raise ValueError("--train and --out must be non-empty paths or URIs")
        super().__post_init__()  # the model and pipeline flag checks


class FeatureActor:
    """Ray actor: one backbone per worker, loaded once; batches go through `model.embed_images`."""

    def __init__(self, spec: dict[str, Any], device: str, feature_dtype: str, threads: int) -> None:
        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor (stream_shards)
        cluster.keep_freed_memory()  # activations reused batch to batch, not page-faulted in again
        self.spec = ModelSpec.from_json(spec)
        self.extractor = backbone.load_backbone(self.spec, device)
        self.dtype = storage.FEATURE_DTYPES[feature_dtype][0]
        probe = torch.zeros(1, 3, self.spec.crop, self.spec.crop)
        # grid (h, w) and stored width W (embed_dim, or r for low-rank specs) as embedding gives them
        _, h, w, width = model.embed_images(self.extractor, probe, self.spec).shape
        self.grid, self.width = (h, w), width
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        h, w = self.grid
        kept = {k: v for k, v in batch.items() if k != "image"}  # images are not needed downstream
        if ok.all():  # the usual case: one cast of the (B, h, w, D) features, no other copy
            images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))
            feats = model.embed_images(self.extractor, images, self.spec,
                                      cluster.forward_batch(self.device, len(ok)))
            return {**kept, "features": feats.to(self.dtype).numpy()}
        # (B, h, w, W); rows of failed inputs stay zero and are dropped by the driver
        out = torch.zeros(len(ok), h, w, self.width, dtype=self.dtype)
        if ok.any():
            images = torch.from_numpy(batch["image"][ok])
            feats = model.embed_images(self.extractor, images, self.spec,
                                      cluster.forward_batch(self.device, int(ok.sum())))
            out[torch.from_numpy(ok)] = feats.to(self.dtype)
        return {**kept, "features": out.numpy()}


def _write_shard(folder: OutputFolder, shard: Shard, columns: dict[str, np.ndarray], dtype: str) -> dict:
    """Feature shard part-NNNNN.parquet (+ errors), then its commit record; returns the record."""
    ok = columns["error"] == ""
    uris = [str(u) for u in columns["uri"]]
    good = [u for u, keep in zip(uris, ok) if keep]
    # (n, h, w, D) in the store's dtype: widening 1.6 MB/image of float16 to float32 here only for
    # write_feature_shard to narrow it again would cost driver time and a second copy of the shard
    stored = columns["features"] if ok.all() else columns["features"][ok]
    feats = torch.from_numpy(np.require(stored, requirements=["C", "W"]))  # (n, h, w, D)
    row_ids, ys, xs, flat = model.flatten_patches(feats, good)
    folder.write_errors(shard, [u for u, keep in zip(uris, ok) if not keep],
                        [str(e) for e, keep in zip(columns["error"], ok) if not keep])
    storage.write_feature_shard(folder.join(f"{shard.name}.parquet"), row_ids, ys, xs, flat,
                                dtype, folder.options)
    record = {"file": f"{shard.name}.parquet", "rows": int(flat.shape[0]), "images": len(good),
              "errors": int((~ok).sum()), "grid": [int(feats.shape[1]), int(feats.shape[2])]}
    folder.commit_shard(shard, record)
    return record


def extract_images(
    uris: Sequence[str], out: str, spec: ModelSpec, flags: PipelineFlags, *,
    feature_dtype: str, inputs: str, config: dict[str, Any],
) -> dict[str, Any] | None:
    """Write the feature store of `uris` (sorted) into `out`; returns its manifest (None: dry run).

    A committed store with the same spec and inputs is reused as it is (unless flags.overwrite).
    inputs: what the user passed (recorded); config: JSON-able settings recorded in the manifest.
    """
    options = flags.options
    folder = OutputFolder(out, options)
    identity = {"kind": "features", "spec": spec.to_json(), "inputs": inputs_digest(uris),
                "num_inputs": len(uris), "shard_size": flags.shard_size,
                "feature_dtype": feature_dtype, "max_pixels": flags.max_pixels}
    manifest = reuse_committed(out, "features", options, overwrite=flags.overwrite, identity=identity)
    if manifest is not None:
        return manifest
    shards = make_shards(uris, flags.shard_size)
    log.info("extract %d images (%s) into %d shards of <= %d at %s", len(uris), inputs,
             len(shards), flags.shard_size, out)
    if flags.dry_run:
        log.info("dry run: stopping before any work")
        return None
    folder.prepare(identity, flags.overwrite, ["part-*.parquet", "errors"])
    records, pending = folder.resume(shards, lambda s: f"{s.name}.parquet")
    if pending:  # else every shard is committed and only the manifest is missing
        with cluster.ray_session():
            device = cluster.resolve_device(flags.device)
            for shard, columns in stream_shards(
                pending, FeatureActor,
                {"spec": spec.to_json(), "device": device, "feature_dtype": feature_dtype},
                flags, device=device, spec=spec, label="extract",
                done_images=sum(len(shards[i].uris) for i in records), total_images=len(uris),
            ):
                records[shard.index] = _write_shard(folder, shard, columns, feature_dtype)
    ordered = [records[s.index] for s in shards]
    grids = {tuple(r["grid"]) for r in ordered if r["images"]}
    manifest = {
        "spec": spec.to_json(),
        "embed_dim": spec.embed_dim,
        "feature_width": features.feature_width(spec),  # columns of `feature`: D, or r if low-rank
        "dtype": feature_dtype,
        "grid": list(grids.pop()) if grids else None,
        "shards": [{"file": r["file"], "rows": r["rows"], "images": r["images"], "errors": r["errors"]}
                   for r in ordered],
        "errors": [f"errors/{s.name}.parquet" for s, r in zip(shards, ordered) if r["errors"]],
        "counts": {"inputs": len(uris), "extracted": sum(r["images"] for r in ordered),
                   "errors": sum(r["errors"] for r in ordered),
                   "patches": sum(r["rows"] for r in ordered)},
        "inputs": inputs,
        "identity": identity,
        "config": config,
        "versions": storage.package_versions(),
    }
    storage.write_manifest(out, manifest, kind="features", storage_options=options)
    folder.finish()
    log.info("feature store %s committed: %s", out, manifest["counts"])
    return manifest


def run(cfg: ExtractConfig) -> int:
    """The job; returns the exit status (2 when more inputs failed than --max-failures)."""
    log.info("config %s", config_json(cfg))
    uris = storage.list_images(cfg.train, cfg.options)
    manifest = extract_images(uris, cfg.out, cfg.model_spec(), cfg, feature_dtype=cfg.feature_dtype,
                              inputs=cfg.train, config=config_dict(cfg))
    if manifest is None:
        return 0
    return 2 if failed(manifest["counts"], cfg.max_failures, "extracted") else 0


def main(argv: Sequence[str] | None = None) -> None:
    logs.setup_logging()
    status = run(parse_config(ExtractConfig, argv, prog="patchcore extract"))
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
