"""Exact nearest-neighbour search of patch features against the memory bank (paper §3.3, Eq. 6).

faiss `IndexFlatL2` (GPU when asked for and available) plus a torch brute-force reference and the
merge of per-shard top-k results. All distances returned here are Euclidean, never squared.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch


def _as_faiss_array(values: torch.Tensor) -> np.ndarray:
    """(n, d) tensor -> C-contiguous float32 numpy array on CPU (faiss' input format)."""
    return np.ascontiguousarray(values.detach().to("cpu", torch.float32).numpy())


def build_index(bank: torch.Tensor, device: torch.device | str = "cpu") -> faiss.Index:
    """Exact L2 index over the memory bank rows (M, D).

    device "cuda[:i]" gives a faiss GPU index on that GPU when the installed faiss has GPU
    support and sees a GPU; otherwise (e.g. faiss-cpu) the CPU index, with the same results.
    """
    if bank.ndim != 2 or bank.shape[0] < 1:
        raise ValueError(f"bank must be a non-empty (M, D) tensor, got shape {tuple(bank.shape)}")
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(_as_faiss_array(bank))
    device = torch.device(device)
    if device.type == "cuda" and _faiss_gpus() > 0:
        resources = faiss.StandardGpuResources()
        # index_cpu_to_gpu keeps a Python reference to `resources` on the returned index
        index = faiss.index_cpu_to_gpu(resources, device.index or 0, index)
    return index


def _faiss_gpus() -> int:
    """Number of GPUs the installed faiss can use (0 for faiss-cpu builds)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return faiss.get_num_gpus()


def search(index: faiss.Index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest bank rows of each query row (Q, D).

    Returns dists (Q, k) float32 Euclidean (ascending) and ids (Q, k) int64 bank rows, on CPU.
    """
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(
            f"queries must be (Q, {index.d}) to match the bank, got shape {tuple(queries.shape)}"
        )
    _check_k(k, index.ntotal)
    sq_dists, ids = index.search(_as_faiss_array(queries), k)
    # faiss computes ||x||^2 + ||y||^2 - 2<x, y>, which can round slightly below 0
    dists = np.sqrt(np.maximum(sq_dists, 0.0))
    return torch.from_numpy(dists), torch.from_numpy(ids.astype(np.int64, copy=False))


def brute_force_search(
    bank: torch.Tensor, queries: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `search`: exact distances from coordinate differences, same return values.

    Ties are broken by the smaller bank row. Memory: Q x M distances, for tests and small inputs.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"need bank (M, D) and queries (Q, D), "
            f"got {tuple(bank.shape)} and {tuple(queries.shape)}"
        )
    _check_k(k, bank.shape[0])
    bank = bank.detach().to("cpu", torch.float32)
    queries = queries.detach().to("cpu", torch.float32)
    dists = torch.cdist(queries, bank, compute_mode="donot_use_mm_for_euclid_dist")  # (Q, M)
    order = torch.sort(dists, dim=1, stable=True).indices[:, :k]
    return torch.gather(dists, 1, order), order


def merge_topk(
    dists: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k from per-shard results for the same queries.

    dists[s], ids[s]: (Q, k_s) from shard s, ids already offset to global bank rows.
    Returns (Q, k) dists (ascending) and ids; equal distances go to the smaller id, so the result
    does not depend on the order of the shards.
    """
    if len(dists) == 0 or len(dists) != len(ids):
        raise ValueError(f"need one ids tensor per dists tensor, got {len(dists)} and {len(ids)}")
    all_dists = torch.cat(list(dists), dim=1)  # (Q, sum k_s)
    all_ids = torch.cat(list(ids), dim=1)
    _check_k(k, all_dists.shape[1])
    # lexicographic (dist, id): stable sort by id, then stable sort by dist
    by_id = torch.sort(all_ids, dim=1, stable=True).indices
    dists_by_id = torch.gather(all_dists, 1, by_id)
    order = torch.gather(by_id, 1, torch.sort(dists_by_id, dim=1, stable=True).indices)[:, :k]
    return torch.gather(all_dists, 1, order), torch.gather(all_ids, 1, order)


def _check_k(k: int, available: int) -> None:
    if not 1 <= k <= available:
        raise ValueError(
            f"k must be in [1, {available}] (the number of bank rows searched), got k={k}; "
            "use fewer neighbours or a larger memory bank"
        )
