"""Locally aware patch features (paper §3.1, Eqs. 1–3), as the authors' code computes them.

Owns backbone feature maps -> one D-dim embedding per position of the shallowest grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchcore_core.backbone import FeatureExtractor
from patchcore_core.spec import ModelSpec


def patch_features(
    feature_maps: list[torch.Tensor], patch_size: int, embed_dim: int
) -> torch.Tensor:
    """Aggregate p×p neighbourhoods of each layer and fuse layers into one embedding per patch.

    feature_maps: per layer (B, C_l, h_l, w_l); the first map sets the output grid (h, w).
    Returns (B, h, w, embed_dim) float32.

    Per layer: the p×p neighbourhood N_p (Eq. 1, zero padded, stride s = 1) gives C_l*p*p values
    per position, flattened channel-major; adaptive average pooling reduces each position to
    embed_dim (f_agg of Eq. 2); deeper layers are bilinearly resized to (h, w). The L layer
    vectors are concatenated and pooled again to embed_dim. The authors' code resizes before the
    per-layer pooling; both are linear, one along the value axis and one along the grid, so they
    commute, and resizing embed_dim maps instead of C_l*p*p is several times cheaper.
    """
    if not feature_maps:
        raise ValueError("feature_maps is empty; request at least one backbone layer")
    if patch_size < 1 or patch_size % 2 != 1:
        raise ValueError(f"patch_size must be a positive odd number, got {patch_size}")
    B, _, h, w = feature_maps[0].shape
    D, L = embed_dim, len(feature_maps)
    out = torch.empty(B, h, w, D, device=feature_maps[0].device)
    # One image at a time, with 2-D intermediates: on CPU a batch's intermediates (50-100 MB) are
    # fresh memory on every call, and strided copies of 3-D tensors miss torch's fast paths.
    for b in range(B):
        stacked = out.new_empty(L * D, h * w)  # layer-major rows, one column per position
        for layer, fmap in enumerate(feature_maps):
            h_l, w_l = fmap.shape[2:]
            pooled = _pool_rows(_neighbourhoods(fmap[b].float(), patch_size), D)  # (D, h_l*w_l)
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
        return patch_features(feature_maps, spec.patch_size, spec.embed_dim)
