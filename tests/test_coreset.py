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


# --- MinDistances (lazy, pruned) against the plain loop that updates every row at every step ---


def plain_greedy(points: torch.Tensor, num_samples: int, start: int) -> tuple[list[int], torch.Tensor]:
    """The paper code's loop: every step updates every row's min distance; (indices, min_sq)."""
    min_sq = torch.full((len(points),), math.inf)
    chosen, index = [], start
    for _ in range(num_samples):
        chosen.append(index)
        min_sq = torch.minimum(min_sq, coreset.sq_distances_to(points, points[index]))
        min_sq[index] = coreset.SELECTED
        _, index = coreset.local_argmax(min_sq, 0)
    return chosen, min_sq


def structured_points(kind: str, seed: int, num_points: int, dim: int) -> torch.Tensor:
    """Seeded test sets: isotropic, clustered with exact duplicates, lattice ties, low intrinsic
    dimension, far from the origin, and tiny values (squares near float32 underflow)."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        x = rng.standard_normal((num_points, dim))
    elif kind == "clusters":
        centres = rng.standard_normal((8, dim)) * 5
        x = centres[rng.integers(0, 8, num_points)] + rng.standard_normal((num_points, dim)) * 0.1
        x[rng.integers(0, num_points, num_points // 4)] = x[0]  # many exact duplicates
    elif kind == "lattice":
        x = rng.integers(0, 3, size=(num_points, dim)).astype(np.float64)  # many equal distances
    elif kind == "low_dim":
        latent = rng.standard_normal((num_points, 3))
        x = np.sin(latent @ rng.standard_normal((3, dim)))
    elif kind == "far":
        x = 1e4 + rng.standard_normal((num_points, dim)) * 1e-2  # |x| >> distances
    elif kind == "tiny":
        x = rng.standard_normal((num_points, dim)) * 1e-19  # squared differences underflow
    else:
        raise AssertionError(kind)
    return torch.from_numpy(x.astype(np.float32))


KINDS = ["gaussian", "clusters", "lattice", "low_dim", "far", "tiny"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_equals_plain_loop_indices_and_min_distances(kind: str, seed: int) -> None:
    points = structured_points(kind, seed, 600, 24)
    expected, expected_min_sq = plain_greedy(points, 150, start=seed * 7)
    state = coreset.MinDistances(points, window=16, block_rows=32)
    chosen, index = [], seed * 7
    for step in range(150):
        chosen.append(index)
        state.add_centre(state.row(index), index)
        _, index = state.argmax(0)
    assert chosen == expected
    assert torch.equal(state.min_sq, expected_min_sq)  # bit-identical, SELECTED rows included
    result = coreset.greedy_coreset(points, 150, start=seed * 7)
    assert result.indices.tolist() == expected
    assert result.radius == math.sqrt(max(0.0, float(expected_min_sq.max())))


@pytest.mark.parametrize(("window", "block_rows"), [(1, 1), (5, 7), (64, 512)])
def test_min_distances_match_plain_vector_after_every_step(window: int, block_rows: int) -> None:
    points = structured_points("clusters", 3, 300, 8)
    state = coreset.MinDistances(points, window=window, block_rows=block_rows)
    min_sq = torch.full((300,), math.inf)
    index = 11
    for _ in range(40):
        value, proposed = state.argmax(0)  # read before the queue is flushed by min_sq
        assert (value, proposed) == coreset.local_argmax(min_sq, 0)
        state.add_centre(points[index], index)
        min_sq = torch.minimum(min_sq, coreset.sq_distances_to(points, points[index]))
        min_sq[index] = coreset.SELECTED
        assert torch.equal(state.min_sq, min_sq)
        _, index = coreset.local_argmax(min_sq, 0)


@pytest.mark.parametrize("num_parts", [1, 3])
def test_row_partitions_with_all_gather_rule_select_like_one_process(num_parts: int) -> None:
    # what the distributed job does: each part proposes argmax(offset), the winner is the largest
    # value then the smallest global row, every part adds the winner (owner marks it SELECTED)
    points = structured_points("lattice", 5, 500, 6)
    edges = np.linspace(0, 500, num_parts + 1, dtype=int)
    parts = [(lo, coreset.MinDistances(points[lo:hi], window=8)) for lo, hi in zip(edges[:-1], edges[1:])]
    chosen, index = [], 123
    for _ in range(120):
        chosen.append(index)
        for lo, part in parts:
            local = index - lo
            part.add_centre(points[index], local if 0 <= local < part.num_rows else None)
        proposals = [part.argmax(lo) for lo, part in parts]
        index = min(proposals, key=lambda p: (-p[0], p[1]))[1]
    expected, expected_min_sq = plain_greedy(points, 120, start=123)
    assert chosen == expected
    assert torch.equal(torch.cat([part.min_sq for _, part in parts]), expected_min_sq)


def test_greedy_stays_exact_with_reduced_precision_matmul() -> None:
    # TF32/bf16 matmul makes the BLAS bound coarse; the margin must widen, not the result change
    points = structured_points("low_dim", 2, 800, 32)
    expected, _ = plain_greedy(points, 100, start=3)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        result = coreset.greedy_coreset(points, 100, start=3)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert result.indices.tolist() == expected


def test_medium_low_dimensional_set_is_exact_and_prunes_most_pairs() -> None:
    torch.manual_seed(0)
    latent = torch.randn(20_000, 4)
    points = torch.sin(latent @ torch.randn(4, 128)) @ coreset.projection_matrix(128, 128, 0)
    expected, expected_min_sq = plain_greedy(points, 200, start=coreset.first_index(20_000, 0))
    state = coreset.MinDistances(points)
    chosen, index = [], expected[0]
    for _ in range(200):
        chosen.append(index)
        state.add_centre(state.row(index), index)
        _, index = state.argmax(0)
    assert chosen == expected
    assert torch.equal(state.min_sq, expected_min_sq)
    assert state.pairs_computed < 0.2 * 20_000 * 200  # the plain loop computes all 4,000,000


def test_min_distances_reject_non_finite_points_and_bad_sizes() -> None:
    points = torch.zeros(10, 3)
    points[4, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        coreset.MinDistances(points)
    with pytest.raises(ValueError, match=r"got \(0, 3\)"):
        coreset.MinDistances(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="got 0 and 256"):
        coreset.MinDistances(torch.zeros(4, 3), window=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_min_distances_on_cuda_with_tf32_equal_cpu() -> None:
    points = structured_points("low_dim", 4, 20_000, 128)
    expected = coreset.greedy_coreset(points, 300, start=9)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # coarse BLAS bound: margins must follow
    try:
        result = coreset.greedy_coreset(points.cuda(), 300, start=9)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert torch.equal(result.indices, expected.indices)
    assert result.radius == expected.radius
