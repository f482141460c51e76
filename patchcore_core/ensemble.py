"""Backbone ensembles (paper Table S5, "PatchCore ens."): several members, one score.

Each member is a plain PatchCore (its own backbone, layers and memory bank) on the same
preprocessed input (resize, crop and frame are shared, so every member's map covers the same
pixels). A member's image scores and map pixels are standardised with statistics computed on
nominal calibration images only, z = (s - mean) / std, and the ensemble's score and map are the
mean of its members' z. The authors' code min-max normalises over the test set instead; using
nominal statistics keeps a score independent of the other images in a run (nightly archives
are scored a few at a time), and is what an unlabelled production set can be calibrated on.

Scores of an ensemble are in these standard units: a one-member ensemble gives (s - mean) / std
of the plain model's s, so its ranking, AUROC, thresholds' decisions and masks are the plain
model's. Thresholds are calibrated on the combined nominal scores, as for one model.

An ensemble bank folder: members/<i>-<backbone>/ (each a complete plain bank folder, usable on
its own) and a manifest.json written last whose `ensemble` lists the members with their
statistics; its `spec` is the first member's (every reader that needs resize, crop or frame
finds them there, the same for all members).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from patchcore_core import knn, model, scoring, storage
from patchcore_core.model import PatchCore, Prediction
from patchcore_core.spec import ModelSpec

MEMBERS_DIR = "members"
COMBINATION = (
    "mean over members of z = (s - mean) / std, with each member's mean and std (population) of "
    "its image scores (image score) or of its map pixels (maps) on the nominal calibration images"
)
# the preprocessing every member must share: one decoded tensor feeds them all
SHARED_FIELDS = ("resize", "crop", "frame")


@dataclass(frozen=True)
class MemberStats:
    """Nominal statistics of one member: mean and std of its calibration image scores and of
    all its calibration map pixels (float64, population std)."""

    image_mean: float
    image_std: float
    pixel_mean: float
    pixel_std: float

    def __post_init__(self) -> None:
        for name in ("image_std", "pixel_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"{name} must be a positive number, got {value!r}: the calibration images "
                    "gave one value only; calibrate on >= 2 distinct nominal images "
                    "(a larger --calibration-fraction)"
                )

    @classmethod
    def from_calibration(cls, scores: np.ndarray | torch.Tensor,
                         maps: np.ndarray | torch.Tensor) -> MemberStats:
        """From one member's calibration image scores (n,) and maps (n, S, S)."""
        scores64 = np.asarray(scores, dtype=np.float64).reshape(-1)
        pixels64 = np.asarray(maps, dtype=np.float64).reshape(-1)
        if len(scores64) < 2:
            raise ValueError(
                f"an ensemble needs >= 2 nominal calibration images per member, got {len(scores64)}; "
                "hold out more images (--calibration-fraction) or add training images"
            )
        return cls(float(scores64.mean()), float(scores64.std()), float(pixels64.mean()),
                   float(pixels64.std()))

    def to_json(self) -> dict[str, float]:
        return {"image_mean": self.image_mean, "image_std": self.image_std,
                "pixel_mean": self.pixel_mean, "pixel_std": self.pixel_std}


class Ensemble:
    """Members (plain PatchCore models on one device), their nominal statistics, the names they
    are stored under and the thresholds calibrated on the combined nominal scores."""

    def __init__(self, members: Sequence[PatchCore], stats: Sequence[MemberStats],
                 names: Sequence[str] | None = None, image_threshold: float | None = None,
                 pixel_threshold: float | None = None, info: dict[str, Any] | None = None) -> None:
        if not members or len(members) != len(stats):
            raise ValueError(f"need one MemberStats per member, got {len(members)} members and "
                             f"{len(stats)} stats")
        check_specs([m.spec for m in members])
        self.members = list(members)
        self.stats = list(stats)
        self.names = list(names) if names is not None else member_names([m.spec for m in members])
        self.image_threshold = image_threshold
        self.pixel_threshold = pixel_threshold
        self.info = dict(info or {})

    @property
    def spec(self) -> ModelSpec:
        """The first member's spec: the preprocessing (resize, crop, frame) all members share."""
        return self.members[0].spec

    @property
    def device(self) -> torch.device:
        return self.members[0].device


