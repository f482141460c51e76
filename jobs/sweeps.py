"""`patchcore benchmark lowshot` (paper §4.5, Fig. 6, Table S4) and `patchcore benchmark sweep`
(paper §C.3, Fig. S4: image size S x neighbourhood size P): grids of `benchmark mvtec` runs.

Each cell of a grid runs `benchmark.run_category` for every selected category in its own folder,
so a rerun resumes; the cells are summarised as metrics.json, report.md and one PNG plot.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs import benchmark, cluster, datasets
from jobs.benchmark import METRICS, BenchmarkConfig
from jobs.config import arg, config_dict, config_json
from patchcore_core import metrics, storage
from patchcore_core.backbone import LAYER_SHAPES
from patchcore_core.spec import ModelSpec

log = logging.getLogger("jobs.sweeps")

LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pro": "PRO"}


def parse_ints(text: str, flag: str) -> list[int]:
    """'1,2,5' -> [1, 2, 5] (blanks and repeats dropped, order kept); ValueError names the flag."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, e.g. 1,2,5; got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} names no value; e.g. 1,2,5")
    return list(dict.fromkeys(values))


# --------------------------------------------------------------------------- low-shot


@dataclass(frozen=True, kw_only=True)
class LowShotConfig(BenchmarkConfig):
    """Low-shot PatchCore (paper §4.5, Table S4): per category and shot count k, fit on k random
    nominal train images (--repeats independent draws), score and evaluate the full test set;
    report mean +- std over the draws. Writes <out>/{metrics.json,report.md,lowshot.png}."""

    shots: str = arg("comma-separated shot counts k (nominal training images per fit)", "1,2,5,10,16,20")
    repeats: int = arg("random subsets per shot count; repeat r draws with seed (--seed, k, r)", 3)
    min_bank: int = arg("floor on bank entries: a bank that --ratio/--size makes smaller gets "
                        "min(MIN_BANK, all patches of the k images); 0 = no floor, the ratio alone "
                        "as in the paper's PatchCore-10/25 low-shot rows", 0)
    maps: bool = arg("must stay off: low-shot banks are not calibrated (every shot goes into the "
                     "bank), so PNG maps have no pixel threshold to scale by; raw maps are written",
                     False)

    def __post_init__(self) -> None:
        if any(k < 1 for k in self.shot_list):
            raise ValueError(f"--shots must be >= 1 each, got {self.shots!r}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.min_bank < 0:
            raise ValueError(f"--min-bank must be >= 0 (0 = no floor), got {self.min_bank}")
        if self.maps:
            raise ValueError("--maps needs a calibrated pixel threshold, which low-shot banks do "
                             "not have; drop --maps (metrics use the raw maps)")
        super().__post_init__()

    @property
    def shot_list(self) -> list[int]:
        return sorted(parse_ints(self.shots, "--shots"))


def draw_subset(train: Sequence[str], shots: int, seed: int, repeat: int) -> list[str]:
    """`shots` of the sorted `train` URIs, drawn without replacement by a generator seeded with
    (seed, shots, repeat): independent across shot counts and repeats (not nested); sorted.

    ValueError when the category has fewer than `shots` train images.
    """
    if shots > len(train):
        raise ValueError(f"--shots {shots} exceeds the {len(train)} train images of this category; "
                         "use smaller --shots")
    picked = np.random.default_rng([seed, shots, repeat]).choice(len(train), size=shots, replace=False)
    return [train[i] for i in sorted(picked)]


def patches_per_image(spec: ModelSpec) -> int:
    """Patches one image puts into the feature store: the first layer's grid, ceil(crop / stride)
    per side (the backbones' stride-2 steps are padded, so odd sizes round up)."""
    stride = LAYER_SHAPES[spec.backbone][spec.layers[0]][1]
    side = -(-spec.crop // stride)
    return side * side


def bank_size(config: LowShotConfig, num_patches: int) -> int:
    """Entries of a low-shot bank over `num_patches` patches: --size (capped at num_patches) or
    round(ratio * num_patches), raised to min(--min-bank, num_patches)."""
    wanted = (min(config.size, num_patches) if config.size is not None
              else config.num_samples(num_patches))
    return max(wanted, min(config.min_bank, num_patches))


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """{mean, std (population, so 0 for one value), n, values} of the values that are not None."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    return {"mean": float(np.mean(present)), "std": float(np.std(present)), "n": len(present),
            "values": list(values)}


def summarise_lowshot(cells: dict[int, list[dict[str, dict[str, Any]]]],
                      train_sizes: dict[str, int]) -> list[dict[str, Any]]:
    """One row per shot count k. cells: {k: [per repeat: {category: row of run_category}]}.

    A metric's values are, per repeat, the mean over categories (as the paper's per-run average);
    mean and std are over repeats. retained: k / train images, averaged over categories (fraction).
    """
    rows = []
    for k, repeats in sorted(cells.items()):
        names = list(repeats[0])
        row: dict[str, Any] = {"shots": k, "repeats": len(repeats),
                               "retained": float(np.mean([k / train_sizes[c] for c in names]))}
        for metric in METRICS:
            row[metric] = _stats([metrics.mean_present([r[c][metric] for c in names]) for r in repeats])
        row["bank_entries"] = {c: [r[c]["bank_entries"] for r in repeats] for c in names}
        row["categories"] = {c: {m: _stats([r[c][m] for r in repeats]) for m in METRICS} for c in names}
        row["subsets"] = {c: [r[c]["subset"] for r in repeats] for c in names}
        rows.append(row)
    return rows


def _pm(stats: dict[str, Any]) -> str:
    """'93.6 ± 0.6' in % ('-' when no value)."""
    return "-" if stats["mean"] is None else f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def lowshot_markdown(result: dict[str, Any]) -> str:
    """report.md: shots x (image AUROC, pixel AUROC, PRO) as mean ± std in %, the layout of the
    paper's Table S4 transposed, then image AUROC per category."""
    rows = result["rows"]
    lines = ["| shots | retained % | image AUROC | pixel AUROC | PRO | repeats | bank entries |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        entries = [n for per_repeat in row["bank_entries"].values() for n in per_repeat]
        shown = str(entries[0]) if len(set(entries)) == 1 else f"{min(entries)}-{max(entries)}"
        lines.append(f"| {row['shots']} | {100 * row['retained']:.1f} | "
                     + " | ".join(_pm(row[m]) for m in METRICS) + f" | {row['repeats']} | {shown} |")
    names = list(rows[0]["categories"])
    per_category = ["| category | " + " | ".join(f"{r['shots']}-shot" for r in rows) + " |",
                    "|---" + "|---:" * len(rows) + "|"]
    per_category += [f"| {c} | " + " | ".join(_pm(r["categories"][c]["image_auroc"]) for r in rows)
                     + " |" for c in names]
    s = result["settings"]
    notes = (f"PatchCore on {result['root']} ({', '.join(names)}): {s['backbone']} ({s['layers']}), "
             f"{s['resize']} -> {s['crop']} px, P {s['patch_size']}, embed dim {s['embed_dim']}, "
             f"coreset {s['coreset']}, min bank {s['min_bank']}, device {result['device']}. "
             "Per repeat r and shot count k, each category is fitted on k train images drawn with "
             "seed (seed, k, r) (independent subsets, not nested), all k in the bank (no "
             "calibration hold-out), and scored on its whole test set. Metrics in %: mean ± "
             "population std over repeats of the mean over categories.")
    return "\n".join(["# PatchCore low-shot (paper Table S4 / Fig. 6)", "", *lines, "",
                      "Image AUROC per category:", "", *per_category, "", notes]) + "\n"


def run_lowshot(config: LowShotConfig) -> int:
    """The low-shot benchmark; returns the exit status (non-zero when a job failed).

    Cell (k, r) works in <out>/shots-<k>/repeat-<r>/<category>/{train.txt,bank,results,report}.
    """
    log.info("config %s", config_json(config))
    options = config.options
    found = datasets.read_mvtec(config.root, options)
    selected = benchmark.select_categories(found, config.category_list, config.root)
    spec = config.model_spec()
    plan = [(k, r, c, draw_subset(c.train, k, config.seed, r))
            for k in config.shot_list for r in range(config.repeats) for c in selected]
    if config.dry_run:
        for k, r, c, subset in plan:
            print(f"{k}-shot repeat {r} {c.name}: bank of {bank_size(config, k * patches_per_image(spec))} "
                  f"entries from {', '.join(u.rsplit('/', 1)[-1] for u in subset)}")
        return 0
    cells: dict[int, list[dict[str, dict[str, Any]]]] = {}
    with cluster.ray_session():
        device = cluster.resolve_device(config.device)
        for i, (k, r, category, subset) in enumerate(plan):
            log.info("lowshot cell %d/%d: %d shots, repeat %d, %s", i + 1, len(plan), k, r, category.name)
            cell = dataclasses.replace(config, out=storage.join_uri(config.out, f"shots-{k}", f"repeat-{r}"))
            train_uri = benchmark.work_uri(cell.out, category.name, "train.txt")
            storage.write_bytes(train_uri, "".join(u + "\n" for u in subset).encode(), options)
            fit_config = dataclasses.replace(
                cell.fit_config(category.name, train_uri), calibration_fraction=0.0, ratio=None,
                size=bank_size(config, k * patches_per_image(spec)))
            status, row = benchmark.run_category(
                cell, datasets.Category(category.name, tuple(subset), category.test), options,
                fit_config=fit_config)
            if status:
                log.error("%d-shot repeat %d of %s failed (exit status %d); rerun to resume",
                          k, r, category.name, status)
                return status
            repeats = cells.setdefault(k, [])
            if r == len(repeats):
                repeats.append({})
            repeats[r][category.name] = {**row, "subset": subset}
    coreset = f"size {config.size}" if config.size is not None else f"ratio {config.effective_ratio:g}"
    result = {
        "suite": "lowshot", "root": config.root, "device": device,
        "settings": {**_settings(spec), "coreset": coreset, "min_bank": config.min_bank,
                     "subsets": "independent per (seed, shots, repeat)"},
        "rows": summarise_lowshot(cells, {c.name: len(c.train) for c in selected}),
        "config": config_dict(config), "versions": storage.package_versions(),
    }
    return _publish(config, result, lowshot_markdown(result), lowshot_png(result["rows"]), "lowshot.png")


# --------------------------------------------------------------------------- image size x P


@dataclass(frozen=True, kw_only=True)
class SweepConfig(BenchmarkConfig):
    """Image size S x neighbourhood size P (paper §C.3, Fig. S4): one `benchmark mvtec` run per
    (S, P), resize = round(S * --resize / --crop) (the paper's 256/224); the cell equal to --crop
    and --patch-size is the baseline. Writes <out>/{metrics.json,report.md,sweep.png}."""

    crops: str = arg("comma-separated crop sizes S in px (Fig. S4: 224 baseline, 288, 360, 448)",
                     "224,288,360,448")
    patch_sizes: str = arg("comma-separated odd neighbourhood sizes P (Fig. S4: 3, 5, 7, 9)", "3,5,7,9")

    def __post_init__(self) -> None:
        for crop, patch_size in self.grid:
            self.cell_config(crop, patch_size)  # ValueError on a bad size or P, naming it
        super().__post_init__()

    @property
    def grid(self) -> list[tuple[int, int]]:
        """(S, P) cells, S-major, each list sorted."""
        return [(s, p) for s in sorted(parse_ints(self.crops, "--crops"))
                for p in sorted(parse_ints(self.patch_sizes, "--patch-sizes"))]

    def cell_config(self, crop: int, patch_size: int) -> BenchmarkConfig:
        """The `benchmark mvtec` config of cell (S, P), working in <out>/crop-S_p-P."""
        return BenchmarkConfig(**{
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(BenchmarkConfig)},
            "out": storage.join_uri(self.out, f"crop-{crop}_p-{patch_size}"), "crop": crop,
            "resize": round(crop * self.resize / self.crop), "patch_size": patch_size})


def sweep_markdown(result: dict[str, Any]) -> str:
    """report.md: one row per (S, P), means over categories in %, the baseline marked."""
    lines = ["| S (crop px) | resize px | P | image AUROC | pixel AUROC | PRO | fit s | score s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        mark = " (baseline)" if row["baseline"] else ""
        cells = [benchmark.format_cell(row[m], 100) for m in METRICS]
        lines.append(f"| {row['crop']}{mark} | {row['resize']} | {row['patch_size']} | "
                     + " | ".join(cells) + f" | {benchmark.format_cell(row['fit_s'])} | "
                     f"{benchmark.format_cell(row['score_s'])} |")
    s = result["settings"]
    notes = (f"PatchCore on {result['root']} ({', '.join(result['rows'][0]['categories'])}): "
             f"{s['backbone']} ({s['layers']}), embed dim {s['embed_dim']}, coreset {s['coreset']}, "
             f"device {result['device']}. Metrics in %, mean over categories; times: seconds summed "
             "over categories, fit (extract, coreset, calibration) and score jobs.")
    return "\n".join(["# PatchCore image size x neighbourhood size (paper Fig. S4)", "", *lines,
                      "", notes]) + "\n"


def run_sweep(config: SweepConfig) -> int:
    """The (S, P) sweep; returns the exit status (non-zero when a job failed)."""
    log.info("config %s", config_json(config))
    options = config.options
    found = datasets.read_mvtec(config.root, options)
    selected = benchmark.select_categories(found, config.category_list, config.root)
    if config.dry_run:
        for crop, patch_size in config.grid:
            cell = config.cell_config(crop, patch_size)
            print(f"S {crop} (resize {cell.resize}), P {patch_size}: {len(selected)} categories "
                  f"-> {cell.out}")
        return 0
    rows = []
    with cluster.ray_session():
        device = cluster.resolve_device(config.device)
        for crop, patch_size in config.grid:
            cell = config.cell_config(crop, patch_size)
            per_category = {}
            for category in selected:
                log.info("sweep cell S %d P %d: %s", crop, patch_size, category.name)
                status, per_category[category.name] = benchmark.run_category(cell, category, options)
                if status:
                    log.error("S %d P %d %s failed (exit status %d); rerun to resume",
                              crop, patch_size, category.name, status)
                    return status
            mean = benchmark.summarise(per_category)
            rows.append({"crop": crop, "resize": cell.resize, "patch_size": patch_size,
                         "baseline": (crop, patch_size) == (config.crop, config.patch_size),
                         **{m: mean[m] for m in METRICS},
                         "fit_s": _total([r["fit_s"] for r in per_category.values()]),
                         "score_s": _total([r["score_s"] for r in per_category.values()]),
                         "categories": per_category})
    coreset = f"size {config.size}" if config.size is not None else f"ratio {config.effective_ratio:g}"
    result = {"suite": "sweep", "root": config.root, "device": device,
              "settings": {**_settings(config.model_spec()), "coreset": coreset},
              "rows": rows, "config": config_dict(config), "versions": storage.package_versions()}
    return _publish(config, result, sweep_markdown(result), sweep_png(rows), "sweep.png")


def _total(values: Sequence[float | None]) -> float | None:
    """Sum, or None when any value is missing (a job done by an earlier run that kept no time)."""
    return None if any(v is None for v in values) else float(sum(values))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- outputs


def _settings(spec: ModelSpec) -> dict[str, Any]:
    return {"backbone": spec.backbone, "layers": ",".join(spec.layers), "resize": spec.resize,
            "crop": spec.crop, "patch_size": spec.patch_size, "embed_dim": spec.embed_dim,
            "aggregation": spec.aggregation, "frame": spec.frame}


def _publish(config: BenchmarkConfig, result: dict[str, Any], text: str, png: bytes, png_name: str
             ) -> int:
    """Writes <out>/{png_name, report.md, metrics.json (last)} and prints the report."""
    options = config.options
    storage.write_bytes(storage.join_uri(config.out, png_name), png, options)
    storage.write_bytes(storage.join_uri(config.out, "report.md"), text.encode(), options)
    storage.write_bytes(storage.join_uri(config.out, "metrics.json"),
                        json.dumps(result, indent=2, allow_nan=False).encode(), options)
    print(text)
    print(f"written: {storage.join_uri(config.out, 'report.md')}, metrics.json and {png_name}")
    return 0


def _panels_png(draw: Callable[[Any, str], None], title: str) -> bytes:
    """PNG of three panels side by side (image AUROC, pixel AUROC, PRO); draw(axes, metric)."""
    # deferred import, Agg canvas without pyplot: as jobs.report draws
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, metric in zip(figure.subplots(1, len(METRICS)), METRICS):
        draw(axes, metric)
        axes.set_title(LABELS[metric])
        axes.set_ylabel("%")
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def lowshot_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """Metric (mean ± std over repeats, %) against shots on a log axis, one panel per metric."""
    shots = [r["shots"] for r in rows]

    def draw(axes: Any, metric: str) -> None:
        mean = [np.nan if r[metric]["mean"] is None else 100 * r[metric]["mean"] for r in rows]
        std = [0.0 if r[metric]["std"] is None else 100 * r[metric]["std"] for r in rows]
        axes.errorbar(shots, mean, yerr=std, marker="o", capsize=3)
        axes.set_xscale("log")
        axes.set_xticks(shots, [str(k) for k in shots])
        axes.minorticks_off()
        axes.set_xlabel("shots (nominal train images)")

    return _panels_png(draw, "PatchCore low-shot: mean ± std over repeats")


def sweep_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """Metric (%) against P, one line per image size S, the baseline ringed; one panel per metric."""
    crops = sorted({r["crop"] for r in rows})

    def draw(axes: Any, metric: str) -> None:
        for crop in crops:
            line = [r for r in rows if r["crop"] == crop]
            values = [np.nan if r[metric] is None else 100 * r[metric] for r in line]
            axes.plot([r["patch_size"] for r in line], values, marker="o", label=f"S = {crop}")
            for r, v in zip(line, values):
                if r["baseline"]:
                    axes.plot([r["patch_size"]], [v], marker="o", markersize=12, fillstyle="none",
                              color="black", label="baseline")
        axes.set_xticks(sorted({r["patch_size"] for r in rows}))
        axes.set_xlabel("neighbourhood size P")
        axes.legend(fontsize=7)

    return _panels_png(draw, "PatchCore: image size S x neighbourhood size P")


# suite -> (config class, run function), for `benchmark.main`
SUITES: dict[str, tuple[type[BenchmarkConfig], Callable[[Any], int]]] = {
    "lowshot": (LowShotConfig, run_lowshot),
    "sweep": (SweepConfig, run_sweep),
}
