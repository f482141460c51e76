"""Locally aware patch features (paper §3.1, Eqs. 1–3).

Owns backbone feature maps -> one D-dim embedding per position of the shallowest grid, by the
paper's per-channel local averaging (default) or by the authors' code's unfold + pool; and the
width features are stored at: with the paper aggregation every channel operation is one linear
map M (D, C) of the C backbone channels, so when rank(M) = r < D the features are stored as the
r coordinates z of f = M u in an orthonormal basis of M's column space (`low_rank_factors`).
Every Euclidean distance, hence every kNN, coreset step and score, is the same as with f.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchcore_core import coreset
from patchcore_core.backbone import LAYER_SHAPES, FeatureExtractor
from patchcore_core.spec import AGGREGATIONS, ModelSpec

# A column of M whose distance to the span of the columns before it is below this share of its
# own norm counts as dependent. Measured over every efficientnet_lite0 and resnet18 choice of
# 1-3 layers at D = 16-1024: independent columns keep >= 0.19 of their norm, dependent ones
# <= 1e-16 (float64 rounding), so any threshold in between gives the same rank.
_RANK_TOLERANCE = 1e-9
_BLOCK_COLUMNS = 64  # columns orthogonalised against the basis at once (one matrix product)


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


@dataclass(frozen=True, eq=False)
class LowRankFactors:
    """M = basis @ coefficients for the paper aggregation's channel map M (D, C), rank r < D.

    coefficients: (r, C) float64; a patch's stored feature is z = coefficients @ u, u (C,) being
        its local-mean channels (deeper layers bilinearly resized), layer-major.
    basis: (D, r) float64 with orthonormal columns, so f = M u = basis @ z and
        ||f - f'|| = ||z - z'|| (up to float rounding). Shared by a cache: do not modify.
    """

    coefficients: torch.Tensor
    basis: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.coefficients.shape[0])


def layer_channels(spec: ModelSpec) -> tuple[int, ...]:
    """Channels C_l of each of the spec's backbone layers, in the spec's order."""
    return tuple(LAYER_SHAPES[spec.backbone][layer][0] for layer in spec.layers)


def channel_map(channels: tuple[int, ...], embed_dim: int) -> torch.Tensor:
    """The paper aggregation's channel operations as one matrix M (D, C) float64, C = sum(C_l).

    f = M u for the D-dim feature f of a patch and its local-mean channels u (deeper layers
    resized), layer-major. Built by pushing identity matrices through `_pool_rows`, the code
    `patch_features` runs, so it is by construction the map the D-dim path applies.
    """
    if not channels or min(channels) < 1 or embed_dim < 1:
        raise ValueError(f"need channels >= 1 and embed_dim >= 1, got {channels}, {embed_dim}")
    total = sum(channels)
    stacked = torch.zeros(len(channels) * embed_dim, total, dtype=torch.float64)
    lo = 0
    for layer, count in enumerate(channels):
        identity = torch.eye(count, dtype=torch.float64)
        rows = slice(layer * embed_dim, (layer + 1) * embed_dim)
        stacked[rows, lo : lo + count] = _pool_rows(identity, embed_dim)  # per-layer pooling
        lo += count
    return _pool_rows(stacked, embed_dim).contiguous()  # pooling of the concatenated layers


@functools.lru_cache(maxsize=16)
def low_rank_factors(channels: tuple[int, ...], embed_dim: int) -> LowRankFactors | None:
    """Exact rank-r factorisation of `channel_map(channels, embed_dim)`; None when r = D.

    The basis is Gram-Schmidt on M's columns in channel order (dependent columns skipped), i.e.
    the Q of a thin QR with a positive diagonal. Unlike an SVD basis it is unique: repeated
    singular values (common in these averaging maps) leave an SVD free to rotate its vectors, and
    two processes (extract on one node, score on another, other thread counts or LAPACK builds)
    could then store features in different coordinates. Cached; WRN50's 1024 x 1536 takes ~0.3 s.
    """
    # normal tensors even when first asked for under inference mode: the cache outlives it
    with torch.inference_mode(False):
        matrix = channel_map(channels, embed_dim)
        basis = _column_space_basis(matrix)
        if basis.shape[1] == embed_dim:
            return None  # full rank: the D-dim features are already the narrowest exact form
        return LowRankFactors(coefficients=basis.T @ matrix, basis=basis)


def _column_space_basis(matrix: torch.Tensor) -> torch.Tensor:
    """(D, C) -> (D, r): orthonormal basis of the column space, Gram-Schmidt in column order.

    Each block of columns is orthogonalised against the basis so far twice (CGS2: the second pass
    removes what rounding left of the first), then column by column within the block. Stops once
    r = D.
    """
    D, C = matrix.shape
    basis = matrix.new_empty(D, 0)
    for lo in range(0, C, _BLOCK_COLUMNS):
        block = matrix[:, lo : lo + _BLOCK_COLUMNS]
        norms = block.norm(dim=0)
        for _ in range(2):
            block = block - basis @ (basis.T @ block)
        accepted: list[torch.Tensor] = []
        for j in range(block.shape[1]):
            column = block[:, j]
            if accepted:
                new = torch.stack(accepted, dim=1)
                for _ in range(2):
                    column = column - new @ (new.T @ column)
            length = column.norm()
            if length > _RANK_TOLERANCE * norms[j]:
                accepted.append(column / length)
        if accepted:
            basis = torch.cat([basis, torch.stack(accepted, dim=1)], dim=1)
        if basis.shape[1] >= D:
            return basis[:, :D]
    return basis


def stored_factors(spec: ModelSpec) -> LowRankFactors | None:
    """The factorisation the spec's features are stored in; None when they are stored D-dim
    (spec.low_rank off, the authors' aggregation, whose map is not per-channel, or r = D)."""
    if not spec.low_rank or spec.aggregation != "paper":
        return None
    return low_rank_factors(layer_channels(spec), spec.embed_dim)


def feature_width(spec: ModelSpec) -> int:
    """Width of the stored patch features: r = rank(M) when stored low-rank, else embed_dim.

    E.g. efficientnet_lite0 blocks.2,blocks.4 (40 + 112 channels) at D = 1024: 152; WRN50
    layer2,layer3 (512 + 1024 channels) at D = 1024: 1024.
    """
    factors = stored_factors(spec)
    return spec.embed_dim if factors is None else factors.rank


def coreset_projection(spec: ModelSpec, projection_dim: int, seed: int) -> torch.Tensor:
    """The coreset's seeded Gaussian projection ψ for stored features: (width, projection_dim)
    float32 on CPU; project with `stored_features @ coreset_projection(...)`.

    ψ is drawn for D-dim features (`coreset.projection_matrix(D, ...)`), so a seed selects the
    same coreset either way: for low-rank features f = basis @ z gives ψ(f) = z @ (basis^T ψ).
    """
    projection = coreset.projection_matrix(spec.embed_dim, projection_dim, seed)
    factors = stored_factors(spec)
    if factors is None:
        return projection
    return (factors.basis.T @ projection.double()).float()


def low_rank_patch_features(
    feature_maps: list[torch.Tensor], patch_size: int, coefficients: torch.Tensor
) -> torch.Tensor:
    """Paper aggregation in low-rank coordinates: z = coefficients @ u per patch.

    feature_maps: per layer (B, C_l, h_l, w_l); the first map sets the grid (h, w).
    coefficients: (r, C) with C = sum(C_l) (`LowRankFactors.coefficients`).
    Returns (B, h, w, r) float32 on the maps' device. Same zero-padded p×p local means and
    bilinear resize as `patch_features`, but on C_l channels (or r, whichever is fewer: the
    resize and the channel map are linear along different axes, so they commute) instead of D.
    """
    if not feature_maps:
        raise ValueError("feature_maps is empty; request at least one backbone layer")
    if patch_size < 1 or patch_size % 2 != 1:
        raise ValueError(f"patch_size must be a positive odd number, got {patch_size}")
    channels = [int(fmap.shape[1]) for fmap in feature_maps]
    assert coefficients.ndim == 2 and coefficients.shape[1] == sum(channels), (
        coefficients.shape, channels,
    )
    B, _, h, w = feature_maps[0].shape
    weights = coefficients.to(feature_maps[0].device, torch.float32)
    rank = weights.shape[0]
    out = torch.zeros(B, h, w, rank, device=feature_maps[0].device)
    lo = 0
    for fmap, count in zip(feature_maps, channels):
        layer_weights = weights[:, lo : lo + count].T  # (C_l, r)
        lo += count
        means = F.avg_pool2d(  # (B, C_l, h_l, w_l), Eq. 1 zero padding as in _local_means
            fmap.float(), patch_size, stride=1, padding=patch_size // 2, count_include_pad=True
        )
        if means.shape[2:] == (h, w):
            out += means.permute(0, 2, 3, 1) @ layer_weights
            continue
        if rank < count:  # map to r channels first, resize r maps
            mapped = (means.permute(0, 2, 3, 1) @ layer_weights).permute(0, 3, 1, 2)
            resized = F.interpolate(mapped, size=(h, w), mode="bilinear", align_corners=False)
            out += resized.permute(0, 2, 3, 1)
        else:  # resize the C_l maps, then map them
            resized = F.interpolate(means, size=(h, w), mode="bilinear", align_corners=False)
            out += resized.permute(0, 2, 3, 1) @ layer_weights
    return out


def embed(extractor: FeatureExtractor, images: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Patch embeddings of normalised images (B, 3, S, S) -> (B, h, w, feature_width(spec))
    float32: D-dim features, or their low-rank coordinates z when the spec stores those.

    Runs on the extractor's device (the result stays there); h = w = S / stride of the first layer.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, S, S), got {tuple(images.shape)}")
    device = next(extractor.parameters()).device
    factors = stored_factors(spec)
    with torch.inference_mode():
        feature_maps = extractor(images.to(device))
        if factors is not None:
            return low_rank_patch_features(feature_maps, spec.patch_size, factors.coefficients)
        return patch_features(
            feature_maps, spec.patch_size, spec.embed_dim, aggregation=spec.aggregation
        )
