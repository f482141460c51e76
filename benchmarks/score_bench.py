"""Score throughput (issue 5): end-to-end images/s of `patchcore score` and where an image's time goes.

For each bank size (synthetic banks: random D-wide features saved with storage.save_bank; exact
kNN costs the same whatever the values), in one run:
  split  CPU ms per image of each step the score actor does, timed in this process on 1 thread
         (as a CPU actor runs: Ray gives it OMP_NUM_THREADS=1) by calling the same core
         functions: read+decode+preprocess, backbone forward, patch aggregation (§3.1), kNN
         (nearest bank entry of every patch), reweight (Eq. 7: the b nearest of m*), maps
         (upsample + Gaussian), and the files: uncrop to the input size + heatmap/mask pixels,
         PNG encode, write. Target: everything but backbone and kNN <= 20% of the total.
  job    `python -m jobs score` on a local Ray, steady state from the shard commit times (as
         extract_bench), with the CPU seconds per image of all its processes.

    python -m benchmarks.score_bench                        # banks of 16k and 160k entries
    python -m benchmarks.score_bench --bank-sizes 16000 --images 48 --source-px 1024
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

import faiss
import numpy as np
import torch

from benchmarks._proctree import MIB
from benchmarks.extract_bench import Stopwatch, make_images, run_job
from benchmarks.throughput_bench import make_bank
from jobs import score
from patchcore_core import features, knn, model, preprocess, scoring, storage
from patchcore_core.spec import ModelSpec, default_layers

BACKBONE_KEYS = ("forward", "aggregate")
KNN_KEYS = ("knn", "reweight")
OTHER_KEYS = ("decode", "maps", "uncrop", "png", "write")


def reweight(patchcore: model.PatchCore, queries: torch.Tensor, patch_scores: torch.Tensor,
             ids: torch.Tensor) -> torch.Tensor:
    """Eq. 7 image scores as model.score_patches computes them after its first search (B,)."""
    B = patch_scores.shape[0]
    flat = patch_scores.reshape(B, -1)
    worst = flat.argmax(dim=1)
    rows = torch.arange(B) * flat.shape[1] + worst
    b = min(patchcore.spec.reweight_neighbors, patchcore.bank.size)
    _, neighbour_ids = knn.search(patchcore.index, patchcore.bank.features[ids[rows, 0]], b)
    neighbours = patchcore.bank.features[neighbour_ids]  # (B, b, D)
    to_neighbours = torch.linalg.vector_norm(queries[rows][:, None, :] - neighbours, dim=-1)
    return scoring.reweighted_image_scores(flat.gather(1, worst[:, None])[:, 0], to_neighbours)


def stage_split(paths: Sequence[str], bank_uri: str, batch_size: int, folder: str) -> dict[str, float]:
    """CPU ms per image of each step of the score actor for `paths` (see module docstring)."""
    clock = Stopwatch()
    saved, saved_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        patchcore = model.load(bank_uri, "cpu")
        spec, threshold = patchcore.spec, float(patchcore.bank.pixel_threshold)
        with torch.inference_mode():
            for lo in range(0, len(paths), batch_size):
                with clock("decode"):  # the decode stage: read, decode, preprocess
                    decoded = [preprocess.decode_image(storage.read_bytes(p)) for p in paths[lo : lo + batch_size]]
                    images = torch.stack([preprocess.to_tensor(i, spec.resize, spec.crop) for i in decoded])
                with clock("forward"):
                    maps = patchcore.extractor(images)
                with clock("aggregate"):
                    factors = features.stored_factors(spec)  # low-rank storage, as features.embed
                    feats = (features.low_rank_patch_features(maps, spec.patch_size, factors.coefficients)
                             if factors is not None else
                             features.patch_features(maps, spec.patch_size, spec.embed_dim,
                                                     aggregation=spec.aggregation))
                B, h, w, D = feats.shape
                # model.score_patches, step by step: nearest bank entry of every patch (Eq. 6) ...
                queries = feats.reshape(B * h * w, D)
                with clock("knn"):
                    dists, ids = knn.search(patchcore.index, queries, 1)
                patch_scores = dists[:, 0].reshape(B, h, w)
                with clock("reweight"):  # ... then Eq. 7 with the b nearest bank entries of m*
                    image_scores = reweight(patchcore, queries, patch_scores, ids)
                assert image_scores.shape == (B,)
                with clock("maps"):  # what model.predict adds: maps and the location of their maxima
                    amaps = scoring.anomaly_maps(patch_scores, spec.crop, spec.sigma)
                    amaps.reshape(B, -1).argmax(dim=1)
                for j, image in enumerate(decoded):  # what score.write_files does per image (the CPU stage after the model actor)
                    width, height = image.size
                    with clock("uncrop"):
                        full = preprocess.uncrop_map(amaps[j], width, height, spec.resize, spec.crop)
                        heat = score.heatmap_pixels(full, threshold)
                        mask = np.where((full > threshold).numpy(), 255, 0).astype(np.uint8)
                    with clock("png"):
                        pngs = preprocess.encode_png(heat), preprocess.encode_png(mask)
                    with clock("write"):
                        for kind, body in zip(("map", "mask"), pngs):
                            storage.write_bytes(os.path.join(folder, "split", kind, f"{lo + j:06d}.png"), body)
    finally:
        torch.set_num_threads(saved)
        faiss.omp_set_num_threads(saved_faiss)
    return clock.ms_per(len(paths))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--weights", default="none", help="none is as fast as real weights")
    parser.add_argument("--bank-sizes", default="16000,160000", help="comma-separated entry counts")
    parser.add_argument("--images", type=int, default=24, help="images through each job")
    parser.add_argument("--split-images", type=int, default=8, help="images in the in-process split")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=0, help="0 = the batch size")
    parser.add_argument("--source-px", type=int, default=256, help="side of the synthetic PNGs")
    parser.add_argument("--extra", default="", help="more job flags / NAME=value environment")
    parser.add_argument("--no-job", action="store_true", help="only the in-process split")
    parser.add_argument("--worker-niceness", type=int, default=0,
                        help="nice of Ray workers (Ray's default is 15; the split runs at 0)")
    parser.add_argument("--workdir", default="", help="default: a temporary folder, removed after")
    args = parser.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        # torch, faiss and its BLAS read OMP_NUM_THREADS when loaded: run as a 1-CPU Ray actor does
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        raw = list(sys.argv[1:] if argv is None else argv)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.score_bench", *raw], env)
    sizes = [int(s) for s in args.bank_sizes.split(",")]
    shard_size = args.shard_size or args.batch_size
    workdir = args.workdir or tempfile.mkdtemp(prefix="score-bench-")
    spec = ModelSpec(backbone=args.backbone, weights=args.weights, layers=default_layers(args.backbone))
    print(f"# {args.backbone}, batch {args.batch_size}, shard {shard_size}, PNGs of {args.source_px} "
          f"px, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    try:
        paths = make_images(os.path.join(workdir, f"images-{args.source_px}"), args.images, args.source_px)
        listing = os.path.join(workdir, f"images-{args.source_px}-{args.images}.txt")
        with open(listing, "w") as f:
            f.write("\n".join(paths) + "\n")
        for size in sizes:
            bank = os.path.join(workdir, f"bank-{args.backbone}-{size}")
            make_bank(bank, spec, size)
            split = stage_split(paths[: args.split_images], bank, args.batch_size, workdir)
            print(f"# bank {size}: split " + ", ".join(f"{k} {v:.1f}" for k, v in split.items())
                  + " CPU ms/img", flush=True)
            steady, wall, pss = {"rate": float("nan"), "cpu": float("nan")}, float("nan"), float("nan")
            if not args.no_job:
                out = os.path.join(workdir, f"results-{size}")
                shutil.rmtree(out, ignore_errors=True)
                job = ["score", "--bank", bank, "--images", listing, "--out", out, "--device", "cpu",
                       "--batch-size", str(args.batch_size), "--shard-size", str(shard_size),
                       *args.extra.split()]
                steady, result = run_job(job, args.worker_niceness)
                wall, pss = result.wall_s, result.stats.pss_total / MIB
                print(f"# bank {size} job: {steady['rate']:.2f} img/s, {steady['cpu']:.3f} CPU s/img "
                      f"(driver {steady['driver_cpu']:.3f}) over {steady['images']} images in "
                      f"{steady['seconds']:.1f} s of commits; {wall:.1f} s in all", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            rows.append((size, split, steady, wall, pss))
            shutil.rmtree(bank, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    keys = [*BACKBONE_KEYS, *KNN_KEYS, *OTHER_KEYS]
    print(f"\n{'bank':>8} " + "".join(f"{k:>10}" for k in keys) + f"{'total':>9}{'other %':>9}"
          f"{'job img/s':>10}{'job CPU s':>10}{'job/split':>10}{'PSS MiB':>8}")
    for size, split, steady, wall, pss in rows:
        total = sum(split[k] for k in keys)
        other = sum(split[k] for k in OTHER_KEYS)
        print(f"{size:>8} " + "".join(f"{split[k]:>10.1f}" for k in keys) + f"{total:>9.1f}"
              f"{100 * other / total:>8.1f}%{steady['rate']:>10.2f}{steady['cpu']:>10.3f}"
              f"{steady['cpu'] * 1000 / total:>10.2f}{pss:>8.0f}")
    print("\nCPU ms per image on 1 thread (torch and faiss), in this process. other % = decode + maps "
          "+ uncrop + png + write over the total (target <= 20%). job: steady-state images/s and CPU "
          "s per image of all job processes; job/split: job CPU over the split's total (1 = no "
          "overhead beyond the steps timed). PSS: peak of the job's process tree.")


if __name__ == "__main__":
    main()
