"""Locally aware patch features (paper §3.1, Eqs. 1–3).

Owns backbone feature maps -> one D-dim embedding per position of the shallowest grid, by the
paper's per-channel local averaging (default) or by the authors' code's unfold + pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchcore_core.backbone import FeatureExtractor
from patchcore_core.spec import AGGREGATIONS, ModelSpec


def patch_features(
    feature_maps: list[torch.Tensor], patch_size: int, embed_dim: int, *, aggregation: str
) -> torch.Tensor:
    """Aggregate p×p neighbourhoods of each layer and fuse layers into one embedding per patch.

    feature_maps: per layer (B, C_l, h_l, w_l); the first map sets the output grid (h, w).
    Returns (B, h, w, embed_dim) float32.

    aggregation "paper" (§3.1, Eq. 2, "similar to local smoothing over each individual feature
    map"): each channel is averaged over the p×p neighbourhood N_p at stride 1, zero padded as
    in Eq. 1 (the sum over the window / p²), then the C_l channels are adaptive-average-pooled to
    embed_dim (a repeat when C_l < embed_dim). Zero padding keeps border patches distinct from
    interior ones; averaging only the neighbours inside the map measured 4-8 points of pixel
    AUROC worse on the demo textures (benchmarks/options_bench.py), where the border ring is up to
    44 % of a small stride-16 grid.
    aggregation "authors" (the authors' code): N_p's C_l*p*p values (zero padded, channel-major)
    are adaptive-average-pooled to embed_dim as one vector; for C_l*p*p < embed_dim every bin
    holds one or two values, so nothing is averaged over space.
    Both: deeper layers are bilinearly resized to (h, w); the L layer vectors are concatenated
    and pooled again to embed_dim. The authors' code resizes before the per-layer pooling; both
    are linear, one along the value axis and one along the grid, so they commute, and resizing
    embed_dim maps instead of C_l*p*p is several times cheaper.
    """
    if not feature_maps:
        raise ValueError("feature_maps is empty; request at least one backbone layer")
    if patch_size < 1 or patch_size % 2 != 1:
        raise ValueError(f"patch_size must be a positive odd number, got {patch_size}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")
    neighbourhood = _local_means if aggregation == "paper" else _neighbourhoods
    B, _, h, w = feature_maps[0].shape
    D, L = embed_dim, len(feature_maps)
    out = torch.empty(B, h, w, D, device=feature_maps[0].device)
    # One image at a time, with 2-D intermediates: on CPU a batch's intermediates (50-100 MB) are
    # fresh memory on every call, and strided copies of 3-D tensors miss torch's fast paths.
    for b in range(B):
        stacked = out.new_empty(L * D, h * w)  # layer-major rows, one column per position
        for layer, fmap in enumerate(feature_maps):
            h_l, w_l = fmap.shape[2:]
            pooled = _pool_rows(neighbourhood(fmap[b].float(), patch_size), D)  # (D, h_l*w_l)
            rows = stacked[layer * D : (layer + 1) * D]
            if (h_l, w_l) == (h, w):
                rows.copy_(pooled)
                continue
            # Resize the D maps as one channels-last image (vectorised over D).
            grid = pooled.t().contiguous().view(1, h_l, w_l, D).permute(0, 3, 1, 2)
            resized = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            rows.copy_(resized.permute(0, 2, 3, 1).reshape(h * w, D).t())
        out[b].view(h * w, D).copy_(_pool_rows(stacked, D).t())
    return out


def _local_means(fmap: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, H, W) -> (C, H*W): each channel's mean over the zero-padded p×p neighbourhood of every
    position (Eq. 2 as local smoothing)."""
    C, H, W = fmap.shape
    r = patch_size // 2
    means = F.avg_pool2d(fmap[None], patch_size, stride=1, padding=r, count_include_pad=True)
    return means.reshape(C, H * W)


def _neighbourhoods(fmap: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, H, W) -> (C*p*p, H*W): column j holds the zero-padded p×p neighbourhood of position j,
    ordered (c, dy, dx) as F.unfold orders it, built by one copy of a sliding-window view."""
    C, H, W = fmap.shape
    r = patch_size // 2
    padded = F.pad(fmap, (r, r, r, r))  # (C, H + 2r, W + 2r)
    windows = padded.unfold(1, patch_size, 1).unfold(2, patch_size, 1)  # (C, H, W, p, p) view
    return windows.permute(0, 3, 4, 1, 2).reshape(C * patch_size**2, H * W)


def _pool_rows(values: torch.Tensor, size: int) -> torch.Tensor:
    """(K, n) contiguous -> (size, n): adaptive average pooling of each column along K, as
    F.adaptive_avg_pool1d pools a row. Viewed as a channels-last (1, n, K, 1) image, the pooling
    runs vectorised over the n columns instead of one window at a time."""
    K, n = values.shape
    if K == size:
        return values  # every bin holds exactly one value
    image = values.view(1, K, 1, n).permute(0, 3, 1, 2)  # (1, n, K, 1), memory order (K, n)
    return F.adaptive_avg_pool2d(image, (size, 1)).permute(0, 2, 3, 1).reshape(size, n)


def embed(extractor: FeatureExtractor, images: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Patch embeddings of normalised images (B, 3, S, S) -> (B, h, w, spec.embed_dim) float32.

    Runs on the extractor's device (the result stays there); h = w = S / stride of the first layer.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, S, S), got {tuple(images.shape)}")
    device = next(extractor.parameters()).device
    with torch.inference_mode():
        feature_maps = extractor(images.to(device))
        return patch_features(
            feature_maps, spec.patch_size, spec.embed_dim, aggregation=spec.aggregation
        )
