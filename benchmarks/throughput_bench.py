"""Scoring throughput against its ceilings (issue 11): `patchcore score` steady state beside an
in-process predict loop of the same code and the bare backbone forward, in one run.

For each backbone and bank size (a bank of random entries at the spec's stored width: exact kNN
costs the same whatever the values), on the same images:
  forward  the backbone alone on preprocessed images, all CPUs as torch threads: the limit no
           scoring job can pass;
  loop     decode + `model.predict` in one process, all CPUs (what a user would write by hand);
           forward and loop run forwards of jobs.cluster.forward_batch images, as the job's actors;
  job      `python -m jobs score` on a local Ray (maps and masks written), steady state as its
           pipeline reports it in the results manifest (`timing`: rows back from the last stage
           after the first batch; start-up excluded), CPU over that window.
Ratios job/loop and job/forward are the figures the issue sets targets for. `--knn` adds one job
run per approximate option, with the recall@1 its manifest records.

    python -m benchmarks.throughput_bench
    python -m benchmarks.throughput_bench --backbones efficientnet_lite0 --bank-sizes 3000 --images 48
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import torch

from benchmarks._proctree import RunResult
from benchmarks.extract_bench import decode_all, make_images, parse_variants, run_job
from jobs import cluster
from patchcore_core import backbone, model, preprocess, storage
from patchcore_core.bank import Bank
from patchcore_core.features import feature_width
from patchcore_core.spec import ModelSpec, default_layers

WEIGHTS = {"efficientnet_lite0": "default", "wide_resnet50_2": "none"}  # lite0's ship offline


def make_bank(uri: str, spec: ModelSpec, size: int, seed: int = 0) -> None:
    """Save a calibrated-looking bank of `size` random entries at the spec's stored width."""
    rng = np.random.default_rng(seed)
    width = feature_width(spec)
    feats = rng.standard_normal((size, width), dtype=np.float32)
    storage.save_bank(uri, Bank(
        spec=spec, features=torch.from_numpy(feats),
        image_ids=tuple(f"bank-{i // 784:06d}" for i in range(size)),
        ys=torch.zeros(size, dtype=torch.int64), xs=torch.zeros(size, dtype=torch.int64),
        projection_seed=seed, coverage_radius=1.0, image_threshold=1.0, pixel_threshold=1.0,
        info={"benchmark": "random bank"}))


