"""Peak memory as the data grows (issue 5): extract and score stream, coreset holds N x 128 values.

Each job runs as `python -m jobs ...` on a local Ray while a thread samples its whole process
tree (driver, raylet, Ray workers) from /proc:
  extract, score  at 1x and 10x the images (same shard size): the peaks must not grow;
  coreset         on synthetic float16 feature stores of N1 and N2 rows (D = 1024, fixed rows per
                  shard): the growth of the peak over all processes per added row must be about
                  the projected row (128 float32 = 512 B), never a full-width one (1024 values).
Peaks: driver RSS, largest Ray worker RSS, and the largest sum of PSS over the whole tree at one
instant (shared pages counted once; Ray's object store is shared memory).

    python -m benchmarks.memory_bench                           # 40 vs 400 images, 50k vs 200k rows
    python -m benchmarks.memory_bench --stages coreset --rows 100000,400000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

import numpy as np
import torch

from benchmarks._proctree import MIB, RunResult, job_env, run_monitored
from benchmarks.extract_bench import make_images
from benchmarks.score_bench import make_bank
from patchcore_core import storage
from patchcore_core.spec import ModelSpec, default_layers

PROJECTION_DIM = 128
# TreeStats fields in the tables, and their headings
COLUMNS = ("driver_rss", "driver_anon", "worker_rss", "worker_anon", "worker_pss_total", "pss_total")
HEADINGS = ("driver RSS", "driver anon", "worker RSS", "worker anon", "workers PSS", "all PSS")


def run(argv: Sequence[str], worker_niceness: int) -> RunResult:
    result = run_monitored([sys.executable, "-m", "jobs", *argv], env=job_env(worker_niceness))
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({result.returncode}):\n{result.log_tail}")
    return result


def make_feature_store(uri: str, rows: int, shard_rows: int, spec: ModelSpec, seed: int = 0) -> None:
    """A committed float16 feature store of `rows` random rows in shards of `shard_rows`."""
    if storage.is_committed(uri):
        return
    rng = np.random.default_rng(seed)
    shards, lo, number = [], 0, 0
    while lo < rows:
        count = min(shard_rows, rows - lo)
        name = f"part-{number:05d}.parquet"
        feats = torch.from_numpy(rng.standard_normal((count, spec.embed_dim), dtype=np.float32))
        index = torch.arange(lo, lo + count)
        storage.write_feature_shard(storage.join_uri(uri, name),
                                    [f"image-{i // 784:06d}" for i in range(lo, lo + count)],
                                    (index % 784) // 28, index % 28, feats, "float16")
        shards.append({"file": name, "rows": count})
        lo, number = lo + count, number + 1
    manifest = {"spec": spec.to_json(), "embed_dim": spec.embed_dim, "dtype": "float16",
                "shards": shards, "counts": {"patches": rows}}
    storage.write_manifest(uri, manifest, kind="features")


def peaks(result: RunResult, **size: int) -> dict[str, float]:
    """JSON-able peaks of one run (bytes) with its size (images=... or rows=...)."""
    s = result.stats
    return {**size, "wall_s": result.wall_s, "driver_rss": s.driver_rss, "worker_rss": s.worker_rss,
            "driver_anon": s.driver_anon, "worker_anon": s.worker_anon,
            "workers_pss": s.worker_pss_total, "all_pss": s.pss_total}


def image_rows(stage: str, counts: Sequence[int], results: Sequence[RunResult]) -> list[str]:
    lines = []
    for count, result in zip(counts, results):
        s = result.stats
        lines.append(f"{stage:<8}{count:>9}{result.wall_s:>8.0f}" + "".join(
            f"{getattr(s, key) / MIB:>12.0f}" for key in COLUMNS))
    first, last = results[0].stats, results[-1].stats
    lines.append(f"{'':<8}{'last/first':>9}{'':>8}" + "".join(
        f"{getattr(last, key) / max(1, getattr(first, key)):>12.2f}" for key in COLUMNS))
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="extract,score,coreset")
    parser.add_argument("--backbone", default="efficientnet_lite0",
                        help="features are 784 x 1024 per 224 px image for either default backbone")
    parser.add_argument("--images", default="40,400", help="1x and 10x image counts")
    parser.add_argument("--source-px", type=int, default=128, help="side of the synthetic PNGs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=20, help="images per shard (both runs)")
    parser.add_argument("--bank-size", type=int, default=4096, help="entries of the score bank")
    parser.add_argument("--rows", default="50000,200000", help="coreset feature-store rows N1,N2")
    parser.add_argument("--shard-rows", type=int, default=12544, help="rows per feature shard (16 images)")
    parser.add_argument("--coreset-size", type=int, default=1000, help="greedy steps (--size)")
    parser.add_argument("--worker-niceness", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the peaks here (plot_results.py reads it)")
    parser.add_argument("--workdir", default="", help="default: a temporary folder, removed after")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    record: dict[str, list[dict[str, float]]] = {}
    counts = [int(c) for c in args.images.split(",")]
    workdir = args.workdir or tempfile.mkdtemp(prefix="memory-bench-")
    spec = ModelSpec(backbone=args.backbone, weights="none", layers=default_layers(args.backbone))
    model_flags = ["--backbone", args.backbone, "--weights", "none", "--device", "cpu",
                   "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]
    print(f"# {args.backbone}, images {counts} of {args.source_px} px, batch {args.batch_size}, "
          f"shard {args.shard_size}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}", flush=True)
    table: list[str] = []
    try:
        paths = make_images(os.path.join(workdir, "images"), max(counts), args.source_px)
        listings = []
        for count in counts:
            listings.append(os.path.join(workdir, f"images-{count}.txt"))
            with open(listings[-1], "w") as f:
                f.write("\n".join(paths[:count]) + "\n")
        if "extract" in stages:
            results = []
            for count, listing in zip(counts, listings):
                out = os.path.join(workdir, f"features-{count}")
                results.append(run(["extract", "--train", listing, "--out", out, *model_flags],
                                   args.worker_niceness))
                print(f"# extract {count} images: {results[-1].wall_s:.0f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            table += image_rows("extract", counts, results)
            record["extract"] = [peaks(result, images=c) for c, result in zip(counts, results)]
        if "score" in stages:
            bank = os.path.join(workdir, "bank")
            make_bank(bank, spec, args.bank_size)
            results = []
            for count, listing in zip(counts, listings):
                out = os.path.join(workdir, f"results-{count}")
                results.append(run(["score", "--bank", bank, "--images", listing, "--out", out,
                                    *model_flags[4:]], args.worker_niceness))
                print(f"# score {count} images: {results[-1].wall_s:.0f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            table += image_rows("score", counts, results)
            record["score"] = [peaks(result, images=c) for c, result in zip(counts, results)]
        coreset_lines = []
        if "coreset" in stages:
            sizes = [int(r) for r in args.rows.split(",")]
            results = []
            for rows in sizes:
                store = os.path.join(workdir, f"store-{rows}")
                make_feature_store(store, rows, args.shard_rows, spec)
                out = os.path.join(workdir, f"bank-{rows}")
                results.append(run(["coreset", "--features", store, "--out", out, "--size",
                                    str(args.coreset_size), "--device", "cpu"], args.worker_niceness))
                print(f"# coreset {rows} rows: {results[-1].wall_s:.0f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(store, ignore_errors=True)
            for rows, result in zip(sizes, results):
                s = result.stats
                coreset_lines.append(
                    f"{rows:>9}{result.wall_s:>8.0f}" + "".join(f"{getattr(s, key) / MIB:>12.0f}" for key in COLUMNS)
                    + f"{rows * PROJECTION_DIM * 4 / MIB:>12.0f}{rows * spec.embed_dim * 2 / MIB:>12.0f}")
            record["coreset"] = [peaks(result, rows=n) for n, result in zip(sizes, results)]
            (n1, r1), (n2, r2) = (sizes[0], results[0]), (sizes[-1], results[-1])
            per_row = (r2.stats.pss_total - r1.stats.pss_total) / (n2 - n1)
            workers_per_row = (r2.stats.worker_pss_total - r1.stats.worker_pss_total) / (n2 - n1)
            coreset_lines.append(
                f"growth per added row: all processes {per_row:.0f} B, Ray workers {workers_per_row:.0f} B "
                f"(projected row: {PROJECTION_DIM * 4} B; full row: {spec.embed_dim * 2} B float16, "
                f"{spec.embed_dim * 4} B float32)")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    head = f"{'wall s':>8}" + "".join(f"{h:>12}" for h in HEADINGS)
    if table:
        print(f"\n{'stage':<8}{'images':>9}{head}")
        print("\n".join(table))
    if coreset_lines:
        print(f"\n{'coreset N':>9}{head}{'N*128*4':>12}{'N*1024*2':>12}")
        print("\n".join(coreset_lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    print("\nMiB. driver RSS / worker RSS: peak of the driver / of the largest Ray worker process, "
          "anon: their private heap (RSS without shared memory such as Ray's object store); "
          "workers PSS / all PSS: peak sum of PSS over the Ray workers / over the whole process tree.")


if __name__ == "__main__":
    main()
