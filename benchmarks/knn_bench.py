"""kNN benchmark (paper §3.3, Eq. 6): query throughput of every CPU engine side by side.

faiss flat (exact), torch exact (chunked addmm + top-k: the CUDA path, here on CPU), faiss IVF-Flat
and IVF-PQ with their default parameters (`knn.ivf_params`), on seeded synthetic banks of 3k, 16k
and 160k entries of D = 1024 (WRN50 layer2+3) and 152 (efficientnet_lite0). Throughput is in
image-equivalents per second: 784 queries (a 28 x 28 patch grid) per image, k = 1. Approximate
engines print recall@1 on all timed queries (exact ids from faiss flat) and the mean ratio of the
distance found to the exact one (`knn.measure_recall` on 1,000 of them, as the score job does).

    python benchmarks/knn_bench.py --threads 2 > benchmarks/results/knn.txt

Data: sin(z A) of a latent z ~ N(0, I_16) (low intrinsic dimension, like patch features); queries
are fresh draws of the same distribution, never bank rows. "build" includes IVF training.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence

import torch

from patchcore_core import knn

PATCHES_PER_IMAGE = 784
ENGINES = ("faiss-cpu-exact", "torch-cpu-exact", "faiss-cpu-ivf-flat", "faiss-cpu-ivf-pq")


def synthetic(num_rows: int, dim: int, intrinsic_dim: int, seed: int) -> torch.Tensor:
    """(num_rows, dim) float32 rows sin(z A * s) of z ~ N(0, I); seeded; same A, s for one seed."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(intrinsic_dim, dim, generator=generator) / math.sqrt(intrinsic_dim)
    scale = torch.rand(dim, generator=generator) * 2 + 0.1
    latent = torch.randn(num_rows, intrinsic_dim, generator=generator)
    return torch.sin(latent @ mixing * scale)


IMAGES = 5  # 3,920 queries: one search batch (knn.QUERY_BATCH), as in a score job's batch


def run(sizes: Sequence[int], dims: Sequence[int], engines: Sequence[str], threads: int,
        intrinsic_dim: int) -> None:
    torch.set_num_threads(threads)
    print(f"threads {threads} (faiss and torch); k = 1; {PATCHES_PER_IMAGE} queries per image; "
          f"intrinsic dim {intrinsic_dim}; load average at start {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs (other work slows every row alike)")
    print("| N | D | engine | params | build s | images | search s | img/s | x flat | "
          "recall@1 | score / exact score |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for dim in dims:
        for num_entries in sizes:
            # one draw, split: bank rows then query rows of the same distribution
            images = IMAGES
            data = synthetic(num_entries + images * PATCHES_PER_IMAGE, dim, intrinsic_dim, seed=dim)
            bank, queries = data[:num_entries].contiguous(), data[num_entries:].contiguous()
            exact_ids = None
            flat_rate = None
            for engine in engines:
                method = engine.split("-", 2)[2]
                start = time.perf_counter()
                index = knn.build_index(bank, "cpu", knn.KnnOptions(method=method), engine=engine,
                                        threads=threads)
                built = time.perf_counter() - start
                start = time.perf_counter()
                _, ids = knn.search(index, queries, 1)
                searched = time.perf_counter() - start
                rate = images / searched
                if engine == "faiss-cpu-exact":
                    exact_ids, flat_rate = ids[:, 0], rate
                recall = ratio_mean = "-"
                if method != "exact":
                    assert exact_ids is not None, "faiss-cpu-exact must run first"
                    recall = f"{float((ids[:, 0] == exact_ids).double().mean()):.3f}"
                    # what the score job records: a seeded sample of the queries
                    sample = torch.randperm(len(queries), generator=torch.Generator().manual_seed(0))
                    report = knn.measure_recall(index, queries[sample[: knn.RECALL_QUERIES]])
                    ratio_mean = f"{report['distance_ratio_mean']:.4f}"
                params = " ".join(f"{k}={v}" for k, v in index.params.items()
                                  if k not in ("seed", "train_size")) or "-"
                ratio = f"{rate / flat_rate:.2f}" if flat_rate else "-"
                print(f"| {num_entries:,} | {dim} | {engine} | {params} | {built:.2f} | {images} | "
                      f"{searched:.3f} | {rate:.1f} | {ratio} | {recall} | {ratio_mean} |", flush=True)
                del index


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3_000, 16_000, 160_000],
                        help="bank entries N (default: 3000 16000 160000)")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 152],
                        help="feature widths D (default: 1024 152)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES,
                        help="engines to run; faiss-cpu-exact first (the recall reference)")
    parser.add_argument("--threads", type=int, default=2, help="faiss and torch threads (default 2)")
    parser.add_argument("--intrinsic-dim", type=int, default=16,
                        help="latent dimension of the synthetic features (default 16)")
    args = parser.parse_args(argv)
    if args.engines[0] != "faiss-cpu-exact":
        parser.error("--engines must start with faiss-cpu-exact (the exact reference)")
    start = time.perf_counter()
    run(args.sizes, args.dims, args.engines, args.threads, args.intrinsic_dim)
    print(f"total {time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