def forward_rate(spec: ModelSpec, images: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(images/s, CPU s per image) of the bare backbone forward over preprocessed `images`, after
    one warm-up batch."""
    extractor = backbone.load_backbone(spec, torch.device("cpu"))
    batches = list(images.split(cluster.forward_batch("cpu", batch_size)))
    with torch.inference_mode():
        extractor(batches[0])
        start, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            extractor(batch)
    return (len(images) / (time.perf_counter() - start),
            (time.process_time() - cpu) / len(images))


def loop_rate(bank_uri: str, paths: Sequence[str], batch_size: int) -> tuple[float, float]:
    """(images/s, CPU s per image, all threads) of decode + model.predict in this process, after
    one warm-up batch. CPU per image, unlike the rate, hardly moves with other load."""
    patchcore = model.load(bank_uri, "cpu", threads=torch.get_num_threads())
    spec = patchcore.spec

    def step(batch_paths: Sequence[str]) -> None:
        images = torch.stack([
            preprocess.to_tensor(preprocess.decode_image(storage.read_bytes(p)), spec.resize,
                                 spec.crop, frame=spec.frame)
            for p in batch_paths])
        model.predict(patchcore, images, batch_size=cluster.forward_batch("cpu", batch_size))

    step(paths[:batch_size])
    start, cpu = time.perf_counter(), time.process_time()
    for lo in range(0, len(paths), batch_size):
        step(paths[lo : lo + batch_size])
    return len(paths) / (time.perf_counter() - start), (time.process_time() - cpu) / len(paths)


def job_steady_state(timing: dict, result: RunResult) -> dict[str, float]:
    """The job's steady state as its pipeline measured it (results manifest `timing`: rows back
    from the last stage after the first batch, over the time from it to the last): rate, and CPU
    seconds of the whole process tree between those two instants per image."""
    first, last = timing["first_rows_unix"], timing["last_rows_unix"]
    images = timing["steady_images"]
    if not images:  # a single batch: no steady state (use more images than --batch-size)
        return {"rate": float("nan"), "cpu": float("nan")}
    cpu = (result.stats.cpu_at(last)[2] - result.stats.cpu_at(first)[2]) / images
    return {"rate": timing["steady_images_per_s"], "cpu": cpu}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="efficientnet_lite0,wide_resnet50_2")
    parser.add_argument("--bank-sizes", default="3000,16000", help="comma-separated entry counts")
    parser.add_argument("--images", type=int, default=48, help="images through each job and loop")
    parser.add_argument("--batch-size", type=int, default=32, help="the job's default")
    parser.add_argument("--shard-size", type=int, default=256, help="the job's default")
    parser.add_argument("--source-px", type=int, default=300, help="side of the synthetic PNGs")
    parser.add_argument("--knn", default="", help="approximate options to add, e.g. ivf-flat,ivf-pq")
    parser.add_argument("--variants", default="job=",
                        help="exact-kNN job runs as 'label=extra flags;...', e.g. "
                             "'job=;one=--workers 1 --cpus-per-worker 1.5' (NAME=value sets the "
                             "job's environment)")
    parser.add_argument("--workdir", default="", help="default: a temporary folder, removed after")
    args = parser.parse_args(argv)
    variants = parse_variants(args.variants)
    workdir = args.workdir or tempfile.mkdtemp(prefix="throughput-bench-")
    print(f"# batch {args.batch_size} (forwards of {cluster.forward_batch('cpu', args.batch_size)}"
          f"), shard {args.shard_size}, {args.images} PNGs of {args.source_px} px, cpus "
          f"{os.cpu_count()}, torch threads {torch.get_num_threads()}, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    try:
        paths = make_images(os.path.join(workdir, "images"), args.images, args.source_px)
        listing = os.path.join(workdir, "images.txt")
        with open(listing, "w") as f:
            f.write("\n".join(paths) + "\n")
        for name in args.backbones.split(","):
            spec = ModelSpec(backbone=name, weights=WEIGHTS.get(name, "none"),
                             layers=default_layers(name))
            images, _ = decode_all(paths, spec)
            forward, forward_cpu = forward_rate(spec, images, args.batch_size)
            for size in (int(s) for s in args.bank_sizes.split(",")):
                bank = os.path.join(workdir, f"bank-{name}-{size}")
                make_bank(bank, spec, size)
                loop, loop_cpu = loop_rate(bank, paths, args.batch_size)
                runs = [(label, "exact", flags) for label, flags in variants]
                runs += [(m, m, []) for m in filter(None, args.knn.split(","))]
                for label, method, flags in runs:
                    out = os.path.join(workdir, f"results-{name}-{size}-{label}")
                    _, result = run_job(
                        ["score", "--bank", bank, "--images", listing, "--out", out, "--device",
                         "cpu", "--batch-size", str(args.batch_size), "--shard-size",
                         str(args.shard_size), "--knn", method, *flags], worker_niceness=0)
                    manifest = storage.read_manifest(out, "results")
                    steady = job_steady_state(manifest["timing"], result)
                    recall = ((manifest.get("knn") or {}).get("recall") or {}).get("recall_at_1")
                    row = (name, feature_width(spec), size, label, forward, loop, steady["rate"],
                           result.wall_s, recall, 1e3 * forward_cpu, 1e3 * loop_cpu,
                           1e3 * steady["cpu"])
                    rows.append(row)
                    print("# " + json.dumps(row), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(bank, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{'backbone':<20}{'width':>6}{'bank':>8}{'run':>10}{'forward':>9}{'loop':>7}{'job':>7}"
          f"{'job/loop':>9}{'job/fwd':>8}{'wall s':>8}{'recall@1':>9}"
          f"{'fwd ms':>8}{'loop ms':>8}{'job ms':>8}")
    for (name, width, size, method, forward, loop, job, wall, recall, forward_ms, loop_ms,
         job_ms) in rows:
        print(f"{name:<20}{width:>6}{size:>8}{method:>10}{forward:>9.2f}{loop:>7.2f}{job:>7.2f}"
              f"{job / loop:>9.2f}{job / forward:>8.2f}{wall:>8.1f}"
              f"{'-' if recall is None else f'{recall:.3f}':>9}"
              f"{forward_ms:>8.0f}{loop_ms:>8.0f}{job_ms:>8.0f}")
    print("\nimages/s; forward = bare backbone, loop = decode + model.predict in one process, job = "
          "`patchcore score` steady state (maps and masks written), all on the same CPUs. "
          "fwd/loop/job ms: CPU milliseconds per image (all threads; the job's whole process "
          "tree: driver, Ray, decode, actors, file writes), which other load hardly moves.")


if __name__ == "__main__":
    main()
