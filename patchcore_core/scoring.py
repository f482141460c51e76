"""Image scores, anomaly maps and thresholds from patch distances (paper §3.3, Eq. 6-7).

All scores are Euclidean distances in feature space (not squared).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def eq7_weights(query_to_neighbours: torch.Tensor) -> torch.Tensor:
    """The factor w = 1 - softmax(row)[0] of Eq. 7, per image, (B, b) -> (B,) float64 in [0, 1).

    query_to_neighbours[:, j] = ||m_test* - n_j|| in feature units, n_0 = m* (the nearest).
    w = sum_{j>0} exp(d_j) / sum_j exp(d_j). The softmax is over raw Euclidean distances: when
    they differ by more than a few units, as they do at the scale of CNN features (tens of
    units), exp(d_0) is negligible and w rounds to 1.0, so Eq. 7 reduces to the plain max.
    """
    if query_to_neighbours.ndim != 2 or query_to_neighbours.shape[1] < 1:
        raise ValueError(
            "query_to_neighbours must be (B, b) with b >= 1 (b = 1: plain max), "
            f"got {tuple(query_to_neighbours.shape)}"
        )
    dists = query_to_neighbours.to(torch.float64)
    if dists.shape[1] == 1:
        return torch.ones(dists.shape[0], dtype=torch.float64, device=dists.device)
    # Shifting by the row max keeps exp finite, and summing j > 0 directly avoids cancellation
    # in 1 - p when p is close to 1.
    shifted = torch.exp(dists - dists.max(dim=1, keepdim=True).values)  # (B, b), in (0, 1]
    return shifted[:, 1:].sum(dim=1) / shifted.sum(dim=1)


def reweighted_image_scores(
    max_dists: torch.Tensor, query_to_neighbours: torch.Tensor
) -> torch.Tensor:
    """Image score s of Eq. 7 from the max patch distance s* of each image.

    max_dists: (B,) s* = ||m_test* - m*||. query_to_neighbours: (B, b), column j holds
    ||m_test* - n_j|| for the b nearest bank rows n_j of m* (n_0 = m* itself, so column 0 = s*).
    s = eq7_weights(row) * s*; b == 1 gives s = s* (plain max, as the authors' code).
    Returns (B,) float64.
    """
    if query_to_neighbours.ndim != 2 or max_dists.shape != query_to_neighbours.shape[:1]:
        raise ValueError(
            f"need max_dists (B,) and query_to_neighbours (B, b), got {tuple(max_dists.shape)} "
            f"and {tuple(query_to_neighbours.shape)}"
        )
    max_dists = max_dists.to(torch.float64)
    if query_to_neighbours.shape[1] == 1:
        return max_dists
    return eq7_weights(query_to_neighbours) * max_dists


def anomaly_maps(patch_scores: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Patch-score grids (B, h, w) -> anomaly maps (B, size, size) float32 (crop pixels).

    Bilinear upsample (align_corners=False), then a separable Gaussian of std `sigma` px
    (sigma 0: none). The Gaussian equals scipy.ndimage.gaussian_filter(map, sigma) with its
    defaults, as the authors' code uses: truncate 4, radius int(4 * sigma + 0.5) (= ceil(4 sigma)
    = 16 for sigma 4), borders mode "reflect" = half-sample symmetric (d c b a | a b c d | d c b a),
    which is numpy's "symmetric", not torch's "reflect".

    Both steps are linear and act on rows and columns separately, so the whole map is
    A_h @ grid @ A_w^T with A = blur(upsample(identity)) of shape (size, h): two small matrix
    products an image instead of a (size x size) 2-D pass per step (`axis_operator`; it equals
    the step-by-step result to float32 rounding).
    """
    if patch_scores.ndim != 3:
        raise ValueError(f"patch_scores must be (B, h, w), got shape {tuple(patch_scores.shape)}")
    if size < 1 or sigma < 0:
        raise ValueError(f"need size >= 1 and sigma >= 0, got size={size}, sigma={sigma}")
    _, h, w = patch_scores.shape
    grids = patch_scores.to(torch.float32)
    rows = axis_operator(h, size, sigma).to(grids.device)  # (size, h)
    cols = rows if w == h else axis_operator(w, size, sigma).to(grids.device)  # (size, w)
    return (rows @ grids @ cols.T).contiguous()


@functools.lru_cache(maxsize=32)
def axis_operator(length: int, size: int, sigma: float) -> torch.Tensor:
    """(size, length) float32 matrix of one axis of `anomaly_maps`: bilinear upsample of `length`
    values to `size` (align_corners=False), then the Gaussian of std `sigma` with half-sample
    symmetric borders; built in float64 by applying both steps to the identity."""
    basis = torch.eye(length, dtype=torch.float64)[:, None, :]  # (length, 1, length): one-hot rows
    upsampled = F.interpolate(basis, size=size, mode="linear", align_corners=False)[:, 0]
    radius = int(4.0 * sigma + 0.5)
    if sigma > 0 and radius > 0:
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        upsampled = _blur_last_axis(upsampled[None], kernel / kernel.sum(), radius)[0]
    return upsampled.T.to(torch.float32).contiguous()  # row i: weights of output pixel i


def _blur_last_axis(maps: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """Correlate each row of (B, H, W) with `kernel` (2r+1,), half-sample symmetric borders."""
    B, H, W = maps.shape
    # padded column i reads source column sym(i - r); sym folds with period 2W, so any r works
    source = torch.arange(-radius, W + radius, device=maps.device) % (2 * W)
    source = torch.where(source < W, source, 2 * W - 1 - source)
    padded = maps[:, :, source].reshape(B * H, 1, W + 2 * radius)
    return F.conv1d(padded, kernel.view(1, 1, -1).to(maps.dtype)).view(B, H, W)


def threshold_for_fpr(nominal_scores: torch.Tensor, target_fpr: float) -> float:
    """Smallest t with (fraction of nominal scores > t) <= target_fpr, a high quantile.

    Label a score anomalous when score > t. With N scores sorted ascending, t is the
    (N - a)-th smallest with a = floor(target_fpr * N): at most a nominal scores exceed it.
    """
    if nominal_scores.ndim != 1 or len(nominal_scores) == 0:
        raise ValueError(
            "nominal_scores must be a non-empty (N,) tensor, "
            f"got shape {tuple(nominal_scores.shape)}"
        )
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr!r}")
    count = len(nominal_scores)
    # 1e-9 absorbs float error in the product, e.g. 0.29 * 100 = 28.999999999999996
    allowed_above = min(count - 1, math.floor(target_fpr * count + 1e-9))
    ordered = torch.sort(nominal_scores.detach().to(torch.float64)).values
    return float(ordered[count - 1 - allowed_above])
