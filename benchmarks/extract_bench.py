"""Extract throughput (issue 5): the `patchcore extract` job against the bare backbone, same images.

For each backbone, on the same synthetic images and batch size, in one run:
  forward  the backbone alone (FeatureExtractor up to the deepest layer) on preprocessed tensors,
           in this process on 1 thread and on all: the best is the machine's limit for the stage;
  embed    forward + locally aware patch aggregation (features.embed, paper §3.1): the least work
           that produces the features the job stores;
  job      `python -m jobs extract` on a local Ray (decode tasks, a model actor, the driver writing
           Parquet). Steady state: least-squares slope of committed images against the shard
           commit times, after the first commit (Ray start-up and model loading excluded), and
           the CPU seconds per image of all its processes between the first and last commit;
  split    CPU ms per image of each step (read, decode, preprocess, forward, aggregate, float16,
           parquet) in this process on 1 thread: where the job's time goes.
The bare rates are measured before and after the jobs and averaged. On a shared machine wall
rates swing with the load; CPU seconds per image (bare embed over job: 1 = no work beyond embed)
are the steadier comparison. Ray workers run at nice 0 here, like the bare pass (Ray: 15). This
process keeps freed memory as the job's model actors do (jobs.cluster.keep_freed_memory): otherwise
its forward speed would depend on what it allocated before (glibc's mmap threshold rises with the
largest block freed), e.g. efficientnet_lite0 at batch 8 anywhere from 17 to 30 ms per image.

    python -m benchmarks.extract_bench                     # both backbones, default sizes
    python -m benchmarks.extract_bench --backbones efficientnet_lite0 --images 96 --batch-size 16
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from benchmarks._proctree import MIB, RunResult, TreeStats, job_env, run_monitored
from jobs.cluster import keep_freed_memory
from patchcore_core import backbone, features, model, preprocess, storage
from patchcore_core.spec import ModelSpec, default_layers


def texture(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Seeded striped texture with noise and a random blob, (height, width, 3) uint8."""
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    base = 128 + 50 * np.sin(x / rng.uniform(2, 6)) * np.cos(y / rng.uniform(3, 9))
    base = base + 15 * rng.standard_normal((height, width))
    pixels = np.stack([base, base * 0.85, base * 0.6], -1)
    cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(4, 1 + max(5, width // 10))
    pixels[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_images(folder: str, count: int, size: int, seed: int = 0, height: int | None = None
                ) -> list[str]:
    """`count` seeded PNGs of size x size px (size x height with `height`) in `folder` (reused
    when already there); their paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"{i:06d}.png")
        pixels = texture(size, height or size, rng)  # drawn even when reused: image i is the same
        if not os.path.exists(path):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            storage.write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths


def decode_all(paths: Sequence[str], spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """(N, 3, crop, crop) preprocessed images and the decode+preprocess rate (images/s, 1 thread)."""
    start = time.perf_counter()
    tensors = [preprocess.to_tensor(preprocess.decode_image(storage.read_bytes(p)), spec.resize, spec.crop)
               for p in paths]
    return torch.stack(tensors), len(paths) / (time.perf_counter() - start)


def bare_rates(extractor: backbone.FeatureExtractor, images: torch.Tensor, spec: ModelSpec,
               batch_size: int, threads: int) -> dict[str, float]:
    """Images/s and CPU s/image of forward and embed over `images` in batches on `threads`
    threads, each after a warm-up batch: keys forward, embed, forward_cpu, embed_cpu."""
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        with torch.inference_mode():
            for key, step in (("forward", extractor), ("embed", lambda x: features.embed(extractor, x, spec))):
                step(batches[0])
                wall, cpu = time.perf_counter(), time.process_time()
                for batch in batches:
                    step(batch)
                out[key] = len(images) / (time.perf_counter() - wall)
                out[key + "_cpu"] = (time.process_time() - cpu) / len(images)
    finally:
        torch.set_num_threads(saved)
    return out


class Stopwatch:
    """CPU seconds of this process per named step, summed over calls: `with clock("step"): ...`."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        start = time.process_time()
        try:
            yield
        finally:
            self.cpu[key] = self.cpu.get(key, 0.0) + time.process_time() - start

    def ms_per(self, count: int) -> dict[str, float]:
        return {key: 1000.0 * seconds / count for key, seconds in self.cpu.items()}


def stage_split(paths: Sequence[str], extractor: backbone.FeatureExtractor, spec: ModelSpec,
                batch_size: int, folder: str) -> dict[str, float]:
    """CPU ms per image of each step the job does for an image, in this process on 1 thread:
    read, decode, preprocess (decode stage); forward, aggregate (§3.1), float16 (actor);
    parquet (storage.write_feature_shard of the batch, as the driver writes a shard).
    The first batch runs twice, once untimed: one-time costs (pyarrow's first Parquet write
    takes ~0.5 s) are paid once per job process, not per image."""
    clock = Stopwatch()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for k, lo in enumerate([0, *range(0, len(paths), batch_size)]):
                if k == 1:
                    clock.cpu.clear()  # forget the warm-up pass over the first batch
                chunk = paths[lo : lo + batch_size]
                with clock("read"):
                    data = [storage.read_bytes(p) for p in chunk]
                with clock("decode"):
                    decoded = [preprocess.decode_image(d) for d in data]
                with clock("preprocess"):
                    images = torch.stack([preprocess.to_tensor(i, spec.resize, spec.crop) for i in decoded])
                with clock("forward"):
                    maps = extractor(images)
                with clock("aggregate"):
                    feats = features.patch_features(maps, spec.patch_size, spec.embed_dim,
                                                    aggregation=spec.aggregation)
                with clock("float16"):
                    half = feats.to(torch.float16)  # as the actor casts
                row_ids, ys, xs, flat = model.flatten_patches(half, chunk)
                with clock("parquet"):
                    storage.write_feature_shard(os.path.join(folder, "split.parquet"), row_ids, ys, xs,
                                                flat, "float16")
    finally:
        torch.set_num_threads(saved)
    return clock.ms_per(len(paths))


def commit_times(out: str) -> list[tuple[float, int]]:
    """(unix mtime, images) of each shard commit record of a job folder, in commit order."""
    records = []
    for path in glob.glob(os.path.join(out, "_shards", "part-*.json")):
        with open(path) as f:
            record = json.load(f)
        records.append((os.stat(path).st_mtime, int(record.get("images", record.get("inputs", 0)))))
    return sorted(records)


def steady_state(records: Sequence[tuple[float, int]], stats: TreeStats) -> dict[str, float]:
    """Rate and CPU per image over every commit after the first (which carries Ray start-up and
    model loading): rate = least-squares slope of committed images against commit time;
    cpu = CPU seconds of the whole process tree (driver, workers) between the first and the
    last commit over the images committed in between. nan when fewer than three shards."""
    if len(records) < 3:
        nan = float("nan")
        return {"rate": nan, "images": 0, "seconds": 0.0, "cpu": nan, "driver_cpu": nan}
    times = np.array([t for t, _ in records])
    done = np.cumsum([n for _, n in records[1:]])
    slope = float(np.polyfit(times[1:] - times[1], done, 1)[0])
    (d0, _, a0), (d1, _, a1) = stats.cpu_at(times[0]), stats.cpu_at(times[-1])
    images = int(done[-1])
    return {"rate": slope, "images": images, "seconds": float(times[-1] - times[0]),
            "cpu": (a1 - a0) / images, "driver_cpu": (d1 - d0) / images}


def split_env(tokens: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Job flags and NAME=value environment settings (e.g. OMP_NUM_THREADS=2) among `tokens`."""
    flags, env = [], {}
    for token in tokens:
        name, eq, value = token.partition("=")
        # NAME starts upper case (OMP_NUM_THREADS, RAY_idle_worker_killing_time_threshold_ms)
        if eq and name[:1].isupper() and name.replace("_", "").isalnum():
            env[name] = value
        else:
            flags.append(token)
    return flags, env


def run_job(argv: Sequence[str], worker_niceness: int) -> tuple[dict[str, float], RunResult]:
    """Run `python -m jobs ...` (NAME=value tokens set its environment) under the tree sampler;
    its steady state (see `steady_state`) and the run."""
    argv, extra_env = split_env(argv)
    out = argv[argv.index("--out") + 1]
    result = run_monitored([sys.executable, "-m", "jobs", *argv],
                           env={**job_env(worker_niceness), **extra_env})
    if result.returncode != 0:
        raise RuntimeError(f"job failed ({result.returncode}):\n{result.log_tail}")
    return steady_state(commit_times(out), result.stats), result


def parse_variants(text: str) -> list[tuple[str, list[str]]]:
    """'label=flags;label=flags' -> [(label, [flag, ...])]; one job run per variant."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        label, _, flags = part.partition("=")
        out.append((label.strip(), flags.split()))
    if not out:
        raise ValueError(f"--variants needs at least one 'label=flags' entry, got {text!r}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="wide_resnet50_2,efficientnet_lite0")
    parser.add_argument("--weights", default="none", help="none is as fast as real weights")
    parser.add_argument("--images", type=int, default=0,
                        help="images through the job; 0 = 48 for wide_resnet50_2, 96 for the others")
    parser.add_argument("--bare-images", type=int, default=16, help="images per bare measurement")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=0, help="0 = the batch size")
    parser.add_argument("--source-px", type=int, default=256, help="side of the synthetic PNGs")
    parser.add_argument("--variants", default="job=",
                        help="job runs as 'label=extra flags;...', e.g. 'job=;half=--cpus-per-worker 0.5;"
                             "t2=OMP_NUM_THREADS=2' (NAME=value sets the job's environment)")
    parser.add_argument("--worker-niceness", type=int, default=0,
                        help="nice of Ray workers (Ray's default is 15; the bare pass runs at 0)")
    parser.add_argument("--workdir", default="", help="default: a temporary folder, removed after")
    args = parser.parse_args(argv)
    variants = parse_variants(args.variants)
    keep_freed_memory()  # as the job's model actors do
    shard_size = args.shard_size or args.batch_size
    threads = sorted({1, torch.get_num_threads()})
    workdir = args.workdir or tempfile.mkdtemp(prefix="extract-bench-")
    print(f"# batch {args.batch_size}, shard {shard_size}, PNGs of {args.source_px} px, bare on "
          f"{args.bare_images} images at {threads} threads, cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    try:
        for name in args.backbones.split(","):
            count = args.images or (48 if name.startswith("wide_resnet") else 96)
            folder = os.path.join(workdir, "images")
            paths = make_images(folder, count, args.source_px)
            listing = os.path.join(workdir, f"images-{count}.txt")
            with open(listing, "w") as f:
                f.write("\n".join(paths) + "\n")
            spec = ModelSpec(backbone=name, weights=args.weights, layers=default_layers(name))
            extractor = backbone.load_backbone(spec, "cpu")
            images, decode_rate = decode_all(paths[: args.bare_images], spec)
            bare = {t: [bare_rates(extractor, images, spec, args.batch_size, t)] for t in threads}
            jobs = []
            for label, extra in variants:
                out = os.path.join(workdir, f"features-{name}")
                shutil.rmtree(out, ignore_errors=True)
                job = ["extract", "--train", listing, "--out", out, "--backbone", name,
                       "--weights", args.weights, "--device", "cpu", "--batch-size",
                       str(args.batch_size), "--shard-size", str(shard_size), *extra]
                steady, result = run_job(job, args.worker_niceness)
                jobs.append((label, steady, result))
                print(f"# {name} {label}: {steady['rate']:.2f} img/s, {steady['cpu']:.3f} CPU s/img "
                      f"(driver {steady['driver_cpu']:.3f}) over {steady['images']} images in "
                      f"{steady['seconds']:.1f} s of commits; {result.wall_s:.1f} s in all", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            for t in threads:
                bare[t].append(bare_rates(extractor, images, spec, args.batch_size, t))
                before, after = bare[t]
                print(f"# {name} bare at {t} thread(s), before/after: forward {before['forward']:.2f}/"
                      f"{after['forward']:.2f} img/s {before['forward_cpu']:.3f}/"
                      f"{after['forward_cpu']:.3f} CPU s/img, embed {before['embed']:.2f}/"
                      f"{after['embed']:.2f} img/s {before['embed_cpu']:.3f}/{after['embed_cpu']:.3f} "
                      "CPU s/img", flush=True)
            mean = {t: {k: (bare[t][0][k] + bare[t][1][k]) / 2 for k in bare[t][0]} for t in threads}
            split = stage_split(paths[: args.bare_images], extractor, spec, args.batch_size, workdir)
            rows.append((name, count, mean, decode_rate, jobs, split))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    head = "".join(f"{'fwd@' + str(t):>8}{'emb@' + str(t):>8}" for t in threads)
    print(f"{'backbone':<19}{head}{'decode':>7}  {'job':<10}{'img/s':>6}{'/fwd':>6}{'/emb':>6}"
          f"{'CPU s/img':>10}{'emb/job':>8}{'wall s':>7}{'PSS MiB':>8}")
    for name, count, mean, decode_rate, jobs, _ in rows:
        forward = max(m["forward"] for m in mean.values())  # the machine's limit: best thread count
        embed = max(m["embed"] for m in mean.values())
        embed_cpu = min(m["embed_cpu"] for m in mean.values())
        bare_cols = "".join(f"{mean[t]['forward']:>8.2f}{mean[t]['embed']:>8.2f}" for t in threads)
        for k, (label, steady, result) in enumerate(jobs):
            lead = f"{name:<19}{bare_cols}{decode_rate:>7.1f}" if k == 0 else " " * (26 + 16 * len(threads))
            print(f"{lead}  {label:<10}{steady['rate']:>6.2f}{steady['rate'] / forward:>6.2f}"
                  f"{steady['rate'] / embed:>6.2f}{steady['cpu']:>10.3f}{embed_cpu / steady['cpu']:>8.2f}"
                  f"{result.wall_s:>7.0f}{result.stats.pss_total / MIB:>8.0f}")
    print("\nimg/s. fwd@t, emb@t: bare forward, forward + patch aggregation, on t threads, mean of "
          "before and after the jobs. decode: read+decode+preprocess, 1 thread. /fwd, /emb: job "
          "steady-state rate over the best bare rate. CPU s/img: all job processes, steady state; "
          "emb/job: bare embed CPU s/img over it (1 = no work beyond embed). PSS: peak, whole tree.")
    keys = ["read", "decode", "preprocess", "forward", "aggregate", "float16", "parquet"]
    print(f"\n{'CPU ms/image, 1 thread':<23}" + "".join(f"{k:>11}" for k in keys) + f"{'total':>8}"
          + f"{'fwd share':>10}")
    for name, *_, split in rows:
        total = sum(split.values())
        print(f"{name:<23}" + "".join(f"{split[k]:>11.1f}" for k in keys) + f"{total:>8.1f}"
              + f"{split['forward'] / total:>10.2f}")


if __name__ == "__main__":
    main()
