"""Single-process PatchCore fit and predict (paper §3): the reference all distributed jobs match.

Owns the order of the steps (embed -> project -> greedy coreset -> bank; embed -> kNN -> Eq. 7 ->
maps); the maths lives in features, coreset, knn and scoring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from patchcore_core import backbone, coreset, features, knn, preprocess, scoring, storage
from patchcore_core.bank import Bank
from patchcore_core.spec import ModelSpec

DEFAULT_BATCH_SIZE = 16


class PatchCore:
    """A fitted model on one device: backbone, memory bank and its exact kNN index (resources)."""

    def __init__(
        self,
        bank: Bank,
        device: str | torch.device = "cpu",
        extractor: backbone.FeatureExtractor | None = None,
        knn_options: knn.KnnOptions | None = None,
        threads: int | None = None,
    ) -> None:
        """knn_options: how the bank is searched (None: exact); threads: faiss CPU threads for
        the index (None: faiss' default; jobs pass the CPUs Ray reserved for the actor)."""
        self.device = backbone.resolve_device(device) if isinstance(device, str) else device
        self.bank = bank
        self.extractor = (
            extractor if extractor is not None else backbone.load_backbone(bank.spec, self.device)
        )
        self.index = knn.build_index(bank.features, self.device, knn_options, threads=threads)

    @property
    def spec(self) -> ModelSpec:
        return self.bank.spec


@dataclass(frozen=True, eq=False)
class Prediction:
    """Output of `predict` for B images.

    scores: (B,) float64 image scores (Eq. 7). maps: (B, S, S) float32 anomaly maps, crop pixels.
    patch_scores: (B, h, w) float32 Euclidean patch distances.
    max_yx: (B, 2) int64 (row, col) of each map's maximum, in crop pixels.
    """

    scores: torch.Tensor
    maps: torch.Tensor
    patch_scores: torch.Tensor
    max_yx: torch.Tensor


def load_images(
    uris: Sequence[str], spec: ModelSpec, storage_options: dict[str, Any] | None = None
) -> torch.Tensor:
    """Read, decode and preprocess images -> (N, 3, crop, crop) float32.

    ValueError names the URI of an image that cannot be decoded (empty, corrupt, too large).
    """
    tensors = []
    for uri in uris:
        data = storage.read_bytes(uri, storage_options)
        try:
            image = preprocess.decode_image(data)
        except ValueError as err:
            raise ValueError(f"cannot read image {uri}: {err}") from err
        tensors.append(preprocess.to_tensor(image, spec.resize, spec.crop, frame=spec.frame))
    if not tensors:
        return torch.empty(0, 3, spec.crop, spec.crop)
    return torch.stack(tensors)


def embed_images(
    extractor: backbone.FeatureExtractor,
    images: torch.Tensor,
    spec: ModelSpec,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Patch features of `images` (N, 3, S, S), computed in batches on the extractor's device.

    Returns (N, h, w, W) float32 on CPU, W = features.feature_width(spec).
    """
    _check_images(images, spec)
    device = next(extractor.parameters()).device
    parts = [
        features.embed(extractor, images[lo : lo + batch_size].to(device), spec).cpu()
        for lo in range(0, images.shape[0], batch_size)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # one batch: no copy


def flatten_patches(
    patch_features: torch.Tensor, image_ids: Sequence[str]
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, h, w, D) -> one row per patch, image-major then row then column.

    Row r = (b * h + y) * w + x is the global patch index the coreset tie-break uses.
    Returns (row_image_ids (n,), ys (n,) int64, xs (n,) int64, features (n, D)), n = B*h*w.
    """
    B, h, w, D = patch_features.shape
    if len(image_ids) != B:
        raise ValueError(f"need one image id per image: {B} images, {len(image_ids)} ids")
    ys = torch.arange(h).repeat_interleave(w).repeat(B)  # 0,0,..,1,1,.. per image
    xs = torch.arange(w).repeat(B * h)
    row_ids = [image_id for image_id in image_ids for _ in range(h * w)]
    return row_ids, ys, xs, patch_features.reshape(B * h * w, D)


def fit(
    images: torch.Tensor,
    spec: ModelSpec,
    *,
    ratio: float | None = 0.1,
    size: int | None = None,
    seed: int = 0,
    projection_dim: int = 128,
    device: str | torch.device = "cpu",
    calibration_images: torch.Tensor | None = None,
    target_fpr: float = 0.01,
    image_ids: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> PatchCore:
    """Build a memory bank from nominal `images` (N, 3, S, S) (paper §3.1-3.2, Alg. 1).

    Keeps `ratio` of all N*h*w patches (or exactly `size`, which wins over ratio) chosen by greedy
    coreset on a seeded Gaussian projection to `projection_dim`. With `calibration_images`
    (nominal, not in `images`), the image and pixel thresholds are the score quantiles at which
    `target_fpr` of those images / pixels would be flagged.
    """
    if size is not None:
        ratio = None
    if image_ids is None:
        image_ids = [f"image-{i:06d}" for i in range(images.shape[0])]
    target = backbone.resolve_device(device) if isinstance(device, str) else device
    extractor = backbone.load_backbone(spec, target)
    patch_features = embed_images(extractor, images, spec, batch_size)  # (N, h, w, W)
    row_ids, ys, xs, flat = flatten_patches(patch_features, image_ids)
    num_points = flat.shape[0]
    # ψ for the stored width: the same projected points whether features are D-dim or low-rank
    projection = features.coreset_projection(spec, projection_dim, seed)  # (W, projection_dim)
    projected = flat.to(target) @ projection.to(target)  # (n, projection_dim)
    result = coreset.greedy_coreset(
        projected,
        coreset.coreset_size(num_points, ratio, size),
        start=coreset.first_index(num_points, seed),
    )
    chosen = result.indices
    info = {
        "counts": {
            "num_images": int(images.shape[0]),
            "num_patches": int(num_points),
            "grid": [int(patch_features.shape[1]), int(patch_features.shape[2])],
        },
        "config": {"ratio": ratio, "size": size, "seed": seed, "projection_dim": projection_dim},
    }
    bank = Bank(
        spec=spec,
        features=flat[chosen].contiguous(),
        image_ids=tuple(row_ids[i] for i in chosen.tolist()),
        ys=ys[chosen],
        xs=xs[chosen],
        projection_seed=seed,
        coverage_radius=result.radius,
        info=info,
    )
    model = PatchCore(bank, target, extractor)
    if calibration_images is not None:
        calibrated = predict(model, calibration_images, batch_size=batch_size)
        info["config"]["target_fpr"] = target_fpr
        info["counts"]["num_calibration_images"] = int(calibration_images.shape[0])
        # the nominal score distribution, for drift checks of later scoring runs
        info["calibration"] = {"scores": sorted(float(s) for s in calibrated.scores.tolist())}
        model.bank = dataclasses.replace(
            bank,
            image_threshold=scoring.threshold_for_fpr(calibrated.scores, target_fpr),
            pixel_threshold=scoring.threshold_for_fpr(calibrated.maps.reshape(-1), target_fpr),
            info=info,
        )
    return model


def score_patches(
    model: PatchCore, patch_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and patch scores for patch features (B, h, w, W) as `embed_images` gives them
    (paper §3.3, Eq. 6-7); distances are the same for D-dim and low-rank features.

    patch_scores: (B, h, w) float32 Euclidean distance of each patch to its nearest bank entry.
    image_scores: (B,) float64, Eq. 7 reweighting of the largest patch score s* with the
    spec.reweight_neighbors (b) nearest bank entries of m*, the bank entry nearest the worst patch.
    """
    B, h, w, D = patch_features.shape
    queries = patch_features.reshape(B * h * w, D).float().cpu()
    dists, ids = knn.search(model.index, queries, 1)  # (n, 1) Euclidean, (n, 1)
    patch_scores = dists[:, 0].reshape(B, h * w)
    worst = patch_scores.argmax(dim=1)  # (B,) first index of the max patch per image
    max_dists = patch_scores.gather(1, worst[:, None])[:, 0]  # s*, (B,)
    num_neighbours = min(model.spec.reweight_neighbors, model.bank.size)
    if num_neighbours == 1:
        image_scores = max_dists
    else:
        rows = torch.arange(B) * (h * w) + worst
        test_worst = queries[rows]  # m_test*, (B, D)
        nearest_entry = ids[rows, 0]  # m*, (B,)
        # Nb(m*): the b nearest bank entries of m* (itself first), then ||m_test* - n_j||.
        _, neighbour_ids = knn.search(
            model.index, model.bank.features[nearest_entry], num_neighbours
        )
        neighbours = model.bank.features[neighbour_ids]  # (B, b, D)
        query_to_neighbours = torch.linalg.vector_norm(test_worst[:, None, :] - neighbours, dim=-1)
        image_scores = scoring.reweighted_image_scores(max_dists, query_to_neighbours)
    return image_scores.to(torch.float64), patch_scores.reshape(B, h, w)


def predict(
    model: PatchCore, images: torch.Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> Prediction:
    """Scores, anomaly maps and the location of each map's maximum for images (B, 3, S, S)."""
    patch_features = embed_images(model.extractor, images, model.spec, batch_size)
    image_scores, patch_scores = score_patches(model, patch_features)
    size = model.spec.crop
    maps = scoring.anomaly_maps(patch_scores.to(model.device), size, model.spec.sigma).cpu()
    flat_max = maps.reshape(maps.shape[0], -1).argmax(dim=1)
    max_yx = torch.stack([flat_max // size, flat_max % size], dim=1)
    return Prediction(
        scores=image_scores, maps=maps.float(), patch_scores=patch_scores, max_yx=max_yx
    )


def save(model: PatchCore, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Publish the model's bank as an artifact folder (see storage.save_bank)."""
    storage.save_bank(uri, model.bank, storage_options)


def load(
    uri: str,
    device: str | torch.device = "cpu",
    expected_spec: ModelSpec | None = None,
    storage_options: dict[str, Any] | None = None,
    knn_options: knn.KnnOptions | None = None,
    threads: int | None = None,
) -> PatchCore:
    """Load a bank folder and rebuild backbone and index on `device` (see PatchCore for
    knn_options and threads)."""
    bank = storage.load_bank(uri, expected_spec, storage_options)
    return PatchCore(bank, device, knn_options=knn_options, threads=threads)


def _check_images(images: torch.Tensor, spec: ModelSpec) -> None:
    expected = (3, spec.crop, spec.crop)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"images must be (N, 3, {spec.crop}, {spec.crop}) for crop={spec.crop}, "
            f"got {tuple(images.shape)}; hint: model.load_images preprocesses files"
        )
