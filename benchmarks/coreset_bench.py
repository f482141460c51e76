"""Coreset benchmark (paper §3.2, Alg. 1): `greedy_coreset` against the plain per-step loop.

The plain loop is the paper code's way: every step updates every row,
`min_d = torch.minimum(min_d, ((X - c) ** 2).sum(1))`, then `argmax` (float32 torch). Both run on
the same projected features: seeded synthetic 1024-dim features of low intrinsic dimension, stored
as float16 (like the feature store), projected to 128 dims with `coreset.projection_matrix`.
Each measurement runs in a fresh process, so its peak RSS is its own.

    python benchmarks/coreset_bench.py --n 200000 1000000 --ratio 0.1 0.01

When the plain loop would run more than --plain-full-steps steps, it runs the first
--plain-prefix steps and its time is extrapolated linearly (its per-step cost is constant);
indices are then compared over that prefix, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from patchcore_core import coreset

FEATURE_DIM = 1024
CHUNK = 1 << 15


def synthetic_projected(num_points: int, intrinsic_dim: int, projection_dim: int, seed: int) -> torch.Tensor:
    """(N, projection_dim) float32: float16 features sin(z A) of a z ~ N(0, I_intrinsic) latent,
    projected like the coreset job does; generated in chunks, so only N x 128 is ever held."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(intrinsic_dim, FEATURE_DIM, generator=generator) / math.sqrt(intrinsic_dim)
    scale = torch.rand(FEATURE_DIM, generator=generator) * 2 + 0.1
    projection = coreset.projection_matrix(FEATURE_DIM, projection_dim, seed)
    out = torch.empty(num_points, projection_dim)
    for lo in range(0, num_points, CHUNK):
        rows = min(CHUNK, num_points - lo)
        latent = torch.randn(rows, intrinsic_dim, generator=generator)
        features = torch.sin(latent @ mixing * scale).to(torch.float16)  # the feature store dtype
        out[lo : lo + rows] = features.float() @ projection
    return out


def plain_loop(points: torch.Tensor, num_steps: int, start: int) -> list[int]:
    """Per step: every row's distance to the newest centre, min, argmax (already picked: -1)."""
    min_d = torch.full((len(points),), math.inf)
    chosen, index = [], start
    for _ in range(num_steps):
        chosen.append(index)
        min_d = torch.minimum(min_d, ((points - points[index]) ** 2).sum(1))
        min_d[index] = -1.0
        index = int(torch.argmax(min_d))
    return chosen


def seconds_cell(seconds: float) -> str:
    """Seconds for the table: one decimal, or three below 1 s (toy sizes)."""
    return f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.3f}"


def worker(args: argparse.Namespace) -> None:
    """One measurement in this process; prints a JSON line, writes the indices to --out."""
    points = synthetic_projected(args.n, args.intrinsic_dim, args.projection_dim, args.seed)
    steps = coreset.coreset_size(args.n, args.ratio, None)
    start = coreset.first_index(args.n, args.seed)
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    begin = time.perf_counter()
    cpu = time.process_time()
    if args.method == "plain":
        run_steps = steps if steps <= args.plain_full_steps else min(steps, args.plain_prefix)
        indices = plain_loop(points, run_steps, start)
    else:
        run_steps = steps
        indices = coreset.greedy_coreset(points, steps, start=start).indices.tolist()
    seconds, cpu_seconds = time.perf_counter() - begin, time.process_time() - cpu
    np.save(args.out, np.asarray(indices, dtype=np.int64))
    print(json.dumps({
        "steps": steps, "run_steps": run_steps, "seconds": seconds, "cpu_seconds": cpu_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "data_rss_mb": data_rss, "projected_mb": points.numel() * 4 / 2**20,
    }))


def measure(args: argparse.Namespace, n: int, ratio: float, method: str, out: Path) -> dict:
    command = [
        sys.executable, __file__, "--worker", method, "--n", str(n), "--ratio", str(ratio),
        "--out", str(out), "--seed", str(args.seed), "--intrinsic-dim", str(args.intrinsic_dim),
        "--projection-dim", str(args.projection_dim), "--plain-prefix", str(args.plain_prefix),
        "--plain-full-steps", str(args.plain_full_steps),
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--intrinsic-dim", type=int, default=16, help="latent dimension of the synthetic features")
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain-full-steps", type=int, default=2000, help="longest plain run done in full")
    parser.add_argument("--plain-prefix", type=int, default=500, help="plain steps timed when extrapolating")
    parser.add_argument("--worker", choices=["plain", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.n, args.ratio, args.method = args.n[0], args.ratio[0], args.worker
        worker(args)
        return
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; synthetic {FEATURE_DIM}-dim float16 "
          f"features, intrinsic dim {args.intrinsic_dim}, projected to {args.projection_dim}")
    header = ("N", "ratio", "steps", "plain s", "fast s", "speedup", "plain/fast CPU s", "fast steps/s",
              "fast RSS MB: data, peak", "projected MB", "identical indices")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            for ratio in args.ratio:
                fast = measure(args, n, ratio, "fast", Path(tmp, "fast.npy"))
                plain = measure(args, n, ratio, "plain", Path(tmp, "plain.npy"))
                steps, ran = fast["steps"], plain["run_steps"]
                plain_s = plain["seconds"] * steps / ran
                plain_cpu = plain["cpu_seconds"] * steps / ran
                fast_idx = np.load(Path(tmp, "fast.npy"), allow_pickle=False)
                plain_idx = np.load(Path(tmp, "plain.npy"), allow_pickle=False)
                same = bool(np.array_equal(fast_idx[:ran], plain_idx))
                plain_cell = seconds_cell(plain_s) + ("" if ran == steps else f" (extrapolated from {ran} steps)")
                same_cell = ("yes" if same else "NO") + ("" if ran == steps else f" (first {ran})")
                row = (f"{n:,}", f"{ratio:g}", f"{steps:,}", plain_cell, seconds_cell(fast["seconds"]),
                       f"{plain_s / fast['seconds']:.1f}x", f"{plain_cpu:.0f} / {fast['cpu_seconds']:.0f}",
                       f"{steps / fast['seconds']:.0f}",
                       f"{fast['data_rss_mb']:.0f}, {fast['peak_rss_mb']:.0f}", f"{fast['projected_mb']:.0f}",
                       same_cell)
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
