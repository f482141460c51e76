"""Eq. 7 image scores, anomaly maps and the FPR threshold against hand computations and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from patchcore_core import scoring


def test_reweighted_score_equals_hand_computation_of_eq7() -> None:
    max_dists = torch.tensor([2.0, 1.0])
    neighbours = torch.tensor([[2.0, 3.0, 4.0], [1.0, 1.0, 1.5]])
    expected = [
        (1 - math.exp(2.0) / (math.exp(2.0) + math.exp(3.0) + math.exp(4.0))) * 2.0,
        (1 - math.exp(1.0) / (math.exp(1.0) + math.exp(1.0) + math.exp(1.5))) * 1.0,
    ]
    scores = scoring.reweighted_image_scores(max_dists, neighbours)
    assert scores.dtype == torch.float64
    assert scores.tolist() == pytest.approx(expected, rel=1e-12)


def test_one_neighbour_gives_the_plain_max_distance() -> None:
    max_dists = torch.tensor([0.5, 3.25, 7.0])
    scores = scoring.reweighted_image_scores(max_dists, max_dists[:, None])
    assert scores.tolist() == [0.5, 3.25, 7.0]


def test_reweighting_is_finite_and_exact_for_large_distances() -> None:
    neighbours = torch.tensor(
        [[1000.0, 1000.5, 1001.0], [1000.0, 2000.0, 3000.0], [3000.0, 1000.0, 1000.0]]
    )
    scores = scoring.reweighted_image_scores(neighbours[:, 0], neighbours)
    assert bool(torch.isfinite(scores).all())
    # softmax is shift invariant: the first row weighs like [0, 0.5, 1]
    first = (1 - 1 / (1 + math.exp(0.5) + math.exp(1.0))) * 1000.0
    assert scores.tolist() == pytest.approx(
        [first, 1000.0, 3000.0 * 2 * math.exp(-2000.0)], rel=1e-12, abs=1e-300
    )


def test_eq7_weight_by_hand_and_its_saturation_at_feature_scale() -> None:
    # w = 1 - e^{d0} / sum_j e^{dj}; distances a unit apart give a visible weight, distances
    # tens of units apart (CNN patch features) give w = 1 to double precision.
    rows = torch.tensor([[1.0, 2.0, 2.0], [30.0, 70.0, 75.0]])
    weights = scoring.eq7_weights(rows)
    assert weights[0].item() == pytest.approx(1 - math.e / (math.e + 2 * math.e**2), rel=1e-12)
    assert weights[1].item() == 1.0
    assert scoring.eq7_weights(torch.tensor([[4.0], [5.0]])).tolist() == [1.0, 1.0]


def test_reweighting_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B,\).*\(B, b\)"):
        scoring.reweighted_image_scores(torch.zeros(3), torch.zeros(2, 4))


def test_bilinear_upsample_matches_hand_values_without_blur() -> None:
    grid = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # (1, 2, 2), x ramp
    maps = scoring.anomaly_maps(grid, size=4, sigma=0.0)
    # align_corners=False: source x = (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped
    expected = torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(4, 4)
    torch.testing.assert_close(maps[0], expected)


def test_constant_patch_grid_gives_constant_map() -> None:
    maps = scoring.anomaly_maps(torch.full((2, 7, 7), 3.5), size=64, sigma=4.0)
    assert maps.shape == (2, 64, 64) and maps.dtype == torch.float32
    torch.testing.assert_close(maps, torch.full((2, 64, 64), 3.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("sigma", "size", "grid"), [(4.0, 64, (8, 8)), (1.3, 48, (6, 5)), (0.7, 30, (4, 4))]
)
def test_blur_matches_scipy_gaussian_filter_reflect_mode(
    sigma: float, size: int, grid: tuple[int, int]
) -> None:
    patch_scores = (
        torch.from_numpy(np.random.default_rng(0).random((2, *grid), dtype=np.float32)) * 10
    )
    maps = scoring.anomaly_maps(patch_scores, size=size, sigma=sigma)
    upsampled = F.interpolate(
        patch_scores[:, None], size=(size, size), mode="bilinear", align_corners=False
    )
    for image, result in zip(upsampled[:, 0].double().numpy(), maps.numpy(), strict=True):
        expected = scipy.ndimage.gaussian_filter(image, sigma, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sigma", [4.0, 1.3])
def test_blur_borders_are_half_sample_symmetric_not_mirror(sigma: float) -> None:
    # size == grid: the upsample is the identity, so the random values reach the borders
    patch_scores = torch.from_numpy(np.random.default_rng(1).random((1, 24, 24), dtype=np.float32))
    result = scoring.anomaly_maps(patch_scores, size=24, sigma=sigma)[0].numpy()
    image = patch_scores[0].double().numpy()
    expected = scipy.ndimage.gaussian_filter(image, sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)
    # scipy "mirror" (d c b | a b c d | c b a) is what torch's "reflect" padding does
    mirror = scipy.ndimage.gaussian_filter(image, sigma, mode="mirror", truncate=4.0)
    assert np.abs(result - mirror).max() > 1e-3


def test_anomaly_maps_rejects_negative_sigma() -> None:
    with pytest.raises(ValueError, match="sigma=-1"):
        scoring.anomaly_maps(torch.zeros(1, 4, 4), size=8, sigma=-1.0)


@pytest.mark.parametrize(
    ("scores", "target_fpr", "expected"),
    [
        (list(range(1, 11)), 0.1, 9.0),  # one of ten scores (10) may lie above
        (list(range(1, 11)), 0.0, 10.0),
        (list(range(1, 11)), 0.25, 8.0),  # floor(2.5) = 2 above
        ([1, 2, 2, 2, 3], 0.2, 2.0),
        ([1, 2, 2, 2, 3], 0.1, 3.0),
        ([3, 1, 2, 2, 2], 0.79, 2.0),  # 3 of 5 above 1 would exceed 0.79; 1 above 2 does not
        (list(range(100)), 0.29, 70.0),  # 0.29 * 100 is 28.999999999999996 in floating point
    ],
)
def test_threshold_for_fpr_hand_examples(
    scores: list[int], target_fpr: float, expected: float
) -> None:
    assert (
        scoring.threshold_for_fpr(torch.tensor(scores, dtype=torch.float32), target_fpr) == expected
    )


@pytest.mark.parametrize("seed", range(3))
def test_threshold_for_fpr_is_the_smallest_threshold_meeting_the_rate(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 20, size=57).astype(np.float64)  # with ties
    for target in (0.0, 0.01, 0.05, 0.3, 0.5, 0.99):
        t = scoring.threshold_for_fpr(torch.from_numpy(scores), target)
        assert np.mean(scores > t) <= target
        below = scores[scores < t]
        if len(below):
            assert np.mean(scores > below.max()) > target


@pytest.mark.parametrize(("grid", "size", "sigma"), [((28, 28), 224, 4.0), ((7, 9), 64, 2.5),
                                                     ((14, 14), 224, 0.0)])
def test_anomaly_maps_equal_the_upsample_then_two_blur_passes(
    grid: tuple[int, int], size: int, sigma: float
) -> None:
    # the two-matrix form against the steps it replaces, run one after the other in float64
    patch_scores = torch.from_numpy(np.random.default_rng(2).random((3, *grid))) * 20
    step = F.interpolate(patch_scores[:, None], size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0]
    radius = int(4.0 * sigma + 0.5)
    if sigma > 0:
        kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1).double() / sigma) ** 2)
        kernel = kernel / kernel.sum()
        step = scoring._blur_last_axis(step, kernel, radius)
        step = scoring._blur_last_axis(step.transpose(1, 2), kernel, radius).transpose(1, 2)
    maps = scoring.anomaly_maps(patch_scores.float(), size=size, sigma=sigma)
    assert maps.shape == (3, size, size) and maps.dtype == torch.float32
    np.testing.assert_allclose(maps.numpy(), step.numpy(), rtol=0, atol=2e-5 * 20)
