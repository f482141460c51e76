"""Coreset benchmark (paper §3.2, Alg. 1): `greedy_coreset` against the plain per-step loop.

The plain loop is the paper code's way: every step updates every row,
`min_d = torch.minimum(min_d, ((X - c) ** 2).sum(1))`, then `argmax` (float32 torch). Both run on
the same projected features, one of:
- `--features synthetic`: seeded synthetic 1024-dim features of low intrinsic dimension, stored
  as float16 (like the feature store), projected to 128 dims with `coreset.projection_matrix`;
- `--features real`: patch features of real photos, as `patchcore fit` makes them (see
  `real_projected`), cached as an (N, 128) float32 .npy under --cache-dir.
Each measurement runs in a fresh process, so its peak RSS is its own.

    python benchmarks/coreset_bench.py --n 200000 1000000 --ratio 0.1 0.01
    python benchmarks/coreset_bench.py --features real --n 1000000 --ratio 0.01

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
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchcore_core import coreset

FEATURE_DIM = 1024
CHUNK = 1 << 15
# skimage.data photos that ship with the package (no download): textures, scenes, micrographs
PHOTOS = ("astronaut", "brick", "camera", "cat", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "rocket", "retina", "cell", "clock",
          "page", "text", "colorwheel")
REAL_LAYERS = ("blocks.2", "blocks.4")
REAL_VERSION = 1  # part of the cache name: bump when real_projected changes its output


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


def photo_views(count: int, seed: int) -> Iterator[Image.Image]:
    """`count` distinct RGB views of the skimage photos, round robin over PHOTOS: a square crop
    of random side (25-100 % of the largest square that fits) at a random place, rotated by a
    random angle (cut from a sqrt(2) larger square, so no border enters), then one of the 8
    flips/quarter turns. Gray photos are repeated to 3 channels."""
    from skimage import data  # benchmark-only dependency, like the tests' textures

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        pixels = getattr(data, name)()
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(pixels[:, :, :3]))
    for i in range(count):
        pixels = photos[i % len(photos)]
        height, width = pixels.shape[:2]
        outer = int(min(height, width) * rng.uniform(0.25, 1.0))  # square that holds the rotation
        side = max(32, int(outer / math.sqrt(2)))
        y, x = rng.integers(0, height - outer + 1), rng.integers(0, width - outer + 1)
        view = Image.fromarray(pixels[y : y + outer, x : x + outer]).rotate(
            float(rng.uniform(0, 360)), Image.Resampling.BILINEAR)
        lo = (outer - side) // 2
        view = view.crop((lo, lo, lo + side, lo + side))
        turn = int(rng.integers(8))
        if turn & 4:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for _ in range(turn & 3):
            view = view.transpose(Image.Transpose.ROTATE_90)
        yield view


def real_projected(num_points: int, projection_dim: int, seed: int, cache_dir: str) -> torch.Tensor:
    """(N, projection_dim) float32 projected patch features of real photos, as `patchcore fit`
    computes them: efficientnet_lite0 (blocks.2, blocks.4, packaged ImageNet weights), resize 256,
    crop 224 (28 x 28 patches), embed_dim 1024 stored low-rank (`features.feature_width` = 152
    coordinates), rounded to float16 like the feature store, times
    `features.coreset_projection(spec, projection_dim, seed)`. Images are `photo_views`; rows are
    image-major, the first N patches of ceil(N / 784) images. Cached in `cache_dir` by arguments."""
    path = Path(cache_dir, f"coreset_real_v{REAL_VERSION}_{num_points}_{projection_dim}_{seed}.npy")
    if path.exists():
        return torch.from_numpy(np.load(path, allow_pickle=False))
    # imported only to extract: a cached run keeps the backbone libraries out of its RSS
    from patchcore_core import backbone, features, preprocess
    from patchcore_core.spec import ModelSpec

    spec = ModelSpec(backbone="efficientnet_lite0", weights="default", layers=REAL_LAYERS,
                     resize=256, crop=224, embed_dim=1024)
    extractor = backbone.load_backbone(spec)
    projection = features.coreset_projection(spec, projection_dim, seed)  # (152, projection_dim)
    per_image = (spec.crop // 8) ** 2  # blocks.2 has stride 8
    num_images = -(-num_points // per_image)
    out = torch.empty(num_images * per_image, projection_dim)
    views = photo_views(num_images, seed)
    batch = 32
    for lo in range(0, num_images, batch):
        images = torch.stack([preprocess.to_tensor(next(views).convert("RGB"), spec.resize, spec.crop)
                              for _ in range(min(batch, num_images - lo))])
        stored = features.embed(extractor, images, spec).reshape(-1, projection.shape[0])
        rows = slice(lo * per_image, lo * per_image + len(stored))
        out[rows] = stored.to(torch.float16).float() @ projection  # float16: the feature store
    out = out[:num_points].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp.npy")
    np.save(partial, out.numpy())
    partial.rename(path)  # published whole, so a killed run leaves no half cache
    return out


def load_projected(args: argparse.Namespace) -> torch.Tensor:
    """The benchmark's (N, projection_dim) points for --features."""
    if args.features == "real":
        return real_projected(args.n, args.projection_dim, args.seed, args.cache_dir)
    return synthetic_projected(args.n, args.intrinsic_dim, args.projection_dim, args.seed)


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
    if args.threads:
        torch.set_num_threads(args.threads)
    points = load_projected(args)
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
        "--plain-full-steps", str(args.plain_full_steps), "--features", args.features,
        "--cache-dir", args.cache_dir, "--threads", str(args.threads),
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--features", choices=["synthetic", "real"], default="synthetic",
                        help="synthetic low-intrinsic-dim features, or real photos' patch features")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir(), "coreset_bench")),
                        help="where --features real caches its projected features (.npy)")
    parser.add_argument("--intrinsic-dim", type=int, default=16, help="latent dimension of the synthetic features")
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain-full-steps", type=int, default=2000, help="longest plain run done in full")
    parser.add_argument("--plain-prefix", type=int, default=500, help="plain steps timed when extrapolating")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in each measurement (0: torch's default); 1 avoids "
                             "OpenMP stalls when other work shares the cores")
    parser.add_argument("--worker", choices=["plain", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.n, args.ratio, args.method = args.n[0], args.ratio[0], args.worker
        worker(args)
        return
    if args.features == "real":
        for n in args.n:  # extracted (or found in the cache) once, before the timed workers
            begin = time.perf_counter()
            real_projected(n, args.projection_dim, args.seed, args.cache_dir)
            print(f"# features for N = {n:,}: {time.perf_counter() - begin:.0f} s "
                  f"(cache: {args.cache_dir})", flush=True)
        data = (f"real patch features of {len(PHOTOS)} skimage photos (random crops 25-100 %, "
                f"rotations, flips; efficientnet_lite0 {','.join(REAL_LAYERS)}, 224 px, 784 patches "
                f"an image, {1024}-dim stored low-rank, float16), projected to {args.projection_dim}")
    else:
        data = (f"synthetic {FEATURE_DIM}-dim float16 features, intrinsic dim {args.intrinsic_dim}, "
                f"projected to {args.projection_dim}")
    threads = args.threads or torch.get_num_threads()
    print(f"# torch {torch.__version__}, {threads} threads; {data}")
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
