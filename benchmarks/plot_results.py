"""Plots for the README results section from the benchmarks' JSON output (issue 5).

memory.png: peak memory of `extract` and `score` against the number of images, and of `coreset`
against the feature-store rows, from `memory_bench.py --json`.

    python -m benchmarks.memory_bench --images 40,100,200,400 --json memory.json
    python -m benchmarks.plot_results --memory memory.json --out memory.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

MIB = 1 << 20
SERIES = (("all_pss", "all processes (PSS)"), ("driver_rss", "driver (RSS)"),
          ("worker_rss", "largest Ray worker (RSS)"), ("driver_anon", "driver, private heap"),
          ("worker_anon", "largest worker, private heap"))


def plot_memory(record: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [(stage, "images" if stage != "coreset" else "rows") for stage in ("extract", "score", "coreset")
              if stage in record]
    if not panels:
        raise ValueError(f"no extract/score/coreset results in the memory JSON (keys: {sorted(record)})")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.6), squeeze=False)
    for ax, (stage, size_key) in zip(axes[0], panels):
        runs = sorted(record[stage], key=lambda r: r[size_key])
        sizes = [r[size_key] for r in runs]
        for key, label in SERIES:
            if key not in runs[0]:  # JSON of an older memory_bench
                continue
            ax.plot(sizes, [r[key] / MIB for r in runs], marker="o", label=label)
        if stage == "coreset":
            base = runs[0]["all_pss"] / MIB
            ax.plot(sizes, [base + (n - sizes[0]) * 128 * 4 / MIB for n in sizes], "k--",
                    label="first + N x 128 x 4 B")
            ax.plot(sizes, [base + (n - sizes[0]) * 1024 * 2 / MIB for n in sizes], "k:",
                    label="first + N x 1024 x 2 B")
        if stage == "extract":  # what holding every image's features would add (224 px, D = 1024)
            base = runs[0]["all_pss"] / MIB
            ax.plot(sizes, [base + (n - sizes[0]) * 784 * 1024 * 2 / MIB for n in sizes], "k:",
                    label="first + images x 784 x 1024 x 2 B")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes], fontsize=7)
        ax.set_xlim(left=0)
        ax.set_xlabel(size_key)
        ax.set_ylabel("peak MiB")
        ax.set_ylim(bottom=0)
        ax.set_title(f"patchcore {stage}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", required=True, help="JSON written by memory_bench.py --json")
    parser.add_argument("--out", default="memory.png")
    args = parser.parse_args(argv)
    with open(args.memory) as f:
        plot_memory(json.load(f), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