Model = PatchCore | Ensemble


def check_specs(specs: Sequence[ModelSpec]) -> None:
    """ValueError unless all specs share SHARED_FIELDS (their maps must cover the same pixels)."""
    for field in SHARED_FIELDS:
        values = sorted({str(getattr(s, field)) for s in specs})
        if len(values) > 1:
            raise ValueError(
                f"ensemble members must share --{field} (one preprocessed input feeds every "
                f"member), got {values}; pass one --{field} for all backbones"
            )


def member_names(specs: Sequence[ModelSpec]) -> list[str]:
    """Folder names of the members: '<position>-<backbone>' (unique even for repeated backbones)."""
    return [f"{i}-{spec.backbone}" for i, spec in enumerate(specs)]


def members_of(target: Model) -> list[PatchCore]:
    """The plain models that do the work: the ensemble's members, or the model itself."""
    return target.members if isinstance(target, Ensemble) else [target]


def combine(values: Sequence[torch.Tensor], means: Sequence[float], stds: Sequence[float]
            ) -> torch.Tensor:
    """Mean over members of (value_m - mean_m) / std_m, in float64 (any equal shapes)."""
    total = torch.zeros_like(values[0], dtype=torch.float64)
    for value, mean, std in zip(values, means, stds):
        total += (value.to(torch.float64) - mean) / std
    return total / len(values)


