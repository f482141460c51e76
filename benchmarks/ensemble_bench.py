"""Members against their ensemble (paper Table S5, "PatchCore ens.") on the demo textures.

The only ImageNet weights available offline are efficientnet_lite0's, so the ensemble here is of
two lite0 members on different stage pairs (the paper ensembles three different backbones,
whose weights cannot be downloaded on these machines). Each configuration is one
`patchcore benchmark mvtec` run on the same data; the table is their mean rows.

    python -m benchmarks.ensemble_bench --out /tmp/ensemble --members "blocks.2,blocks.4;blocks.3,blocks.5"

Writes <out>/ensemble.md and prints it (the committed copy: benchmarks/results/ensemble.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

from jobs import benchmark, cluster
from jobs.demo_data import make_demo_dataset

METRICS = ("image_auroc", "pixel_auroc", "pro")


def run_config(root: str, out: str, backbone: str, layers: str, common: Sequence[str]) -> dict:
    """One `benchmark mvtec` run; returns its benchmark.json."""
    argv = ["mvtec", "--root", root, "--out", out, "--backbone", backbone, "--layers", layers,
            *common]
    benchmark.main(argv)
    with open(os.path.join(out, "benchmark.json")) as handle:
        return json.load(handle)


def table(rows: Sequence[tuple[str, dict]], categories: Sequence[str]) -> str:
    """Markdown: one row per configuration, mean and per-category image AUROC (%)."""
    head = ["configuration", "image AUROC", "pixel AUROC", "PRO",
            *[f"{c} image AUROC" for c in categories], "score img/s"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, result in rows:
        mean = result["mean"]
        cells = [f"{100 * mean[m]:.1f}" for m in METRICS]
        cells += [f"{100 * result['categories'][c]['image_auroc']:.1f}" for c in categories]
        rates = [r["images_per_s"] for r in result["categories"].values() if r["images_per_s"]]
        cells.append(f"{sum(rates) / len(rates):.2f}" if rates else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="work folder (data, runs, ensemble.md)")
    parser.add_argument("--members", default="blocks.2,blocks.4;blocks.3,blocks.5",
                        help="';'-separated efficientnet_lite0 stage pairs, one per member")
    parser.add_argument("--categories", default="brick,grass,gravel", help="demo categories")
    parser.add_argument("--tile", type=int, default=144, help="demo tile size in px")
    parser.add_argument("--crop", type=int, default=128, help="crop (resize = tile)")
    parser.add_argument("--embed-dim", type=int, default=384, help="embed dim of every member")
    parser.add_argument("--num-train", type=int, default=30, help="training tiles per category")
    args = parser.parse_args(argv)
    categories = [c for c in args.categories.split(",") if c]
    root = os.path.join(args.out, "data")
    if not os.path.isdir(root):
        make_demo_dataset(root, categories=categories, num_train=args.num_train, num_test_good=8,
                          num_test_defect=3, size=args.tile, seed=0)
    common = ["--weights", "default", "--resize", str(args.tile), "--crop", str(args.crop),
              "--embed-dim", str(args.embed_dim), "--device", "cpu", "--workers", "1",
              "--no-maps", "--categories", ",".join(categories)]
    members = [m for m in args.members.split(";") if m]
    rows = []
    started = time.monotonic()
    with cluster.ray_session():
        for i, layers in enumerate(members):
            rows.append((f"lite0 {layers}", run_config(
                root, os.path.join(args.out, f"member-{i}"), "efficientnet_lite0", layers, common)))
        rows.append((f"ensemble of the {len(members)}", run_config(
            root, os.path.join(args.out, "ensemble"), ",".join(["efficientnet_lite0"] * len(members)),
            ";".join(members), common)))
    text = (f"`python -m benchmarks.ensemble_bench --out OUT --members \"{args.members}\" "
            f"--categories {args.categories} --tile {args.tile} --crop {args.crop} "
            f"--embed-dim {args.embed_dim} --num-train {args.num_train}` "
            f"({time.monotonic() - started:.0f} s wall)\n\n"
            "Demo data: skimage textures with synthetic defects, "
            f"{args.num_train} train / 8 good + 3 per defect type test tiles per category.\n\n"
            + table(rows, categories) + "\n")
    with open(os.path.join(args.out, "ensemble.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
