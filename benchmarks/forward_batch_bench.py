"""CPU milliseconds per image of the backbone forward (with patch aggregation) against the number
of images per forward, on one torch thread as a scoring actor runs it (jobs.cluster
CPU_FORWARD_BATCH). Images are random; rates do not depend on pixel values.

    python -m benchmarks.forward_batch_bench
    python -m benchmarks.forward_batch_bench --backbones efficientnet_lite0 --batches 4,8 --images 16
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import torch

from benchmarks.throughput_bench import WEIGHTS
from patchcore_core import backbone, model
from patchcore_core.spec import ModelSpec, default_layers


def cpu_ms_per_image(extractor: backbone.FeatureExtractor, spec: ModelSpec, images: torch.Tensor,
                     batch: int, repeats: int) -> float:
    """Best of `repeats` passes over `images` in forwards of `batch` (after one warm-up pass)."""
    best = float("inf")
    for rep in range(repeats + 1):
        cpu = time.process_time()
        model.embed_images(extractor, images, spec, batch_size=batch)
        if rep:
            best = min(best, (time.process_time() - cpu) / len(images))
    return 1e3 * best


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="efficientnet_lite0,wide_resnet50_2")
    parser.add_argument("--batches", default="4,8,16,32", help="images per forward to compare")
    parser.add_argument("--images", type=int, default=64, help="per pass (a multiple of each batch)")
    parser.add_argument("--repeats", type=int, default=2, help="passes; the fastest is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a scoring actor: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# images {args.images}, threads {args.threads}, best of {args.repeats}, load "
          f"{os.getloadavg()[0]:.1f}")
    print("| backbone | " + " | ".join(f"{b} / forward" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for name in args.backbones.split(","):
        spec = ModelSpec(backbone=name, weights=WEIGHTS.get(name, "none"), layers=default_layers(name))
        extractor = backbone.load_backbone(spec, torch.device("cpu"))
        images = torch.randn(args.images, 3, spec.crop, spec.crop, generator=torch.Generator().manual_seed(0))
        # interleaved rounds, so a slow spell of a shared machine hits every batch size alike
        ms = {b: float("inf") for b in batches}
        for _ in range(args.repeats):
            for b in batches:
                ms[b] = min(ms[b], cpu_ms_per_image(extractor, spec, images, b, 1))
        print(f"| {name} | " + " | ".join(f"{ms[b]:.1f}" for b in batches) + " |", flush=True)
    print("\nCPU ms per image of model.embed_images (forward + patch aggregation).")


if __name__ == "__main__":
    main()