def combine_predictions(predictions: Sequence[Prediction], stats: Sequence[MemberStats]
                        ) -> Prediction:
    """One Prediction from the members' (same images, same crop): standardised, averaged.

    scores by the image statistics; maps and patch_scores by the pixel statistics, the members'
    patch grids resampled (bilinear) to the first member's grid when they differ; max_yx of the
    combined maps.
    """
    scores = combine([p.scores for p in predictions], [s.image_mean for s in stats],
                     [s.image_std for s in stats])
    maps = combine([p.maps for p in predictions], [s.pixel_mean for s in stats],
                   [s.pixel_std for s in stats]).float()
    grid = tuple(predictions[0].patch_scores.shape[1:])
    patch_scores = combine(
        [_resample(p.patch_scores, grid) for p in predictions],
        [s.pixel_mean for s in stats], [s.pixel_std for s in stats]).float()
    size = maps.shape[-1]
    flat_max = maps.reshape(maps.shape[0], -1).argmax(dim=1)
    max_yx = torch.stack([flat_max // size, flat_max % size], dim=1)
    return Prediction(scores=scores, maps=maps, patch_scores=patch_scores, max_yx=max_yx)


def _resample(grids: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(grids.shape[1:]) == size:
        return grids
    return F.interpolate(grids[:, None].float(), size=size, mode="bilinear",
                         align_corners=False)[:, 0]


def predict(target: Model, images: torch.Tensor, *,
            batch_size: int = model.DEFAULT_BATCH_SIZE) -> Prediction:
    """`model.predict` for a plain model; for an ensemble, every member then `combine_predictions`."""
    if not isinstance(target, Ensemble):
        return model.predict(target, images, batch_size=batch_size)
    member_predictions = [model.predict(m, images, batch_size=batch_size) for m in target.members]
    return combine_predictions(member_predictions, target.stats)


def calibrate(members: Sequence[PatchCore], calibration_images: torch.Tensor, target_fpr: float,
              *, batch_size: int = model.DEFAULT_BATCH_SIZE
              ) -> tuple[list[MemberStats], torch.Tensor, float, float]:
    """Member statistics, combined calibration scores (n,) and the image and pixel thresholds
    (`scoring.threshold_for_fpr` of the combined scores and map pixels)."""
    predictions = [model.predict(m, calibration_images, batch_size=batch_size) for m in members]
    stats = [MemberStats.from_calibration(p.scores, p.maps) for p in predictions]
    combined = combine_predictions(predictions, stats)
    return (stats, combined.scores,
            scoring.threshold_for_fpr(combined.scores, target_fpr),
            scoring.threshold_for_fpr(combined.maps.reshape(-1), target_fpr))


def fit(images: torch.Tensor, specs: Sequence[ModelSpec], *, calibration_images: torch.Tensor,
        target_fpr: float = 0.01, device: str | torch.device = "cpu",
        batch_size: int = model.DEFAULT_BATCH_SIZE, **fit_kwargs: Any) -> Ensemble:
    """One `model.fit` per spec on the same nominal images (fit_kwargs: ratio, size, seed,
    projection_dim, image_ids), each member calibrated on `calibration_images` as a plain model,
    then the ensemble's statistics and thresholds on the same nominal images."""
    check_specs(specs)
    members = [model.fit(images, spec, calibration_images=calibration_images,
                         target_fpr=target_fpr, device=device, batch_size=batch_size, **fit_kwargs)
               for spec in specs]
    stats, scores, image_threshold, pixel_threshold = calibrate(
        members, calibration_images, target_fpr, batch_size=batch_size)
    info = {"calibration": {"scores": sorted(float(s) for s in scores.tolist()),
                            "images": int(calibration_images.shape[0]), "target_fpr": target_fpr}}
    return Ensemble(members, stats, image_threshold=image_threshold,
                    pixel_threshold=pixel_threshold, info=info)


def manifest_body(names: Sequence[str], specs: Sequence[ModelSpec], stats: Sequence[MemberStats],
                  member_counts: Sequence[dict[str, Any]], image_threshold: float | None,
                  pixel_threshold: float | None, info: dict[str, Any]) -> dict[str, Any]:
    """The ensemble folder's manifest (before write_manifest adds kind and format version)."""
    return {
        "spec": specs[0].to_json(),
        "ensemble": {
            "combination": COMBINATION,
            "members": [
                {"name": name, "path": f"{MEMBERS_DIR}/{name}", "spec": spec.to_json(),
                 "counts": counts, **stat.to_json()}
                for name, spec, stat, counts in zip(names, specs, stats, member_counts)
            ],
        },
        "counts": {"members": len(names),
                   "num_entries": sum(int(c["num_entries"]) for c in member_counts)},
        "image_threshold": image_threshold,
        "pixel_threshold": pixel_threshold,
        "versions": storage.package_versions(),
        "info": info,
    }


def member_uri(uri: str, name: str) -> str:
    return storage.join_uri(uri, MEMBERS_DIR, name)


def save(target: Model, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write a plain bank folder, or an ensemble folder: each member's bank, then the manifest."""
    if not isinstance(target, Ensemble):
        model.save(target, uri, storage_options)
        return
    storage.remove(storage.join_uri(uri, storage.MANIFEST_NAME), storage_options)
    for name, member in zip(target.names, target.members):
        model.save(member, member_uri(uri, name), storage_options)
    body = manifest_body(
        target.names, [m.spec for m in target.members], target.stats,
        [{"num_entries": m.bank.size, "feature_width": int(m.bank.features.shape[1])}
         for m in target.members],
        target.image_threshold, target.pixel_threshold, target.info)
    storage.write_manifest(uri, body, kind="bank", storage_options=storage_options)


def is_ensemble(manifest: dict[str, Any]) -> bool:
    """Whether a bank manifest describes an ensemble folder."""
    return "ensemble" in manifest


def member_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The ensemble manifest's members (name, path, spec, counts, statistics), in order."""
    return list(manifest["ensemble"]["members"])


def load(uri: str, device: str | torch.device = "cpu",
         storage_options: dict[str, Any] | None = None,
         knn_options: knn.KnnOptions | None = None, threads: int | None = None) -> Model:
    """A plain bank folder -> PatchCore (`model.load`); an ensemble folder -> Ensemble whose
    members are loaded with the same device, kNN options and threads."""
    manifest = storage.read_manifest(uri, "bank", storage_options)
    if not is_ensemble(manifest):
        return model.load(uri, device, storage_options=storage_options, knn_options=knn_options,
                          threads=threads)
    entries = member_entries(manifest)
    members = [model.load(storage.join_uri(uri, e["path"]), device,
                          expected_spec=ModelSpec.from_json(e["spec"]),
                          storage_options=storage_options, knn_options=knn_options,
                          threads=threads)
               for e in entries]
    stats = [MemberStats(e["image_mean"], e["image_std"], e["pixel_mean"], e["pixel_std"])
             for e in entries]
    return Ensemble(members, stats, [e["name"] for e in entries], manifest["image_threshold"],
                    manifest["pixel_threshold"], manifest.get("info"))
