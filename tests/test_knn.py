"""Exact kNN: faiss vs torch brute force, shard merging vs flat search, GPU vs CPU."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from patchcore_core import knn


def random_set(seed: int, rows: int, dim: int) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    )


def numpy_reference(
    bank: torch.Tensor, queries: torch.Tensor, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean top-k in float64 numpy from coordinate differences."""
    diff = queries.double().numpy()[:, None, :] - bank.double().numpy()[None, :, :]
    dists = np.sqrt((diff**2).sum(-1))  # (Q, M)
    ids = np.argsort(dists, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dists, ids, axis=1), ids


@pytest.mark.parametrize(
    ("seed", "bank_rows", "num_queries", "dim", "k"),
    [(0, 100, 7, 8, 1), (1, 500, 40, 16, 5), (2, 50, 30, 64, 9), (3, 9, 25, 32, 9)],
)
def test_faiss_search_equals_brute_force(seed, bank_rows, num_queries, dim, k) -> None:
    bank, queries = random_set(seed, bank_rows, dim), random_set(seed + 100, num_queries, dim)
    dists, ids = knn.search(knn.build_index(bank), queries, k)
    ref_dists, ref_ids = knn.brute_force_search(bank, queries, k)
    np_dists, np_ids = numpy_reference(bank, queries, k)
    assert dists.dtype == torch.float32 and ids.dtype == torch.int64
    assert dists.shape == ids.shape == (num_queries, k)
    assert torch.equal(ids, ref_ids)
    np.testing.assert_array_equal(ref_ids.numpy(), np_ids)
    np.testing.assert_allclose(dists.numpy(), np_dists, rtol=1e-5)
    np.testing.assert_allclose(ref_dists.numpy(), np_dists, rtol=1e-5)


def test_search_returns_euclidean_not_squared_distances() -> None:
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    dists, ids = knn.search(knn.build_index(bank), torch.tensor([[0.0, 0.0]]), 2)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(dists, torch.tensor([[0.0, 5.0]]))


def test_search_of_bank_rows_finds_each_row_at_nonnegative_near_zero_distance() -> None:
    bank = random_set(0, 64, 16) * 100  # large norms: faiss' |x|^2 + |y|^2 - 2<x,y> may go below 0
    dists, ids = knn.search(knn.build_index(bank), bank, 1)
    assert torch.equal(ids[:, 0], torch.arange(64))
    assert bool((dists >= 0).all()) and float(dists.max()) < 1e-1


@pytest.mark.parametrize("num_shards", [1, 3])
def test_sharded_search_equals_flat_search(num_shards: int) -> None:
    bank, queries = random_set(0, 600, 16), random_set(1, 40, 16)
    ref_dists, ref_ids = knn.search(knn.build_index(bank), queries, 5)

    edges = np.linspace(0, len(bank), num_shards + 1, dtype=int)
    parts = [
        (lo, knn.search(knn.build_index(bank[lo:hi]), queries, 5))
        for lo, hi in itertools.pairwise(edges)
    ]
    dists, ids = knn.merge_topk([p[0] for _, p in parts], [p[1] + lo for lo, p in parts], k=5)

    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(dists, ref_dists, rtol=1e-5, atol=0)


def test_merge_topk_breaks_ties_by_smaller_id_whatever_the_shard_order() -> None:
    dists = [torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.5]])]
    ids = [torch.tensor([[7, 8]]), torch.tensor([[3, 4]])]
    for order in ([0, 1], [1, 0]):
        merged = knn.merge_topk([dists[i] for i in order], [ids[i] for i in order], k=3)
        assert merged[1].tolist() == [[3, 7, 4]]
        assert merged[0].tolist() == [[1.0, 1.0, 1.5]]


@pytest.mark.parametrize("k", [0, 11])
def test_k_outside_bank_size_is_rejected_with_the_value(k: int) -> None:
    bank = random_set(0, 10, 4)
    with pytest.raises(ValueError, match=rf"k must be in \[1, 10\].*k={k}"):
        knn.search(knn.build_index(bank), bank, k)
    with pytest.raises(ValueError, match=rf"k={k}"):
        knn.brute_force_search(bank, bank, k)


def test_query_dimension_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(Q, 4\)"):
        knn.search(knn.build_index(random_set(0, 10, 4)), random_set(1, 3, 5), 1)


def _faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@pytest.mark.skipif(_faiss_has_gpu(), reason="faiss has GPUs here: build_index makes a GPU index")
def test_cuda_device_without_faiss_gpus_falls_back_to_the_cpu_index() -> None:
    bank, queries = random_set(0, 100, 8), random_set(1, 5, 8)
    index = knn.build_index(bank, device="cuda")
    assert type(index).__name__ == "IndexFlatL2" and index.ntotal == 100
    assert torch.equal(
        knn.search(index, queries, 3)[1], knn.brute_force_search(bank, queries, 3)[1]
    )


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not _faiss_has_gpu(), reason="needs faiss with a GPU"
)
def test_gpu_index_equals_cpu_index() -> None:
    bank, queries = random_set(0, 5000, 64), random_set(1, 300, 64)
    gpu_index = knn.build_index(bank, device="cuda")
    assert "Gpu" in type(gpu_index).__name__
    gpu_dists, gpu_ids = knn.search(gpu_index, queries, 9)
    cpu_dists, cpu_ids = knn.search(knn.build_index(bank), queries, 9)
    assert torch.equal(gpu_ids, cpu_ids)
    torch.testing.assert_close(gpu_dists, cpu_dists, rtol=1e-5, atol=1e-5)
