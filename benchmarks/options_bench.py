"""Accuracy of the model options side by side: aggregation paper|authors x frame crop|full.

In-process (no Ray) on the demo's MVTec-style data (jobs.demo_data: skimage's brick, grass and
gravel photos, 5 synthetic defect kinds with exact masks), efficientnet_lite0 with its packaged
ImageNet weights. Pixel metrics are taken in the input frame (the whole tile): with frame crop
the border outside the crop scores 0, as `patchcore score` writes it. Also prints how often the
Eq. 7 weight differs from 1. Row "plain": a re-implementation from the paper's equations alone
(`plain_patchcore`, centre crop), sharing only the backbone's feature maps and the PRO metric.

    python -m benchmarks.options_bench --tile 144 --crop 128
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

import patchcore_core as pc
from jobs import demo_data
from patchcore_core import backbone, metrics, preprocess

OPTIONS = [(a, f) for a in ("paper", "authors") for f in ("crop", "full")]


def _tensors(images: Sequence[np.ndarray], spec: pc.ModelSpec) -> torch.Tensor:
    return torch.stack([
        preprocess.to_tensor(Image.fromarray(i), spec.resize, spec.crop, frame=spec.frame)
        for i in images
    ])


def _plain_features(maps: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Paper §3.1 read plainly: 3×3 average pooling of each map (stride 1, zero padding counted),
    channels adaptive-pooled to dim, deeper maps upsampled, layers averaged to dim. (B, h, w, dim)."""
    h, w = maps[0].shape[2:]
    layers = []
    for fmap in maps:
        smooth = F.avg_pool2d(fmap, 3, stride=1, padding=1)
        smooth = F.interpolate(smooth, size=(h, w), mode="bilinear", align_corners=False)
        flat = smooth.permute(0, 2, 3, 1).reshape(-1, 1, smooth.shape[1])
        layers.append(F.adaptive_avg_pool1d(flat, dim)[:, 0])
    fused = F.adaptive_avg_pool1d(torch.cat(layers, dim=1)[:, None], dim)[:, 0]
    return fused.reshape(maps[0].shape[0], h, w, dim)


