"""Nearest-neighbour search of patch features against the memory bank (paper §3.3, Eq. 6).

Engines: exact (faiss brute force over the bank array on CPU, a faiss flat index on GPU; a chunked
torch search on any torch device, the CUDA path that needs no faiss GPU build) and approximate
(faiss IVF-Flat, IVF-PQ; seeded training, recall measured by `measure_recall`). `resolve_engine`
names the engine a (method, device) runs on. Every engine returns Euclidean distances (never
squared), recomputed from coordinate differences.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

METHODS = ("exact", "ivf-flat", "ivf-pq")
ENGINES = (
    "faiss-cpu-exact", "faiss-gpu-exact", "torch-cpu-exact", "torch-cuda-exact",
    "faiss-cpu-ivf-flat", "faiss-gpu-ivf-flat", "faiss-cpu-ivf-pq", "faiss-gpu-ivf-pq",
)
QUERY_BATCH = 4096  # queries per engine call: bounds every per-batch buffer
BANK_CHUNK = 8192  # torch engine: bank rows per addmm block, (4096 x 8192) float32 = 128 MiB
MIN_POINTS_PER_CELL = 39  # faiss k-means warns below this many training points per cell
# IVF k-means trains on min(N, 39 * nlist) seeded bank rows, PQ k-means (2**bits cells) on at most
# 64 per cell for 10 iterations: builds take seconds to a minute on 2 cores up to 160k x 1024
# (benchmarks/results/knn.txt)
PQ_POINTS_PER_CELL, PQ_ITERATIONS = 64, 10
RECALL_QUERIES = 1000  # queries a recall@1 estimate samples (standard error 0.9 % at recall 0.9)
_RERANK_ELEMENTS = 1 << 24  # floats gathered at once when recomputing distances (64 MiB)


@dataclass(frozen=True)
class KnnOptions:
    """How the bank is searched; None = derived from the bank by `ivf_params`.

    nlist: IVF lists (k-means cells); nprobe: lists scanned per query; pq_m: IVF-PQ sub-vectors
    (bytes per code with 8-bit codes, must divide D); rerank: IVF-PQ candidates per neighbour
    re-ranked by exact distance; seed: k-means and sampling seed.
    """

    method: str = "exact"
    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None
    rerank: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"knn method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name, only in (("nlist", "ivf"), ("nprobe", "ivf"), ("pq_m", "ivf-pq"),
                           ("rerank", "ivf-pq")):
            value = getattr(self, name)
            if value is None:
                continue
            if value < 1:
                raise ValueError(f"knn {name} must be >= 1 (or None: derived), got {value}")
            if not self.method.startswith(only):
                raise ValueError(f"knn {name} applies to {only} methods only, got {name}={value} "
                                 f"with method {self.method!r}; drop it or change the method")
        if self.nlist is not None and self.nprobe is not None and self.nprobe > self.nlist:
            raise ValueError(f"knn nprobe must be <= nlist, got nprobe={self.nprobe} > "
                             f"nlist={self.nlist}")


def default_nlist(num_entries: int) -> int:
    """~4 sqrt(N) lists, at most N // 39 (k-means wants >= 39 training points per list)."""
    return max(1, min(round(4 * math.sqrt(num_entries)), num_entries // MIN_POINTS_PER_CELL))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: ceil(sqrt(nlist)), a share of the bank that shrinks as it grows
    (2.5 % at 160k entries): on CPU a list scan is memory-bound and costs far more per entry than
    flat search's blocked BLAS over a batch of queries (benchmarks/results/knn.txt)."""
    return math.ceil(math.sqrt(nlist))


def default_pq_m(dim: int) -> int:
    """IVF-PQ sub-vectors: the largest divisor of D not above min(64, D / 4)."""
    return max(m for m in range(1, max(1, min(64, dim // 4)) + 1) if dim % m == 0)


def ivf_params(options: KnnOptions, num_entries: int, dim: int) -> dict[str, int]:
    """Resolved parameters of an approximate method for a bank of N entries of width D ({} for
    exact); ValueError when an explicit one does not fit the bank, naming the allowed range."""
    if options.method == "exact":
        return {}
    nlist = options.nlist if options.nlist is not None else default_nlist(num_entries)
    if nlist > num_entries:
        raise ValueError(f"knn nlist must be <= the bank's {num_entries} entries, got {nlist}; "
                         f"hint: the default for this bank is {default_nlist(num_entries)}")
    nprobe = options.nprobe if options.nprobe is not None else default_nprobe(nlist)
    if nprobe > nlist:
        raise ValueError(f"knn nprobe must be in [1, nlist={nlist}], got {nprobe}")
    params = {"nlist": nlist, "nprobe": nprobe, "seed": options.seed,
              "train_size": min(num_entries, MIN_POINTS_PER_CELL * nlist)}
    if options.method == "ivf-pq":
        pq_m = options.pq_m if options.pq_m is not None else default_pq_m(dim)
        if dim % pq_m:
            divisors = [m for m in range(1, dim + 1) if dim % m == 0]
            raise ValueError(f"knn pq_m must divide the feature width D={dim}, got {pq_m}; "
                             f"allowed: {divisors}")
        # 2**bits centroids per sub-quantizer, with >= 39 training points each
        bits = min(8, int(math.log2(max(2, params["train_size"] // MIN_POINTS_PER_CELL))))
        rerank = options.rerank if options.rerank is not None else 4
        params.update({"pq_m": pq_m, "pq_bits": bits, "rerank": rerank})
    return params


# --------------------------------------------------------------------------- installed faiss


@functools.cache
def faiss_distributions() -> tuple[str, ...]:
    """Installed pip distributions that provide the `faiss` module (faiss-cpu, faiss-gpu-cu12...)."""
    names = {(dist.metadata["Name"] or "").lower() for dist in importlib.metadata.distributions()}
    return tuple(sorted(n for n in names if n == "faiss" or n.startswith(("faiss-cpu", "faiss-gpu"))))


def _faiss() -> Any:
    """The `faiss` module; ImportError with the fix when it is missing or installed twice."""
    installed = faiss_distributions()
    cpu = [n for n in installed if n.startswith("faiss-cpu")]
    gpu = [n for n in installed if n.startswith("faiss-gpu")]
    if cpu and gpu:
        raise ImportError(
            f"{' and '.join(cpu + gpu)} are installed and both write the `faiss` module, so which "
            f"one imports is undefined; keep one: `pip uninstall -y {' '.join(cpu + gpu)}` then "
            "`pip install -e '.[gpu]'` (GPU) or `pip install -e '.[cpu]'` (CPU)")
    if importlib.util.find_spec("faiss") is None:
        raise ImportError("faiss is not installed; `pip install -e '.[cpu]'` (CPU) or "
                          "`pip install -e '.[gpu]'` (faiss with GPU support)")
    import faiss

    return faiss


def has_faiss() -> bool:
    """Whether a `faiss` module is importable (it may still be installed twice; see `_faiss`)."""
    return importlib.util.find_spec("faiss") is not None


def faiss_gpu_count() -> int:
    """GPUs the installed faiss can use: 0 without faiss, with a CPU-only build, or without GPUs."""
    if not has_faiss():
        return 0
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def resolve_engine(method: str, device: torch.device | str, *, faiss_gpus: int | None = None) -> str:
    """The engine (one of ENGINES) that runs `method` on `device` with the installed faiss.

    cuda: faiss GPU when faiss has GPU support, else exact search through torch on the GPU;
    approximate methods there need faiss GPU (ValueError): never a silent CPU search. cpu: faiss
    CPU (torch on CPU is as fast or slower: benchmarks/results/knn.txt). faiss_gpus: GPUs to assume
    faiss can use, instead of asking the installed faiss (tests).
    """
    if method not in METHODS:
        raise ValueError(f"knn method must be one of {', '.join(METHODS)}, got {method!r}")
    kind = torch.device(device).type
    gpus = faiss_gpu_count() if faiss_gpus is None else faiss_gpus
    if kind == "cuda":
        if gpus > 0:
            return f"faiss-gpu-{method}"
        if method == "exact":
            return "torch-cuda-exact"
        raise ValueError(
            f"knn method {method!r} on cuda needs faiss with GPU support, and the installed faiss "
            f"({', '.join(faiss_distributions()) or 'none'}) has none; use --knn exact (runs on the "
            "GPU through torch), --device cpu, or `pip install -e '.[gpu]'`")
    if kind != "cpu":
        raise ValueError(f"knn device must be cpu or cuda[:i], got {str(device)!r}")
    return f"faiss-cpu-{method}"


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True, eq=False)
class KnnIndex:
    """The memory bank made searchable by one engine (a resource: faiss index or device tensors).

    bank: (M, D) float32, on the search device for torch engines, else on CPU (exact distances of
    found ids); params: resolved `ivf_params` ({} for exact); threads: faiss CPU threads (None:
    faiss' default); faiss_index: the faiss index (None for faiss-cpu-exact, which searches `bank`
    itself: no second copy of the bank); sq_norms: (M,) squared row norms for the torch engines.
    """

    engine: str
    bank: torch.Tensor
    params: dict[str, int]
    threads: int | None = None
    faiss_index: Any = None
    sq_norms: torch.Tensor | None = None

    @property
    def d(self) -> int:
        return int(self.bank.shape[1])

    @property
    def ntotal(self) -> int:
        return int(self.bank.shape[0])

    @property
    def method(self) -> str:
        return self.engine.split("-", 2)[2]

    def describe(self) -> dict[str, Any]:
        """engine, method, params and threads as JSON values (for logs and manifests)."""
        return {"engine": self.engine, "method": self.method, "params": dict(self.params),
                "threads": self.threads}


def _as_faiss_array(values: torch.Tensor) -> np.ndarray:
    """(n, d) tensor -> C-contiguous float32 numpy array on CPU (faiss' input format)."""
    return np.ascontiguousarray(values.detach().to("cpu", torch.float32).numpy())


def build_index(
    bank: torch.Tensor, device: torch.device | str = "cpu", options: KnnOptions | None = None,
    *, engine: str | None = None, threads: int | None = None,
) -> KnnIndex:
    """Searchable index over the memory bank rows (M, D) on `device` (exact by default).

    engine: one of ENGINES to force (tests, benchmarks); default `resolve_engine`. threads: faiss
    CPU threads for training and search (the CPUs the caller reserved). IVF training is seeded
    (options.seed): the same bank gives the same index on the same device and library versions.

    Memory: a CPU float32 contiguous `bank` (a memory-mapped one from storage.load_bank) is used as
    it is by the torch engines and faiss-cpu-exact (faiss.knn over the array: the same kernel and
    ids as IndexFlatL2, no copy); IVF and faiss GPU indexes hold their own copy or codes.
    """
    options = options if options is not None else KnnOptions()
    if bank.ndim != 2 or bank.shape[0] < 1:
        raise ValueError(f"bank must be a non-empty (M, D) tensor, got shape {tuple(bank.shape)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None: faiss' default), got {threads}")
    device = torch.device(device)
    engine = engine if engine is not None else resolve_engine(options.method, device)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine.split("-", 2)[2] != options.method:
        raise ValueError(f"engine {engine!r} does not run knn method {options.method!r}")
    params = ivf_params(options, bank.shape[0], bank.shape[1])
    if engine.startswith("torch-"):
        target = device if device.type == engine.split("-")[1] else torch.device(engine.split("-")[1])
        rows = bank.detach().to(target, torch.float32).contiguous()
        return KnnIndex(engine, rows, params, threads, sq_norms=squared_norms(rows))
    faiss = _faiss()
    rows = bank.detach().to("cpu", torch.float32).contiguous()
    if engine == "faiss-cpu-exact":
        return KnnIndex(engine, rows, params, threads)
    with _faiss_threads(faiss, threads):
        index = _faiss_cpu_index(faiss, rows, options.method, params)
    if engine.startswith("faiss-gpu-"):
        resources = faiss.StandardGpuResources()
        # index_cpu_to_gpu keeps a Python reference to `resources` on the returned index
        index = faiss.index_cpu_to_gpu(resources, device.index or 0, index)
    return KnnIndex(engine, rows, params, threads, faiss_index=index)


def _faiss_cpu_index(faiss: Any, rows: torch.Tensor, method: str, params: dict[str, int]) -> Any:
    """Flat, IVF-Flat or IVF-PQ faiss CPU index of `rows` (M, D), IVF trained on a seeded sample
    (flat: only to move to a GPU; faiss-cpu-exact searches `rows` without an index)."""
    M, D = rows.shape
    if method == "exact":
        index = faiss.IndexFlatL2(D)
        index.add(_as_faiss_array(rows))
        return index
    quantizer = faiss.IndexFlatL2(D)
    if method == "ivf-flat":
        index = faiss.IndexIVFFlat(quantizer, D, params["nlist"])
    else:
        index = faiss.IndexIVFPQ(quantizer, D, params["nlist"], params["pq_m"], params["pq_bits"])
        index.pq.cp.seed = params["seed"]
        index.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CELL
        index.pq.cp.niter = PQ_ITERATIONS
    index.cp.seed = params["seed"]  # the Python index keeps a reference to `quantizer`
    generator = torch.Generator().manual_seed(params["seed"])
    sample = torch.randperm(M, generator=generator)[: params["train_size"]].sort().values
    index.train(_as_faiss_array(rows[sample]))
    index.add(_as_faiss_array(rows))
    index.nprobe = params["nprobe"]
    return index


@contextlib.contextmanager
def _faiss_threads(faiss: Any, threads: int | None) -> Iterator[None]:
    """faiss' OpenMP threads set to `threads` (None: unchanged) inside, restored after."""
    saved = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(saved)


# --------------------------------------------------------------------------- search


def squared_norms(rows: torch.Tensor, chunk: int = BANK_CHUNK) -> torch.Tensor:
    """(M,) ||row||^2 of rows (M, D), by blocks of `chunk` rows: no (M, D) temporary beside a
    memory-mapped bank (the same values as (rows * rows).sum(1))."""
    return torch.cat([(block * block).sum(1) for block in rows.split(chunk)])


def torch_exact_search(
    bank: torch.Tensor, queries: torch.Tensor, k: int, *, bank_chunk: int = BANK_CHUNK,
    sq_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN by blocks of ||q||^2 - 2 q.b + ||b||^2 (addmm) and a running top-k merge.

    bank (M, D), queries (Q, D): float32 on one device; sq_norms: (M,) ||b||^2 if precomputed.
    Memory: one (Q, bank_chunk) block at a time. Returns sq_dists (Q, k) float32 squared
    Euclidean (ascending, clamped at 0) and ids (Q, k) int64, on that device.
    """
    M = bank.shape[0]
    _check_k(k, M)
    if bank_chunk < 1:
        raise ValueError(f"bank_chunk must be >= 1, got {bank_chunk}")
    sq_norms = sq_norms if sq_norms is not None else squared_norms(bank)
    best_sq: torch.Tensor | None = None
    best_ids = torch.empty(0)
    for lo in range(0, M, bank_chunk):
        hi = min(M, lo + bank_chunk)
        # ||b||^2 - 2 q.b (Q, hi - lo); ||q||^2 is the same for every b of a row: added at the end
        block = torch.addmm(sq_norms[None, lo:hi], queries, bank[lo:hi].T, alpha=-2.0)
        block_sq, block_ids = torch.topk(block, min(k, hi - lo), dim=1, largest=False)
        block_ids += lo
        if best_sq is None:
            best_sq, best_ids = block_sq, block_ids
            continue
        # earlier chunks first, so equal values keep the smaller id (stable sort)
        merged_sq, merged_ids = torch.cat([best_sq, block_sq], 1), torch.cat([best_ids, block_ids], 1)
        order = torch.sort(merged_sq, dim=1, stable=True).indices[:, :k]
        best_sq, best_ids = merged_sq.gather(1, order), merged_ids.gather(1, order)
    assert best_sq is not None
    sq_dists = (best_sq + (queries * queries).sum(1, keepdim=True)).clamp_min_(0.0)
    return sq_dists, best_ids


def _exact_topk(
    bank: torch.Tensor, queries: torch.Tensor, candidates: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank candidate ids (Q, c) of queries (Q, D) by Euclidean distances recomputed from
    coordinate differences -> (Q, k) dists ascending (ties: candidate order) and ids."""
    Q, c = candidates.shape
    rows = max(1, _RERANK_ELEMENTS // (c * bank.shape[1]))  # bounds the (rows, c, D) gather
    parts = []
    for lo in range(0, Q, rows):
        diff = queries[lo : lo + rows, None, :] - bank[candidates[lo : lo + rows]]
        parts.append(torch.linalg.vector_norm(diff, dim=-1))
    dists = torch.cat(parts)
    order = torch.sort(dists, dim=1, stable=True).indices[:, :k]
    return dists.gather(1, order), candidates.gather(1, order)


def _candidates(index: KnnIndex, queries: torch.Tensor, count: int) -> torch.Tensor:
    """(Q, count) int64 candidate ids on the bank's device; rows an IVF search left short (-1:
    its probed lists held fewer than `count` entries) are filled by an exact search."""
    if index.engine.startswith("torch-"):
        queries = queries.to(index.bank.device, torch.float32)
        return torch_exact_search(index.bank, queries, count, sq_norms=index.sq_norms)[1]
    faiss = _faiss()
    with _faiss_threads(faiss, index.threads):
        if index.faiss_index is None:  # faiss-cpu-exact: knn_L2sqr, as IndexFlatL2.search runs it
            _, ids = faiss.knn(_as_faiss_array(queries), _as_faiss_array(index.bank), count)
        else:
            _, ids = index.faiss_index.search(_as_faiss_array(queries), count)
    ids = torch.from_numpy(ids.astype(np.int64, copy=False))
    short = (ids < 0).any(dim=1)
    if bool(short.any()):
        rows = queries[short].to(torch.float32)
        ids[short] = torch_exact_search(index.bank, rows, count)[1]
    return ids


def search(index: KnnIndex, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest bank rows of each query row (Q, D), in batches of QUERY_BATCH queries.

    Returns dists (Q, k) float32 Euclidean (ascending) and ids (Q, k) int64 bank rows, on CPU.
    Distances are recomputed from coordinate differences for the ids found, so engines that find
    the same ids return the same distances. IVF-PQ re-ranks k * rerank candidates that way.
    """
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(
            f"queries must be (Q, {index.d}) to match the bank, got shape {tuple(queries.shape)}"
        )
    _check_k(k, index.ntotal)
    count = min(index.ntotal, k * index.params.get("rerank", 1))
    all_dists, all_ids = [], []
    for lo in range(0, queries.shape[0], QUERY_BATCH):
        batch = queries[lo : lo + QUERY_BATCH].detach().to(index.bank.device, torch.float32)
        candidates = _candidates(index, batch, count).to(index.bank.device)
        dists, ids = _exact_topk(index.bank, batch, candidates, k)
        all_dists.append(dists.cpu())
        all_ids.append(ids.cpu())
    if not all_dists:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
    return torch.cat(all_dists), torch.cat(all_ids)


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


# --------------------------------------------------------------------------- recall


def measure_recall(index: KnnIndex, queries: torch.Tensor) -> dict[str, float | int]:
    """recall@1 of `index` against exact search over its bank, for queries (Q, D).

    Returns hits (queries whose nearest id equals the exact nearest id), num_queries,
    recall_at_1 = hits / num_queries and distance_ratio_mean = mean over queries of found
    distance / exact distance (>= 1: how much patch scores grow; exact zeros count as 1).
    """
    found_dists, found_ids = search(index, queries, 1)
    points = queries.to(index.bank.device, torch.float32)
    _, exact_ids = torch_exact_search(index.bank, points, 1, sq_norms=index.sq_norms)
    exact_dists = _exact_topk(index.bank, points, exact_ids, 1)[0]
    exact_dists, exact_ids = exact_dists.cpu()[:, 0], exact_ids.cpu()[:, 0]
    hits = int((found_ids[:, 0] == exact_ids).sum())
    ratio = torch.where(exact_dists > 0, found_dists[:, 0] / exact_dists.clamp_min(1e-30),
                        torch.ones_like(exact_dists))
    n = int(queries.shape[0])
    return {"hits": hits, "num_queries": n, "recall_at_1": hits / n if n else float("nan"),
            "distance_ratio_mean": float(ratio.double().mean()) if n else float("nan")}


def options_dict(options: KnnOptions) -> dict[str, Any]:
    """KnnOptions as JSON values (for logs and manifests)."""
    return asdict(options)


def _check_k(k: int, available: int) -> None:
    if not 1 <= k <= available:
        raise ValueError(
            f"k must be in [1, {available}] (the number of bank rows searched), got k={k}; "
            "use fewer neighbours or a larger memory bank"
        )
