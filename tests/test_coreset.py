"""Greedy k-center coreset (paper Alg. 1) against brute-force numpy references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from patchcore_core import coreset


def brute_force_greedy(points: np.ndarray, num_samples: int, start: int) -> list[int]:
    """Textbook greedy k-center in float64 from the full distance matrix."""
    dist = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))  # (N, N)
    chosen = [start]
    while len(chosen) < num_samples:
        nearest = dist[:, chosen].min(axis=1)
        nearest[chosen] = -np.inf
        chosen.append(int(np.argmax(nearest)))  # numpy: first (smallest) index among equal maxima
    return chosen


def coverage_radius(points: np.ndarray, chosen: list[int]) -> float:
    dist = np.sqrt(((points[:, None, :] - points[None, chosen, :]) ** 2).sum(-1))
    return float(dist.min(axis=1).max())


@pytest.mark.parametrize(
    ("seed", "num_points", "dim", "num_samples"),
    [(0, 50, 8, 10), (1, 200, 16, 40), (2, 123, 3, 60), (3, 64, 64, 64), (4, 300, 2, 25)],
)
def test_greedy_indices_and_radius_equal_brute_force(seed, num_points, dim, num_samples) -> None:
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((num_points, dim)).astype(np.float32)
    start = int(rng.integers(num_points))
    result = coreset.greedy_coreset(torch.from_numpy(points), num_samples, start=start)
    expected = brute_force_greedy(points.astype(np.float64), num_samples, start)
    assert result.indices.dtype == torch.int64
    assert result.indices.tolist() == expected
    assert result.radius == pytest.approx(
        coverage_radius(points.astype(np.float64), expected), rel=1e-6
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_breaks_exact_ties_by_smallest_index(seed: int) -> None:
    # integer lattice points with duplicates: many exactly equal distances in float32 and float64
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 3, size=(40, 2)).astype(np.float32)
    result = coreset.greedy_coreset(torch.from_numpy(points), 40, start=5)
    assert result.indices.tolist() == brute_force_greedy(points.astype(np.float64), 40, 5)


def test_greedy_skips_selected_rows_among_duplicates() -> None:
    points = torch.zeros(6, 4)  # all rows identical: every remaining distance is 0
    result = coreset.greedy_coreset(points, 4, start=2)
    assert result.indices.tolist() == [2, 0, 1, 3]
    assert result.radius == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_with_all_rows_selects_each_row_once(seed: int) -> None:
    points = torch.from_numpy(
        np.random.default_rng(seed).standard_normal((30, 5)).astype(np.float32)
    )
    points[10] = points[3]  # a duplicate pair as well
    result = coreset.greedy_coreset(points, 30, start=7)
    assert sorted(result.indices.tolist()) == list(range(30))
    assert result.radius == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_greedy_radius_within_twice_optimal_k_center(seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((10, 2))
    optimal = min(coverage_radius(points, list(c)) for c in itertools.combinations(range(10), 3))
    for start in range(10):
        result = coreset.greedy_coreset(torch.from_numpy(points).float(), 3, start=start)
        assert result.radius <= 2 * optimal * (1 + 1e-6)


def test_sq_distances_do_not_depend_on_block_split() -> None:
    points = torch.from_numpy(
        np.random.default_rng(0).standard_normal((101, 37)).astype(np.float32)
    )
    centre = points[17]
    whole = coreset.sq_distances_to(points, centre)
    rows = torch.cat([coreset.sq_distances_to(points[i : i + 1], centre) for i in range(101)])
    blocks = torch.cat(
        [coreset.sq_distances_to(points[lo : lo + 13], centre) for lo in range(0, 101, 13)]
    )
    assert torch.equal(whole, rows) and torch.equal(whole, blocks)
    expected = ((points.double() - centre.double()) ** 2).sum(1)
    torch.testing.assert_close(whole.double(), expected, rtol=1e-5, atol=1e-6)
    assert whole[17] == 0.0


def test_local_argmax_prefers_smallest_index_and_adds_offset() -> None:
    values = torch.tensor([1.0, 3.0, 2.0, 3.0, -1.0])
    assert coreset.local_argmax(values, 100) == (3.0, 101)


def test_projection_matrix_is_seeded_gaussian_with_variance_one_over_dim_out() -> None:
    a = coreset.projection_matrix(256, 128, seed=0)
    assert a.shape == (256, 128) and a.dtype == torch.float32
    assert torch.equal(a, coreset.projection_matrix(256, 128, seed=0))
    assert not torch.equal(a, coreset.projection_matrix(256, 128, seed=1))
    assert float(a.var()) == pytest.approx(1 / 128, rel=0.05)
    assert abs(float(a.mean())) < 0.01


def test_first_index_is_seeded_and_in_range() -> None:
    values = [coreset.first_index(1000, seed) for seed in range(20)]
    assert values == [coreset.first_index(1000, seed) for seed in range(20)]
    assert all(0 <= v < 1000 for v in values) and len(set(values)) > 10
    assert coreset.first_index(1, 5) == 0


def test_coreset_size_from_ratio_or_size() -> None:
    assert coreset.coreset_size(1000, 0.1, None) == 100
    assert coreset.coreset_size(100, 0.29, None) == 29
    assert coreset.coreset_size(10, 0.01, None) == 1  # at least one row
    assert coreset.coreset_size(10, 1.0, None) == 10
    assert coreset.coreset_size(10, None, 7) == 7


@pytest.mark.parametrize(
    ("ratio", "size", "bad"),
    [
        (None, None, "ratio=None"),
        (0.1, 5, "size=5"),
        (0.0, None, "0.0"),
        (1.5, None, "1.5"),
        (None, 0, "got 0"),
        (None, 11, "got 11"),
    ],
)
def test_coreset_size_errors_name_the_bad_value(ratio, size, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        coreset.coreset_size(10, ratio, size)


@pytest.mark.parametrize(
    ("num_samples", "start", "message"),
    [
        (0, 0, "num_samples .* got 0"),
        (11, 0, "num_samples .* got 11"),
        (3, 10, "start .* got 10"),
        (3, -1, "start .* got -1"),
    ],
)
def test_greedy_rejects_bad_arguments(num_samples: int, start: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        coreset.greedy_coreset(torch.zeros(10, 2), num_samples, start=start)


def test_random_subsample_is_seeded_sorted_and_distinct() -> None:
    a = coreset.random_subsample(100, 10, seed=3)
    assert a.dtype == torch.int64 and a.tolist() == sorted(set(a.tolist()))
    assert torch.equal(a, coreset.random_subsample(100, 10, seed=3))
    assert not torch.equal(a, coreset.random_subsample(100, 10, seed=4))
    assert int(a.min()) >= 0 and int(a.max()) < 100


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_on_cuda_equals_cpu() -> None:
    points = torch.from_numpy(
        np.random.default_rng(0).standard_normal((5000, 128)).astype(np.float32)
    )
    centre = points[3]
    assert torch.equal(
        coreset.sq_distances_to(points.cuda(), centre.cuda()).cpu(),
        coreset.sq_distances_to(points, centre),
    )
    cpu = coreset.greedy_coreset(points, 200, start=11)
    gpu = coreset.greedy_coreset(points.cuda(), 200, start=11)
    assert torch.equal(cpu.indices, gpu.indices)
    assert gpu.radius == cpu.radius
    assert math.isfinite(cpu.radius)
