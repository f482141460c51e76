"""kNN engines against a float64 brute force: exact engines, IVF-Flat at full probe, IVF-PQ recall
as reported vs a hand count, seeded training, the engine resolver, and GPU paths against CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchcore_core import knn

CPU_EXACT = ("faiss-cpu-exact", "torch-cpu-exact")


def random_set(seed: int, rows: int, dim: int) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    )


def clustered_set(seed: int, rows: int, dim: int, clusters: int = 8) -> torch.Tensor:
    """Gaussian blobs: IVF cells mean something, as for patch features."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)) * 4
    points = centres[rng.integers(clusters, size=rows)] + rng.standard_normal((rows, dim))
    return torch.from_numpy(points.astype(np.float32))


def numpy_reference(
    bank: torch.Tensor, queries: torch.Tensor, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean top-k in float64 numpy from coordinate differences."""
    diff = queries.double().numpy()[:, None, :] - bank.double().numpy()[None, :, :]
    dists = np.sqrt((diff**2).sum(-1))  # (Q, M)
    ids = np.argsort(dists, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dists, ids, axis=1), ids


def _faiss_has_gpu() -> bool:
    return knn.faiss_gpu_count() > 0


# --------------------------------------------------------------------------- exact engines


@pytest.mark.parametrize("engine", CPU_EXACT)
@pytest.mark.parametrize(
    ("seed", "bank_rows", "num_queries", "dim", "k"),
    [(0, 100, 7, 8, 1), (1, 500, 40, 16, 5), (2, 50, 30, 64, 9), (3, 9, 25, 32, 9)],
)
def test_exact_engine_equals_float64_brute_force(engine, seed, bank_rows, num_queries, dim, k) -> None:
    bank, queries = random_set(seed, bank_rows, dim), random_set(seed + 100, num_queries, dim)
    index = knn.build_index(bank, "cpu", engine=engine)
    assert index.engine == engine
    dists, ids = knn.search(index, queries, k)
    np_dists, np_ids = numpy_reference(bank, queries, k)
    assert dists.dtype == torch.float32 and ids.dtype == torch.int64
    assert dists.shape == ids.shape == (num_queries, k)
    np.testing.assert_array_equal(ids.numpy(), np_ids)
    np.testing.assert_allclose(dists.numpy(), np_dists, rtol=1e-5)


def test_brute_force_reference_equals_float64_numpy() -> None:
    bank, queries = random_set(1, 500, 16), random_set(101, 40, 16)
    ref_dists, ref_ids = knn.brute_force_search(bank, queries, 5)
    np_dists, np_ids = numpy_reference(bank, queries, 5)
    np.testing.assert_array_equal(ref_ids.numpy(), np_ids)
    np.testing.assert_allclose(ref_dists.numpy(), np_dists, rtol=1e-5)


@pytest.mark.parametrize("bank_chunk", [1, 7, 64, 1000])
def test_torch_search_in_bank_chunks_equals_one_block(bank_chunk: int) -> None:
    bank, queries = random_set(4, 300, 24), random_set(5, 50, 24)
    sq, ids = knn.torch_exact_search(bank, queries, 6, bank_chunk=bank_chunk)
    ref_sq, ref_ids = knn.torch_exact_search(bank, queries, 6, bank_chunk=300)
    _, np_ids = numpy_reference(bank, queries, 6)
    assert torch.equal(ids, ref_ids) and torch.equal(ids, torch.from_numpy(np_ids))
    torch.testing.assert_close(sq, ref_sq, rtol=1e-5, atol=1e-4)
    assert bool((sq[:, 1:] >= sq[:, :-1]).all())  # ascending squared distances


def test_search_batches_queries_without_changing_results(monkeypatch: pytest.MonkeyPatch) -> None:
    bank, queries = random_set(6, 200, 16), random_set(7, 45, 16)
    index = knn.build_index(bank)
    ref = knn.search(index, queries, 3)
    monkeypatch.setattr(knn, "QUERY_BATCH", 8)
    got = knn.search(index, queries, 3)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])


def test_search_returns_euclidean_not_squared_distances() -> None:
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    for engine in CPU_EXACT:
        dists, ids = knn.search(knn.build_index(bank, engine=engine), torch.tensor([[0.0, 0.0]]), 2)
        assert ids.tolist() == [[0, 1]]
        torch.testing.assert_close(dists, torch.tensor([[0.0, 5.0]]))


@pytest.mark.parametrize("engine", CPU_EXACT)
def test_search_of_bank_rows_finds_each_row_at_zero_distance(engine: str) -> None:
    bank = random_set(0, 64, 16) * 100  # large norms: |x|^2 + |y|^2 - 2<x,y> may go below 0
    dists, ids = knn.search(knn.build_index(bank, engine=engine), bank, 1)
    assert torch.equal(ids[:, 0], torch.arange(64))
    assert bool((dists == 0).all())  # recomputed from coordinate differences


def test_squared_norms_by_blocks_equal_the_whole_bank_product() -> None:
    bank = random_set(8, 1000, 24)
    for chunk in (1, 7, 1000, 4096):
        assert torch.equal(knn.squared_norms(bank, chunk), (bank * bank).sum(1))


@pytest.mark.parametrize(("queries", "dim"), [(5, 16), (300, 152)])  # faiss: loops < 20 <= BLAS
def test_faiss_cpu_exact_searches_the_bank_itself_with_the_ids_of_a_flat_index(
    queries: int, dim: int
) -> None:
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(queries)
    bank = torch.from_numpy(rng.integers(-2, 3, (2000, dim)).astype(np.float32))  # many ties
    bank[1000:1200] = bank[:200]  # exact duplicates: equal distances, the smaller id first
    points = bank[rng.integers(0, 2000, queries)] + torch.from_numpy(
        rng.integers(-1, 2, (queries, dim)).astype(np.float32))
    index = knn.build_index(bank, "cpu", engine="faiss-cpu-exact", threads=2)
    assert index.faiss_index is None and index.bank.data_ptr() == bank.data_ptr()  # no copy
    assert index.describe()["engine"] == "faiss-cpu-exact"
    flat = faiss.IndexFlatL2(dim)
    flat.add(bank.numpy())
    for k in (1, 9):
        _, want = flat.search(points.numpy(), k)
        assert torch.equal(knn._candidates(index, points, k), torch.from_numpy(want))
        ref_dists, ref_ids = knn.brute_force_search(bank, points, k)
        dists, ids = knn.search(index, points, k)
        assert torch.equal(ids, ref_ids)  # integer data: exact distances, ties by smaller id
        torch.testing.assert_close(dists, ref_dists, rtol=0, atol=0)


def test_faiss_threads_are_set_for_the_search_and_restored() -> None:
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads()
    index = knn.build_index(random_set(0, 50, 8), threads=1)
    knn.search(index, random_set(1, 5, 8), 1)
    assert index.threads == 1 and faiss.omp_get_max_threads() == before


# --------------------------------------------------------------------------- approximate engines


def test_ivf_flat_probing_every_list_equals_exact_search() -> None:
    bank, queries = clustered_set(0, 2000, 32), clustered_set(1, 200, 32)
    options = knn.KnnOptions(method="ivf-flat", nlist=16, nprobe=16)
    index = knn.build_index(bank, "cpu", options)
    assert index.engine == "faiss-cpu-ivf-flat" and index.params["nprobe"] == 16
    dists, ids = knn.search(index, queries, 4)
    np_dists, np_ids = numpy_reference(bank, queries, 4)
    np.testing.assert_array_equal(ids.numpy(), np_ids)
    np.testing.assert_allclose(dists.numpy(), np_dists, rtol=1e-5)


def test_ivf_pq_recall_report_matches_a_hand_count() -> None:
    bank, queries = clustered_set(2, 3000, 32), clustered_set(3, 300, 32)
    # one probe, no re-ranking: recall well below 1, so the count is informative
    index = knn.build_index(bank, "cpu", knn.KnnOptions(method="ivf-pq", nlist=32, nprobe=1,
                                                        pq_m=4, rerank=1))
    report = knn.measure_recall(index, queries)
    found_dists, found_ids = knn.search(index, queries, 1)
    exact_dists, exact_ids = numpy_reference(bank, queries, 1)
    hits = int((found_ids[:, 0].numpy() == exact_ids[:, 0]).sum())
    assert 0 < hits < len(queries)
    assert report["hits"] == hits and report["num_queries"] == len(queries)
    assert report["recall_at_1"] == pytest.approx(hits / len(queries))
    ratio = (found_dists[:, 0].double().numpy() / exact_dists[:, 0]).mean()
    assert report["distance_ratio_mean"] == pytest.approx(ratio, rel=1e-5)
    assert report["distance_ratio_mean"] >= 1.0


def test_ivf_pq_reranking_raises_recall() -> None:
    bank, queries = clustered_set(2, 3000, 32), clustered_set(3, 300, 32)
    recalls = [
        knn.measure_recall(knn.build_index(bank, "cpu", knn.KnnOptions(
            method="ivf-pq", nlist=32, nprobe=4, pq_m=4, rerank=rerank)), queries)["recall_at_1"]
        for rerank in (1, 16)
    ]
    assert recalls[1] > recalls[0]


@pytest.mark.parametrize("method", ["ivf-flat", "ivf-pq"])
def test_index_training_is_seeded(method: str) -> None:
    faiss = pytest.importorskip("faiss")
    bank = clustered_set(4, 1500, 16)

    def trained(seed: int) -> bytes:
        index = knn.build_index(bank, "cpu", knn.KnnOptions(method=method, nlist=8, seed=seed))
        return faiss.serialize_index(index.faiss_index).tobytes()

    assert trained(0) == trained(0)
    assert trained(0) != trained(1)


def test_ivf_rows_with_too_few_candidates_are_completed_exactly() -> None:
    bank, queries = clustered_set(5, 400, 8), clustered_set(6, 30, 8)
    index = knn.build_index(bank, "cpu", knn.KnnOptions(method="ivf-flat", nlist=8, nprobe=1))
    dists, ids = knn.search(index, queries, 150)  # more than one list holds: faiss pads with -1
    assert bool((ids >= 0).all())
    assert all(len(set(row)) == 150 for row in ids.tolist())
    assert bool((dists[:, 1:] >= dists[:, :-1]).all())


# --------------------------------------------------------------------------- parameters


def test_derived_ivf_parameters_follow_the_documented_rules() -> None:
    assert [knn.default_nlist(n) for n in (50, 3000, 16000, 160000)] == [1, 76, 410, 1600]
    assert [knn.default_nprobe(n) for n in (1, 76, 410, 1600)] == [1, 9, 21, 40]
    assert [knn.default_pq_m(d) for d in (8, 32, 152, 1024)] == [2, 8, 38, 64]
    params = knn.ivf_params(knn.KnnOptions(method="ivf-pq"), 16000, 1024)
    assert params == {"nlist": 410, "nprobe": 21, "seed": 0, "train_size": 15990, "pq_m": 64,
                      "pq_bits": 8, "rerank": 4}
    assert knn.ivf_params(knn.KnnOptions(), 16000, 1024) == {}


def test_parameters_that_do_not_fit_the_bank_are_rejected_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"pq_m must divide the feature width D=12, got 5; "
                                         r"allowed: \[1, 2, 3, 4, 6, 12\]"):
        knn.ivf_params(knn.KnnOptions(method="ivf-pq", pq_m=5), 1000, 12)
    with pytest.raises(ValueError, match=r"nlist must be <= the bank's 100 entries, got 200"):
        knn.ivf_params(knn.KnnOptions(method="ivf-flat", nlist=200), 100, 8)
    with pytest.raises(ValueError, match=r"nprobe must be in \[1, nlist=2\], got 3"):
        knn.ivf_params(knn.KnnOptions(method="ivf-flat", nprobe=3), 100, 8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "hnsw"}, r"one of exact, ivf-flat, ivf-pq, got 'hnsw'"),
        ({"method": "exact", "nlist": 4}, r"nlist applies to ivf methods only"),
        ({"method": "ivf-flat", "pq_m": 4}, r"pq_m applies to ivf-pq methods only"),
        ({"method": "ivf-flat", "nprobe": 0}, r"nprobe must be >= 1.*got 0"),
        ({"method": "ivf-flat", "nlist": 2, "nprobe": 3}, r"nprobe=3 > nlist=2"),
    ],
)
def test_bad_knn_options_are_rejected_with_the_value(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        knn.KnnOptions(**options)


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


# --------------------------------------------------------------------------- engine resolution


@pytest.mark.parametrize("method", knn.METHODS)
def test_resolver_on_cpu_picks_faiss_cpu(method: str) -> None:
    assert knn.resolve_engine(method, "cpu", faiss_gpus=0) == f"faiss-cpu-{method}"
    assert knn.resolve_engine(method, "cpu", faiss_gpus=2) == f"faiss-cpu-{method}"


@pytest.mark.parametrize("method", knn.METHODS)
def test_resolver_on_cuda_uses_faiss_gpu_when_faiss_has_gpus(method: str) -> None:
    assert knn.resolve_engine(method, "cuda:1", faiss_gpus=2) == f"faiss-gpu-{method}"


def test_resolver_on_cuda_without_faiss_gpu_picks_torch_never_faiss_cpu() -> None:
    assert knn.resolve_engine("exact", "cuda", faiss_gpus=0) == "torch-cuda-exact"
    for method in ("ivf-flat", "ivf-pq"):
        with pytest.raises(ValueError, match=rf"{method}.*needs faiss with GPU support.*--knn exact"):
            knn.resolve_engine(method, "cuda", faiss_gpus=0)


def test_resolver_uses_the_installed_faiss() -> None:
    engine = knn.resolve_engine("exact", "cuda")
    assert engine == ("faiss-gpu-exact" if _faiss_has_gpu() else "torch-cuda-exact")


def test_two_faiss_installs_are_an_error_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn, "faiss_distributions", lambda: ("faiss-cpu", "faiss-gpu-cu12"))
    with pytest.raises(ImportError, match=r"faiss-cpu and faiss-gpu-cu12 are installed.*"
                                          r"pip uninstall -y faiss-cpu faiss-gpu-cu12"):
        knn.build_index(random_set(0, 10, 4))


def test_forced_engine_must_run_the_requested_method() -> None:
    with pytest.raises(ValueError, match=r"engine 'torch-cpu-exact' does not run knn method 'ivf-flat'"):
        knn.build_index(random_set(0, 100, 4), "cpu", knn.KnnOptions(method="ivf-flat"),
                        engine="torch-cpu-exact")
    with pytest.raises(ValueError, match=r"engine must be one of .*got 'annoy'"):
        knn.build_index(random_set(0, 100, 4), engine="annoy")


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_exact_engine_equals_faiss_cpu() -> None:
    bank, queries = random_set(0, 20000, 64), random_set(1, 5000, 64)
    index = knn.build_index(bank, "cuda", engine="torch-cuda-exact")
    assert index.bank.is_cuda
    dists, ids = knn.search(index, queries, 9)
    cpu_dists, cpu_ids = knn.search(knn.build_index(bank), queries, 9)
    assert torch.equal(ids, cpu_ids)
    torch.testing.assert_close(dists, cpu_dists, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_builds_a_gpu_engine_never_faiss_cpu() -> None:
    index = knn.build_index(random_set(0, 100, 8), "cuda")
    assert index.engine in ("faiss-gpu-exact", "torch-cuda-exact")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not _faiss_has_gpu(), reason="needs faiss with a GPU"
)
@pytest.mark.parametrize("method", knn.METHODS)
def test_faiss_gpu_index_equals_cpu_index(method: str) -> None:
    bank, queries = clustered_set(0, 5000, 64), clustered_set(1, 300, 64)
    options = knn.KnnOptions(method=method) if method == "exact" else knn.KnnOptions(
        method=method, nlist=16, nprobe=16)
    gpu_index = knn.build_index(bank, "cuda", options)
    assert gpu_index.engine == f"faiss-gpu-{method}"
    gpu_dists, gpu_ids = knn.search(gpu_index, queries, 9)
    cpu_dists, cpu_ids = knn.search(knn.build_index(bank, "cpu", options), queries, 9)
    if method != "ivf-pq":  # PQ codes may round differently on the GPU
        assert torch.equal(gpu_ids, cpu_ids)
        torch.testing.assert_close(gpu_dists, cpu_dists, rtol=1e-5, atol=1e-5)
