"""Map files off the score actor (issue 11 item 5): the model actor's time per image, before/after.

Before, `ScoreActor` uncropped each map to the input size, built the 8-bit heatmap and the 0/255
mask, encoded two PNGs and wrote them, between batches; now it returns the (crop, crop) float32
map and `score.write_files` does that on CPU tasks after it. In one process, 1 thread (as a
1-CPU Ray actor runs), on the same decoded batches (`pipeline.decode_batch`), rounds alternating:
  inline     ScoreActor(return_maps=True) then write_files on its output, back to back: the work
             the actor did per batch before (same functions, same bytes)
  offloaded  ScoreActor(return_maps=True) alone: the actor now; write_files timed apart (the
             CPU stage's cost, off the actor's critical path)
  no maps    ScoreActor(return_maps=False): --no-maps, the floor
Milliseconds per image, wall and CPU; best round of each (least disturbed by other load).

    python -m benchmarks.maps_offload_bench                       # 6 PNGs of 2448 x 2048
    python -m benchmarks.maps_offload_bench --images 2 --width 320 --height 256 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from benchmarks.extract_bench import make_images
from benchmarks.throughput_bench import make_bank
from jobs import pipeline, score
from patchcore_core import preprocess, storage
from patchcore_core.features import feature_width
from patchcore_core.spec import ModelSpec, default_layers


class Clock:
    """Wall and CPU seconds of this process per named step, summed: `with clock("step"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            total = self.seconds.setdefault(key, [0.0, 0.0])
            total[0] += time.perf_counter() - wall
            total[1] += time.process_time() - cpu


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--width", type=int, default=2448)
    parser.add_argument("--height", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--bank-size", type=int, default=16000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="", help="default: a temporary folder, removed after")
    args = parser.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") != "1":  # torch and faiss read it when loaded
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        raw = list(sys.argv[1:] if argv is None else argv)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.maps_offload_bench", *raw],
                  env)
    workdir = args.workdir or tempfile.mkdtemp(prefix="maps-offload-")
    try:
        folder = os.path.join(workdir, f"inputs-{args.width}x{args.height}")
        paths = make_images(folder, args.images, args.width, height=args.height)
        spec = ModelSpec(backbone="efficientnet_lite0", layers=default_layers("efficientnet_lite0"))
        bank = os.path.join(workdir, "bank")
        shutil.rmtree(bank, ignore_errors=True)
        make_bank(bank, spec, args.bank_size)
        threshold = float(storage.read_manifest(bank, "bank")["pixel_threshold"])
        batches = []
        for lo in range(0, len(paths), args.batch_size):
            chunk = paths[lo : lo + args.batch_size]
            rows = {"uri": np.asarray(chunk, dtype=object),
                    "key": np.asarray([os.path.basename(p) for p in chunk], dtype=object)}
            batches.append(pipeline.decode_batch(rows, resize=spec.resize, crop=spec.crop,
                                                 frame=spec.frame, storage_options={},
                                                 max_pixels=preprocess.DEFAULT_MAX_PIXELS))
        out = os.path.join(workdir, "results")
        write = {"out": out, "maps": True, "raw_maps": False, "resize": spec.resize,
                 "crop": spec.crop, "frame": spec.frame, "pixel_threshold": threshold,
                 "keep_maps": False, "storage_options": {}}
        with_maps = score.ScoreActor(bank, "cpu", return_maps=True, storage_options={}, threads=1)
        no_maps = score.ScoreActor(bank, "cpu", return_maps=False, storage_options={}, threads=1)
        print(f"# efficientnet_lite0, crop {spec.crop}, {args.images} PNGs of {args.width}x"
              f"{args.height}, batch {args.batch_size}, bank {args.bank_size} x "
              f"{feature_width(spec)}, 1 thread, cpus {os.cpu_count()}, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        with torch.inference_mode():
            with_maps(batches[0]), no_maps(batches[0])  # warm-up: first allocations, kNN report
            best: dict[str, tuple[float, float]] = {}
            for r in range(args.rounds):
                clock = Clock()
                for batch in batches:
                    shutil.rmtree(out, ignore_errors=True)
                    with clock("inline"):
                        score.write_files(with_maps(batch), **write)
                    shutil.rmtree(out, ignore_errors=True)
                    with clock("offloaded"):
                        mapped = with_maps(batch)
                    with clock("write_files"):
                        score.write_files(mapped, **write)
                    with clock("no maps"):
                        no_maps(batch)
                line = []
                for key, (w, c) in clock.seconds.items():
                    ms = (1000 * w / args.images, 1000 * c / args.images)
                    line.append(f"{key} {ms[0]:.0f}/{ms[1]:.0f}")
                    if key not in best or ms[0] < best[key][0]:
                        best[key] = ms
                print(f"# round {r + 1}: " + ", ".join(line) + " wall/CPU ms per image", flush=True)
        print(f"\n{'path':<34}{'wall ms/img':>12}{'CPU ms/img':>12}{'vs inline':>10}")
        labels = {"inline": "model actor, before (inline)", "offloaded": "model actor, after",
                  "no maps": "model actor, --no-maps", "write_files": "write_files (CPU stage)"}
        for key in ("inline", "offloaded", "no maps", "write_files"):
            wall, cpu = best[key]
            print(f"{labels[key]:<34}{wall:>12.0f}{cpu:>12.0f}{wall / best['inline'][0]:>10.2f}")
        print("\nBest of the rounds. after/before is the model actor's time per image with the map "
              "files moved to the CPU stage; write_files runs there, beside the actor.")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