def plain_patchcore(train: torch.Tensor, test: torch.Tensor, spec: pc.ModelSpec, ratio: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (B,) and (B, crop, crop) maps: greedy k-center loop on a Gaussian projection to
    128 dims (Alg. 1), nearest-bank Euclidean distance per patch (Eq. 6), max as the image score,
    bilinear upsample + Gaussian σ = 4 (scipy) for the maps."""
    extractor = backbone.load_backbone(spec)
    with torch.inference_mode():
        bank_all = _plain_features(extractor(train), spec.embed_dim).reshape(-1, spec.embed_dim)
        queries = _plain_features(extractor(test), spec.embed_dim)
    gen = torch.Generator().manual_seed(seed)
    projected = bank_all @ torch.randn(spec.embed_dim, 128, generator=gen)
    chosen = [int(torch.randint(len(projected), (1,), generator=gen))]
    nearest = (projected - projected[chosen[0]]).norm(dim=1)
    for _ in range(max(1, int(ratio * len(projected))) - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (projected - projected[chosen[-1]]).norm(dim=1))
    bank = bank_all[chosen]
    B, h, w, D = queries.shape
    patch = torch.cdist(queries.reshape(-1, D), bank).min(dim=1).values.reshape(B, 1, h, w)
    up = F.interpolate(patch, size=(spec.crop, spec.crop), mode="bilinear", align_corners=False)
    maps = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4) for m in up[:, 0].numpy()])
    return patch.reshape(B, -1).amax(dim=1).numpy(), maps


def run_category(category: str, args: argparse.Namespace) -> list[dict]:
    """One row per option: image/pixel AUROC, PRO, Eq. 7 weight statistics."""
    source = demo_data.source_texture(category)
    sample = lambda split, defect, i: demo_data.demo_sample(  # noqa: E731
        category, split, defect, i, size=args.tile, seed=args.seed, source=source)
    train = [sample("train", "good", i).image for i in range(args.train)]
    test = [sample("test", "good", i) for i in range(args.test_good)]
    test += [sample("test", d, i) for d in demo_data.DEFECT_TYPES for i in range(args.test_defect)]
    labels = np.r_[np.zeros(args.test_good), np.ones(len(test) - args.test_good)]
    rows = []
    for aggregation, frame in OPTIONS:
        spec = pc.ModelSpec(backbone="efficientnet_lite0", layers=("blocks.2", "blocks.4"),
                            resize=args.tile, crop=args.crop, embed_dim=args.embed_dim,
                            aggregation=aggregation, frame=frame)
        start = time.perf_counter()
        fitted = pc.fit(_tensors(train, spec), spec, ratio=args.ratio, seed=args.seed)
        pred = pc.predict(fitted, _tensors([s.image for s in test], spec))
        maps = [preprocess.uncrop_map(m, args.tile, args.tile, spec.resize, spec.crop, frame=frame)
                for m in pred.maps]  # (tile, tile) each, input frame
        high = max(float(m.max()) for m in maps)
        curves = metrics.new_pixel_curves(0.0, high, 4096)
        for amap, s in zip(maps, test):
            curves = metrics.update_pixel_curves(curves, amap, torch.from_numpy(s.mask))
        # Eq. 7: score = w * max patch distance, so w = score / max patch distance
        weights = pred.scores / pred.patch_scores.reshape(len(test), -1).amax(dim=1).double()
        rows.append({
            "category": category, "aggregation": aggregation, "frame": frame,
            "image_auroc": roc_auc_score(labels, pred.scores.numpy()),
            "pixel_auroc": metrics.pixel_auroc(curves), "pro": metrics.pro_auc(curves),
            "eq7_not_1": int((weights < 1 - 1e-6).sum()), "images": len(test),
            "eq7_min": float(weights.min()), "seconds": time.perf_counter() - start,
        })
        print(_line(rows[-1]), flush=True)
    spec = pc.ModelSpec(backbone="efficientnet_lite0", layers=("blocks.2", "blocks.4"),
                        resize=args.tile, crop=args.crop, embed_dim=args.embed_dim)
    start = time.perf_counter()
    scores, crop_maps = plain_patchcore(_tensors(train, spec), _tensors([s.image for s in test], spec),
                                        spec, args.ratio, args.seed)
    maps = [preprocess.uncrop_map(torch.from_numpy(m), args.tile, args.tile, spec.resize, spec.crop)
            for m in crop_maps]
    curves = metrics.new_pixel_curves(0.0, max(float(m.max()) for m in maps), 4096)
    for amap, s in zip(maps, test):
        curves = metrics.update_pixel_curves(curves, amap, torch.from_numpy(s.mask))
    rows.append({
        "category": category, "aggregation": "plain", "frame": "crop",
        "image_auroc": roc_auc_score(labels, scores),
        "pixel_auroc": roc_auc_score(np.stack([s.mask for s in test]).ravel(),
                                     torch.stack(maps).numpy().ravel()),
        "pro": metrics.pro_auc(curves), "eq7_not_1": 0, "images": len(test), "eq7_min": 1.0,
        "seconds": time.perf_counter() - start,
    })
    print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    return (f"| {r['category']} | {r['aggregation']} | {r['frame']} | {r['image_auroc']:.3f} | "
            f"{r['pixel_auroc']:.3f} | {r['pro']:.3f} | {r['eq7_not_1']}/{r['images']} | "
            f"{r['eq7_min']:.6f} | {r['seconds']:.0f} |")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--categories", default=",".join(demo_data.CATEGORIES),
                        help="comma-separated demo categories")
    parser.add_argument("--tile", type=int, default=144, help="tile side in px (= resize)")
    parser.add_argument("--crop", type=int, default=128, help="crop side in px")
    parser.add_argument("--train", type=int, default=30, help="nominal training tiles per category")
    parser.add_argument("--test-good", type=int, default=8, help="nominal test tiles per category")
    parser.add_argument("--test-defect", type=int, default=3, help="test tiles per defect kind")
    parser.add_argument("--embed-dim", type=int, default=1024, help="patch embedding width D")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio")
    parser.add_argument("--seed", type=int, default=0, help="data and coreset seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| category | aggregation | frame | image AUROC | pixel AUROC | PRO | Eq. 7 w < 1 | "
          "min w | s |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    rows = [r for c in args.categories.split(",") for r in run_category(c, args)]
    for aggregation, frame in [*OPTIONS, ("plain", "crop")]:
        chosen = [r for r in rows if (r["aggregation"], r["frame"]) == (aggregation, frame)]
        print(f"| **mean** | {aggregation} | {frame} | "
              + " | ".join(f"{np.mean([r[k] for r in chosen]):.3f}"
                           for k in ("image_auroc", "pixel_auroc", "pro")) + " | | | |")
    return rows


if __name__ == "__main__":
    main()
