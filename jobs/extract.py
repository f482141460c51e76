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

from jobs import _cli, _ray
from jobs._shards import (
    OutputFolder,
    PipelineFlags,
    Shard,
    check_pipeline_flags,
    failed,
    inputs_digest,
    make_shards,
    resolve_device,
    stream_shards,
)
from patchcore_core import backbone, model, storage
from patchcore_core.spec import ModelSpec, default_layers, parse_layers

log = logging.getLogger("jobs.extract")

FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_SPEC_DEFAULTS = ModelSpec  # class attributes hold the field defaults


@dataclass(frozen=True, kw_only=True)
class ModelFlags:
    """The model flags of DESIGN.md §5 (base of the extract and fit configs)."""

    backbone: str = _cli.arg("wide_resnet50_2|wide_resnet101_2|resnet18|resnet50|efficientnet_lite0",
                             _SPEC_DEFAULTS.backbone)
    weights: str = _cli.arg("default (standard ImageNet weights) | none (random, tests) | URI of a "
                            "state dict", _SPEC_DEFAULTS.weights)
    layers: str = _cli.arg("comma-separated backbone stages; '' = the backbone's default", "")
    resize: int = _cli.arg("shorter side in px before the centre crop", _SPEC_DEFAULTS.resize)
    crop: int = _cli.arg("square crop in px fed to the backbone", _SPEC_DEFAULTS.crop)
    patch_size: int = _cli.arg("p of the p x p neighbourhood aggregation", _SPEC_DEFAULTS.patch_size)
    embed_dim: int = _cli.arg("width D of a patch embedding", _SPEC_DEFAULTS.embed_dim)
    reweight_neighbors: int = _cli.arg("b of Eq. 7 (1 = plain max patch distance)",
                                       _SPEC_DEFAULTS.reweight_neighbors)
    sigma: float = _cli.arg("Gaussian smoothing of anomaly maps in crop px (0 = none)",
                            _SPEC_DEFAULTS.sigma)
    aggregation: str = _cli.arg("paper (per-channel p x p local average, paper §3.1) | authors (the "
                                "reference code's unfold + adaptive pool)", _SPEC_DEFAULTS.aggregation)
    frame: str = _cli.arg("crop (resize + centre crop, the paper's protocol; the border outside the "
                          "crop is not inspected) | full (the whole input resized to crop x crop)",
                          _SPEC_DEFAULTS.frame)
    feature_dtype: str = _cli.arg("float16|float32 values in the feature store", "float16")

    def model_spec(self) -> ModelSpec:
        """The ModelSpec these flags describe (raises ValueError on a bad combination)."""
        layers = parse_layers(self.layers) if self.layers else default_layers(self.backbone)
        return ModelSpec(
            backbone=self.backbone, weights=self.weights, layers=layers, resize=self.resize,
            crop=self.crop, patch_size=self.patch_size, embed_dim=self.embed_dim,
            reweight_neighbors=self.reweight_neighbors, sigma=self.sigma,
            aggregation=self.aggregation, frame=self.frame,
        )


def check_model_flags(cfg: ModelFlags) -> None:
    if cfg.feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}, "
                         f"got {cfg.feature_dtype!r}")
    cfg.model_spec()


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(PipelineFlags, ModelFlags):
    """Extract patch features of images into a sharded Parquet feature store (PatchCore §3.1)."""

    train: str = _cli.arg("images: folder/prefix, glob, or .txt/.csv/.parquet manifest of URIs")
    out: str = _cli.arg("feature store folder/URI to write (manifest.json last)")

    def __post_init__(self) -> None:
        if not self.train or not self.out:
            raise ValueError("--train and --out must be non-empty paths or URIs")
        check_model_flags(self)
        check_pipeline_flags(self)


class FeatureActor:
    """Ray actor: one backbone per worker, loaded once; batches go through `model.embed_images`."""

    def __init__(self, spec: dict[str, Any], device: str, feature_dtype: str, threads: int) -> None:
        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor (stream_shards)
        _ray.keep_freed_memory()  # activations reused batch to batch, not page-faulted in again
        self.spec = ModelSpec.from_json(spec)
        self.extractor = backbone.load_backbone(self.spec, device)
        self.dtype = FEATURE_DTYPES[feature_dtype]
        probe = torch.zeros(1, 3, self.spec.crop, self.spec.crop)
        self.grid = tuple(model.embed_images(self.extractor, probe, self.spec).shape[1:3])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        h, w = self.grid
        kept = {k: v for k, v in batch.items() if k != "image"}  # images are not needed downstream
        if ok.all():  # the usual case: one cast of the (B, h, w, D) features, no other copy
            images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))
            feats = model.embed_images(self.extractor, images, self.spec, len(ok))
            return {**kept, "features": feats.to(self.dtype).numpy()}
        # (B, h, w, D); rows of failed inputs stay zero and are dropped by the driver
        out = torch.zeros(len(ok), h, w, self.spec.embed_dim, dtype=self.dtype)
        if ok.any():
            images = torch.from_numpy(batch["image"][ok])
            feats = model.embed_images(self.extractor, images, self.spec, int(ok.sum()))
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
    options = _cli.parse_storage_options(flags.storage_options)
    folder = OutputFolder(out, options)
    identity = {"kind": "features", "spec": spec.to_json(), "inputs": inputs_digest(uris),
                "num_inputs": len(uris), "shard_size": flags.shard_size,
                "feature_dtype": feature_dtype, "max_pixels": flags.max_pixels}
    if folder.is_committed() and not flags.overwrite:
        manifest = storage.read_manifest(out, "features", options)
        if manifest.get("identity") != identity:
            raise ValueError(f"feature store {out} is committed with other inputs or settings; "
                             "pass --overwrite to rebuild it, or choose another --out")
        log.info("feature store %s is already committed; nothing to do (--overwrite rebuilds it)", out)
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
        with _ray.ray_session():
            device = resolve_device(flags.device)
            for shard, columns in stream_shards(
                pending, FeatureActor,
                {"spec": spec.to_json(), "device": device, "feature_dtype": feature_dtype},
                flags, device=device, resize=spec.resize, crop=spec.crop, frame=spec.frame,
                label="extract",
                done_images=sum(len(shards[i].uris) for i in records), total_images=len(uris),
            ):
                records[shard.index] = _write_shard(folder, shard, columns, feature_dtype)
    ordered = [records[s.index] for s in shards]
    grids = {tuple(r["grid"]) for r in ordered if r["images"]}
    manifest = {
        "spec": spec.to_json(),
        "embed_dim": spec.embed_dim,
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
    log.info("config %s", _cli.config_json(cfg))
    options = _cli.parse_storage_options(cfg.storage_options)
    uris = storage.list_images(cfg.train, options)
    manifest = extract_images(uris, cfg.out, cfg.model_spec(), cfg, feature_dtype=cfg.feature_dtype,
                              inputs=cfg.train, config=_cli.config_dict(cfg))
    if manifest is None:
        return 0
    return 2 if failed(manifest["counts"], cfg.max_failures, "extracted") else 0


def main(argv: Sequence[str] | None = None) -> None:
    _ray.setup_logging()
    status = run(_cli.parse_config(ExtractConfig, argv, prog="patchcore extract"))
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
