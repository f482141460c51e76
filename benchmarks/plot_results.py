"""Plots for the README results section from the benchmarks' output.

memory.png: peak memory of `extract` and `score` against the number of images, and of `coreset`
against the feature-store rows, from `memory_bench.py --json`. coreset.png: greedy steps per second
of the exact pruned selection and of the plain loop against N, one line per ratio, from the
markdown table(s) that `coreset_bench.py` prints.

    python -m benchmarks.memory_bench --images 40,100,200,400 --json memory.json
    python -m benchmarks.plot_results --memory memory.json --out memory.png
    python benchmarks/coreset_bench.py --n 200000 1000000 --ratio 0.1 0.01 > coreset.md
    python -m benchmarks.plot_results --coreset coreset.md --out coreset.png
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence

MIB = 1 << 20
NUMBER = re.compile(r"[0-9.]+")  # "2,931.0 (extrapolated from 500 steps)" -> 2931.0 once commas go
SERIES = (("all_pss", "all processes (PSS)"), ("driver_rss", "driver (RSS)"),
          ("worker_rss", "largest Ray worker (RSS)"), ("driver_anon", "driver, private heap"),
          ("worker_anon", "largest worker, private heap"))


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, imported only when plotting
    """matplotlib.pyplot drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_memory(record: dict, out: str) -> None:
    plt = _pyplot()

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


def read_coreset_tables(paths: Sequence[str]) -> list[dict]:
    """Rows of the markdown tables printed by coreset_bench.py: N, ratio, steps, plain s, fast s."""
    rows = []
    for path in paths:
        header: list[str] = []
        with open(path) as f:
            for line in f:
                if not line.startswith("|") or line.startswith("|---"):
                    continue
                cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
                if cells[0] == "N":
                    header = cells
                    continue
                if not header:
                    raise ValueError(f"{path}: table row before the header line: {line.strip()!r}")
                row = dict(zip(header, cells))
                rows.append({
                    "n": int(row["N"].replace(",", "")), "ratio": float(row["ratio"]),
                    "steps": int(row["steps"].replace(",", "")),
                    "plain_s": float(NUMBER.match(row["plain s"].replace(",", "")).group()),
                    "fast_s": float(row["fast s"].replace(",", "")),
                    "extrapolated": "extrapolated" in row["plain s"],
                })
    if not rows:
        raise ValueError(f"no coreset_bench table rows in {list(paths)}; pass the files it printed")
    return rows


def plot_coreset(rows: list[dict], out: str) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for ratio in sorted({r["ratio"] for r in rows}, reverse=True):
        runs = sorted((r for r in rows if r["ratio"] == ratio), key=lambda r: r["n"])
        sizes = [r["n"] for r in runs]
        line = ax.plot(sizes, [r["steps"] / r["fast_s"] for r in runs], marker="o",
                       label=f"exact pruned greedy, ratio {ratio:g}")[0]
        ax.plot(sizes, [r["steps"] / r["plain_s"] for r in runs], marker="s", linestyle="--",
                color=line.get_color(), label=f"plain per-step loop, ratio {ratio:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = sorted({r["n"] for r in rows})
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("N (rows of the feature store)")
    ax.set_ylabel("greedy steps per second")
    ax.set_title("coreset selection, 128-dim projected, same indices")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--memory", help="JSON written by memory_bench.py --json")
    source.add_argument("--coreset", nargs="+", help="files holding coreset_bench.py's printed table(s)")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    if args.memory:
        with open(args.memory) as f:
            plot_memory(json.load(f), args.out)
    else:
        plot_coreset(read_coreset_tables(args.coreset), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
