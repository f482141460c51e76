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
    per position, flattened channel-major; deeper layers are bilinearly resized to (h, w) after
    this step; adaptive average pooling reduces each position to embed_dim (f_agg of Eq. 2).
    The L layer vectors are concatenated and pooled again to embed_dim.
    """
    if not feature_maps:
        raise ValueError("feature_maps is empty; request at least one backbone layer")
    if patch_size < 1 or patch_size % 2 != 1:
        raise ValueError(f"patch_size must be a positive odd number, got {patch_size}")
    B, _, h, w = feature_maps[0].shape
    per_layer = []
    for fmap in feature_maps:
        C, h_l, w_l = fmap.shape[1:]
        # (B, C*p*p, h_l*w_l): column j holds the neighbourhood of position j, ordered (c, dy, dx).
        neighbourhoods = F.unfold(fmap.float(), kernel_size=patch_size, padding=patch_size // 2)
        neighbourhoods = neighbourhoods.reshape(B, C * patch_size**2, h_l, w_l)
        if (h_l, w_l) != (h, w):
            # Each of the C*p*p values is resized as its own map, as in the authors' code.
            neighbourhoods = F.interpolate(
                neighbourhoods, size=(h, w), mode="bilinear", align_corners=False
            )
        # (B*h*w, 1, C*p*p) -> pool along the value axis -> (B*h*w, embed_dim)
        rows = neighbourhoods.permute(0, 2, 3, 1).reshape(B * h * w, 1, -1)
        per_layer.append(F.adaptive_avg_pool1d(rows, embed_dim).squeeze(1))
    # (B*h*w, L*embed_dim), layer-major, pooled to embed_dim.
    stacked = torch.stack(per_layer, dim=1).reshape(B * h * w, 1, -1)
    fused = F.adaptive_avg_pool1d(stacked, embed_dim).squeeze(1)
    return fused.reshape(B, h, w, embed_dim)


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
