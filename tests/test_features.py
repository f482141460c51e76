"""features: patch_features against loop-by-loop readings of paper §3.1 (per-channel local
averaging) and of the authors' code (unfold + pool), and the shift property that motivates it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import numpy as np
from PIL import Image

from patchcore_core import backbone, features, preprocess
from patchcore_core.spec import ModelSpec


def naive_pool(values: list[float], size: int) -> list[float]:
    """adaptive_avg_pool1d by its definition: bin i averages [floor(i*n/m), ceil((i+1)*n/m))."""
    n = len(values)
    out = []
    for i in range(size):
        start, stop = (i * n) // size, math.ceil((i + 1) * n / size)
        out.append(sum(values[start:stop]) / (stop - start))
    return out


def naive_neighbourhood(fmap: torch.Tensor, b: int, y: int, x: int, p: int) -> list[float]:
    """Values of the p×p neighbourhood N_p (Eq. 1) at (y, x), zero outside, ordered (c, dy, dx)."""
    _, C, H, W = fmap.shape
    r = p // 2
    values = []
    for c in range(C):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                inside = 0 <= y + dy < H and 0 <= x + dx < W
                values.append(float(fmap[b, c, y + dy, x + dx]) if inside else 0.0)
    return values


def naive_local_means(fmap: torch.Tensor, b: int, y: int, x: int, p: int) -> list[float]:
    """Per channel, the mean over the p×p neighbourhood of (y, x), zero outside the map (Eq. 2
    read as local smoothing of each feature map, with Eq. 1's zero padding)."""
    _, C, H, W = fmap.shape
    r = p // 2
    values = []
    for c in range(C):
        inside = [
            float(fmap[b, c, y + dy, x + dx])
            for dy in range(-r, r + 1)
            for dx in range(-r, r + 1)
            if 0 <= y + dy < H and 0 <= x + dx < W
        ]
        values.append(sum(inside) / p**2)
    return values


NAIVE = {"authors": naive_neighbourhood, "paper": naive_local_means}


def naive_bilinear_taps(out_index: int, out_size: int, in_size: int) -> tuple[int, int, float]:
    """align_corners=False source taps: centre-aligned, clamped at the border."""
    source = max((out_index + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = min(int(math.floor(source)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    return i0, i1, source - i0


def naive_patch_features(
    maps: list[torch.Tensor], p: int, embed_dim: int, aggregation: str
) -> torch.Tensor:
    neighbourhood = NAIVE[aggregation]
    B, _, h, w = maps[0].shape
    out = torch.zeros(B, h, w, embed_dim, dtype=torch.float64)
    for b in range(B):
        for y in range(h):
            for x in range(w):
                fused: list[float] = []
                for fmap in maps:
                    h_l, w_l = fmap.shape[2:]
                    y0, y1, wy = naive_bilinear_taps(y, h, h_l)
                    x0, x1, wx = naive_bilinear_taps(x, w, w_l)
                    corners = [
                        (neighbourhood(fmap, b, y0, x0, p), (1 - wy) * (1 - wx)),
                        (neighbourhood(fmap, b, y0, x1, p), (1 - wy) * wx),
                        (neighbourhood(fmap, b, y1, x0, p), wy * (1 - wx)),
                        (neighbourhood(fmap, b, y1, x1, p), wy * wx),
                    ]
                    values = [
                        sum(vec[k] * weight for vec, weight in corners)
                        for k in range(len(corners[0][0]))
                    ]
                    fused += naive_pool(values, embed_dim)
                out[b, y, x] = torch.tensor(naive_pool(fused, embed_dim), dtype=torch.float64)
    return out


@pytest.mark.parametrize("aggregation", ["paper", "authors"])
@pytest.mark.parametrize(
    ("shapes", "patch_size", "embed_dim"),
    [
        ([(3, 8, 8), (5, 4, 4)], 3, 8),  # two layers, stride ratio 2
        ([(3, 6, 10), (5, 3, 5)], 3, 64),  # non-square; embed_dim > C*p*p (pool repeats values)
        ([(2, 5, 7), (4, 3, 4)], 5, 11),  # odd grids: upsampling factors are not integers
        ([(4, 4, 4)], 1, 4),  # one layer, p = 1
    ],
)
def test_patch_features_match_naive_loops(
    shapes: list, patch_size: int, embed_dim: int, aggregation: str
) -> None:
    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, *shape, generator=generator) for shape in shapes]
    result = features.patch_features(maps, patch_size, embed_dim, aggregation=aggregation)
    expected = naive_patch_features(maps, patch_size, embed_dim, aggregation)
    assert result.shape == (2, shapes[0][1], shapes[0][2], embed_dim)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=0)


def resize_then_pool(maps: list[torch.Tensor], p: int, embed_dim: int) -> torch.Tensor:
    """The authors' order, whole batch at full width: unfold, resize the C*p*p maps, pool."""
    B, _, h, w = maps[0].shape
    per_layer = []
    for fmap in maps:
        C, h_l, w_l = fmap.shape[1:]
        values = F.unfold(fmap, kernel_size=p, padding=p // 2).reshape(B, C * p * p, h_l, w_l)
        if (h_l, w_l) != (h, w):
            values = F.interpolate(values, size=(h, w), mode="bilinear", align_corners=False)
        rows = values.permute(0, 2, 3, 1).reshape(B * h * w, 1, -1)
        per_layer.append(F.adaptive_avg_pool1d(rows, embed_dim).squeeze(1))
    stacked = torch.stack(per_layer, dim=1).reshape(B * h * w, 1, -1)
    return F.adaptive_avg_pool1d(stacked, embed_dim).reshape(B, h, w, embed_dim)


@pytest.mark.parametrize(
    ("shapes", "patch_size", "embed_dim"),
    [
        ([(48, 14, 14), (96, 7, 7)], 3, 64),  # C*p*p > embed_dim, windows of 6.75 and 13.5 values
        ([(5, 14, 14), (12, 7, 7)], 3, 64),  # C*p*p < embed_dim on both layers (efficientnet_lite0)
        ([(8, 9, 11), (16, 5, 6), (16, 3, 3)], 3, 20),  # three layers: final bins straddle layers
        ([(6, 10, 10), (6, 10, 10)], 5, 16),  # equal grids: nothing is resized
    ],
)
def test_authors_aggregation_matches_the_resize_then_pool_order(
    shapes: list, patch_size: int, embed_dim: int
) -> None:
    generator = torch.Generator().manual_seed(3)
    maps = [3 * torch.rand(3, *shape, generator=generator) for shape in shapes]
    expected = resize_then_pool(maps, patch_size, embed_dim)
    result = features.patch_features(maps, patch_size, embed_dim, aggregation="authors")
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("aggregation", ["paper", "authors"])
def test_single_layer_p1_full_width_is_the_feature_map_itself(aggregation: str) -> None:
    fmap = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(1))
    result = features.patch_features([fmap], patch_size=1, embed_dim=6, aggregation=aggregation)
    torch.testing.assert_close(result, fmap.permute(0, 2, 3, 1), atol=0, rtol=0)


def test_paper_aggregation_of_a_constant_map_is_that_constant_inside_and_less_at_borders() -> None:
    # A local average with zero padding: interior = the constant, a corner of a 3×3 window sees
    # 4 of 9 values, an edge 6 of 9; any D.
    fmap = torch.full((1, 5, 6, 6), 2.5)
    result = features.patch_features([fmap], patch_size=3, embed_dim=12, aggregation="paper")
    torch.testing.assert_close(result[0, 1:-1, 1:-1], torch.full((4, 4, 12), 2.5), atol=1e-6, rtol=0)
    assert result[0, 0, 0, 0].item() == pytest.approx(2.5 * 4 / 9)
    assert result[0, 0, 3, 0].item() == pytest.approx(2.5 * 6 / 9)


def test_patch_features_rejects_unknown_aggregation() -> None:
    with pytest.raises(ValueError, match="paper"):
        features.patch_features([torch.zeros(1, 2, 4, 4)], 3, 4, aggregation="mean")


def _relative_shift_change(spec: ModelSpec, texture: np.ndarray) -> float:
    """Mean ||f(x) - f(x shifted by one input pixel)|| / ||f(x)|| over interior patches."""
    extractor = backbone.load_backbone(spec)
    size = spec.crop
    views = [texture[100 : 100 + size, 100 + dx : 100 + dx + size] for dx in (0, 1)]
    images = torch.stack(
        [preprocess.to_tensor(Image.fromarray(v), size, size) for v in views]
    )
    out = features.embed(extractor, images, spec)[:, 2:-2, 2:-2]  # (2, h-4, w-4, D)
    return float(((out[0] - out[1]).norm(dim=-1) / out[0].norm(dim=-1)).mean())


def test_one_pixel_shift_of_a_texture_barely_moves_paper_features() -> None:
    # efficientnet_lite0 with its ImageNet weights (C*p*p = 360 and 1008 < D = 1024): the authors'
    # pooling keeps the raw 3×3 stencil, so a one-pixel shift of gravel changes every patch by a
    # third; per-channel averaging keeps the change to what the backbone maps themselves do.
    from skimage import data

    texture = np.repeat(data.gravel()[..., None], 3, axis=2)  # (512, 512, 3) uint8
    changes = {
        aggregation: _relative_shift_change(
            ModelSpec(backbone="efficientnet_lite0", layers=("blocks.2", "blocks.4"), resize=128,
                      crop=128, aggregation=aggregation),
            texture,
        )
        for aggregation in ("paper", "authors")
    }
    assert changes["paper"] < 0.25, changes
    assert changes["authors"] > 1.3 * changes["paper"], changes


def test_patch_features_rejects_even_patch_size() -> None:
    with pytest.raises(ValueError, match="odd"):
        features.patch_features([torch.zeros(1, 2, 4, 4)], patch_size=2, embed_dim=4,
                                aggregation="paper")


def test_wide_resnet50_at_224_gives_28x28_patches_of_1024_dims() -> None:
    # The paper's reference configuration (DESIGN.md §3): 784 patches of 1024 dims per image.
    spec = ModelSpec(backbone="wide_resnet50_2", weights="none", layers=("layer2", "layer3"))
    extractor = backbone.load_backbone(spec)
    out = features.embed(extractor, torch.randn(1, 3, 224, 224), spec)
    assert out.shape == (1, 28, 28, 1024) and out.dtype == torch.float32
    assert not out.requires_grad


def test_embed_equals_patch_features_of_extractor_outputs() -> None:
    spec = ModelSpec(
        backbone="efficientnet_lite0",
        weights="none",
        layers=("blocks.2", "blocks.4"),
        crop=64,
        resize=64,
        embed_dim=32,
    )
    extractor = backbone.load_backbone(spec)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = features.embed(extractor, images, spec)
    with torch.no_grad():
        maps = extractor(images)
    assert out.shape == (2, 8, 8, 32)
    expected = features.patch_features(maps, 3, 32, aggregation=spec.aggregation)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_embed_rejects_wrong_image_shape() -> None:
    extractor = backbone.load_backbone(
        ModelSpec(backbone="resnet18", weights="none", layers=("layer1",))
    )
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        features.embed(
            extractor, torch.zeros(3, 64, 64), ModelSpec(backbone="resnet18", layers=("layer1",))
        )
