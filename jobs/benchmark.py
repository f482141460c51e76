"""`patchcore benchmark mvtec`: fit, score and evaluate every MVTec AD category; one results table.

The table has the layout of the paper's Tables 1-3 (§4.2: image AUROC, pixel AUROC, PRO in %,
rows = categories + mean) plus fit and score wall-clock times. Each category works in
<out>/<category>/{bank,results,report}; the jobs are no-ops on committed folders, so a rerun
resumes where the last one stopped. Paper numbers (supplementary Tables S1-S3, WideResNet50) are
added as reference columns when --ratio is one of the paper's 25%, 10% or 1%. With an
approximate `--knn` (ivf-flat, ivf-pq), each category is also scored with that index on the same
bank, into <out>/<category>/<knn folder>/{results,report}, and a second table records its metrics,
their change against exact search and its recall@1. The `lowshot` and `sweep` suites
(jobs.sweeps) run grids of `run_category`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


from jobs import cluster, datasets, evaluate, fit, logs, score
from jobs.config import (
    CoresetFlags,
    KnnFlags,
    ModelFlags,
    PipelineFlags,
    arg,
    config_dict,
    config_json,
    fields_of,
    parse_config,
)
from patchcore_core import knn, metrics, storage

log = logging.getLogger("jobs.benchmark")

SUITES = ("mvtec", "lowshot", "sweep")  # lowshot, sweep: jobs.sweeps
METRICS = ("image_auroc", "pixel_auroc", "pro")
TIMING_FILE = "timing.json"  # per category: wall-clock seconds of the fit and score jobs

# Paper supplementary Tables S1 (image AUROC), S2 (pixel AUROC), S3 (PRO), rows PatchCore-25/10/1,
# copied verbatim (in %). Columns: Avg, then PAPER_CATEGORIES in the paper's order.
PAPER_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
PAPER_ROWS: dict[str, dict[float, str]] = {
    "image_auroc": {
        0.25: "99.1 100 99.5 98.1 98.7 98.2 100 100 100 96.6 98.1 98.7 100 100 99.2 99.4",
        0.1: "99.0 100 99.4 97.8 98.7 97.9 100 100 100 96.0 97.0 98.9 99.7 100 99.0 99.5",
        0.01: "99.0 100 99.3 98.0 98.0 98.6 100 100 99.7 97.0 96.4 99.4 100 99.9 99.2 99.2",
    },
    "pixel_auroc": {
        0.25: "98.1 98.6 98.4 98.8 99.0 98.7 98.7 99.3 98.4 97.4 99.4 95.6 98.7 96.3 95.0 98.8",
        0.1: "98.1 98.6 98.5 98.9 99.1 98.7 98.7 99.3 98.4 97.6 99.4 95.9 98.7 96.4 95.1 98.9",
        0.01: "98.0 98.5 98.2 98.8 98.9 98.6 98.6 99.3 98.4 97.1 99.2 96.1 98.5 94.9 95.1 98.8",
    },
    "pro": {
        0.25: "93.4 96.2 92.5 95.5 96.6 96.0 93.8 98.9 91.4 93.2 97.9 87.3 91.5 83.7 89.4 97.1",
        0.1: "93.5 96.1 92.6 95.5 96.6 95.9 93.9 98.9 91.3 94.1 97.9 87.4 91.4 83.5 89.6 97.1",
        0.01: "93.1 95.9 91.6 95.5 96.5 96.1 93.8 98.9 91.2 92.9 97.1 88.3 90.2 81.2 89.5 97.0",
    },
}
PAPER_SOURCE = ("Roth et al., Towards Total Recall in Industrial Anomaly Detection (CVPR 2022), "
                "supplementary Tables S1-S3: WideResNet50 layer2+layer3, 256 -> 224 px")


# Its docstring is the --help text. The inherited flag groups are passed on unchanged: pipeline
# flags to every category's fit and score job, model and coreset flags to every fit job, kNN
# flags to the second score job of each category when --knn is approximate.
@dataclass(frozen=True, kw_only=True)
class BenchmarkConfig(KnnFlags, PipelineFlags, ModelFlags, CoresetFlags):
    """Fit, score and evaluate each MVTec AD category; write benchmark.md and benchmark.json. With
    an approximate --knn, each category is scored with exact search and with that index on the
    same bank, and the change of each metric (approximate - exact) and recall@1 are recorded."""

    root: str = arg("MVTec AD root (category folders), or one category folder")
    out: str = arg("folder for <category>/{bank,results,report}, benchmark.md and benchmark.json")
    categories: str = arg("comma-separated categories to run; '' = every category under --root", "")
    maps: bool = arg("also write 8-bit PNG maps and masks per test image (raw maps are always "
                     "written, for the metrics)", True)

    def __post_init__(self) -> None:
        if not self.root or not self.out:
            raise ValueError("--root and --out must be non-empty paths or URIs")
        if self.categories and not self.category_list:
            raise ValueError(f"--categories {self.categories!r} names no category; e.g. bottle,cable")
        super().__post_init__()  # the pipeline, model and coreset flag checks

    @property
    def category_list(self) -> list[str]:
        """--categories as a list: blanks and repeats dropped, first-seen order kept."""
        return list(dict.fromkeys(c.strip() for c in self.categories.split(",") if c.strip()))

    @property
    def approximate(self) -> bool:
        """Whether --knn names an approximate index, scored beside exact search."""
        return self.knn != "exact"

    @property
    def knn_folder(self) -> str:
        """Folder name of the approximate run inside <out>/<category>: knn-<method>, then each
        --knn-* parameter given, e.g. knn-ivf-flat_nlist-16_nprobe-4 (one folder per setting)."""
        given = [(name, getattr(self, f"knn_{name}")) for name in ("nlist", "nprobe", "pq_m", "rerank")]
        return "_".join([f"knn-{self.knn}"] + [f"{n.replace('_', '-')}-{v}" for n, v in given
                                               if v is not None])

    def fit_config(self, category: str, train: str) -> fit.FitConfig:
        """The fit job's config of one category: this run's model, pipeline and coreset flags.

        train: the category's train/good folder; the bank goes to <out>/<category>/bank.
        """
        return fit.FitConfig(
            **fields_of(self, ModelFlags, PipelineFlags, CoresetFlags), train=train,
            out=work_uri(self.out, category, "bank"),
        )

    def run_folder(self, category: str, name: str, approximate: bool = False) -> str:
        """<out>/<category>/<name> (exact search), or <out>/<category>/<knn_folder>/<name>."""
        if approximate:
            return storage.join_uri(self.out, category, self.knn_folder, name)
        return work_uri(self.out, category, name)

    def score_config(self, category: str, test: str, approximate: bool = False) -> score.ScoreConfig:
        """The score job's config of one category (raw maps always: the metrics read them).

        test: the category's test/ folder; results go to <out>/<category>/results, searched
        exactly, or with `approximate` by --knn into <out>/<category>/<knn_folder>/results.
        """
        knn_flags = fields_of(self, KnnFlags) if approximate else {}
        return score.ScoreConfig(
            **fields_of(self, PipelineFlags), **knn_flags, bank=work_uri(self.out, category, "bank"),
            images=test, out=self.run_folder(category, "results", approximate), maps=self.maps,
            raw_maps=True,
        )

    def evaluate_config(self, category: str, dataset: str, approximate: bool = False
                        ) -> evaluate.EvaluateConfig:
        """The evaluate job's config of one category, on its raw maps (of the --knn run with
        `approximate`).

        dataset: the category folder (test/ and ground_truth/); raw float maps give exact pixel
        metrics, where 8-bit PNG maps saturate at twice the pixel threshold.
        """
        return evaluate.EvaluateConfig(
            results=self.run_folder(category, "results", approximate), dataset=dataset,
            out=self.run_folder(category, "report", approximate), maps="raw",
            storage_options=self.storage_options, overwrite=self.overwrite,
        )


def work_uri(out: str, category: str, name: str) -> str:
    """<out>/<category>/<name>: a category's bank, results or report folder."""
    return storage.join_uri(out, category, name)


def category_folder(category: datasets.Category) -> str:
    """The folder holding train/, test/ and ground_truth/ (test items: <folder>/test/<defect>/<file>)."""
    return category.test[0].uri.rsplit("/", 3)[0]


def select_categories(found: dict[str, datasets.Category], wanted: Sequence[str], root: str
                      ) -> list[datasets.Category]:
    """The requested categories (all when `wanted` is empty), in dataset order.

    ValueError naming the requested categories missing under `root` and those found there.
    """
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValueError(f"--categories {missing} not found under {root}; found: {', '.join(found)}")
    return [c for name, c in found.items() if not wanted or name in wanted]


# --------------------------------------------------------------------------- paper reference


def paper_reference(ratio: float | None, categories: Sequence[str]) -> dict[str, Any] | None:
    """The paper's numbers (in %) for the PatchCore variant of `ratio`, or None.

    None when `ratio` is not 0.25, 0.1 or 0.01, or no category is an MVTec AD category. `mean` is the
    paper's Avg column, given only when `categories` are all 15 (the paper averages over all).
    Returns {variant, unit, source, categories: {name: {metric: %}}, mean: {metric: %} | None}.
    """
    if ratio not in PAPER_ROWS["image_auroc"] or not set(categories) & set(PAPER_CATEGORIES):
        return None
    table = {k: [float(v) for v in rows[ratio].split()] for k, rows in PAPER_ROWS.items()}
    per_category = {
        # values[0] is the Avg column; the categories follow in PAPER_CATEGORIES order
        name: {k: values[1 + PAPER_CATEGORIES.index(name)] for k, values in table.items()}
        for name in categories if name in PAPER_CATEGORIES
    }
    complete = set(categories) == set(PAPER_CATEGORIES)
    return {
        "variant": f"PatchCore-{ratio * 100:g}%",
        "unit": "percent",
        "source": PAPER_SOURCE,
        "categories": per_category,
        "mean": {k: values[0] for k, values in table.items()} if complete else None,
    }


# --------------------------------------------------------------------------- table


def summarise(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean row: metrics and times averaged over categories (None values skipped); images/s
    is all scored images over all score seconds. rows: {category: row of `run_category`}.
    With rows of an approximate --knn, also `knn` (`summarise_knn`)."""
    mean = {k: metrics.mean_present([r[k] for r in rows.values()]) for k in (*METRICS, "fit_s", "score_s")}
    timed = [r for r in rows.values() if r["score_s"] is not None]
    seconds = sum(r["score_s"] for r in timed)
    mean["images_per_s"] = sum(r["test_images"] for r in timed) / seconds if seconds > 0 else None
    if any(r.get("knn") for r in rows.values()):
        mean["knn"] = summarise_knn(rows)
    return mean


def metric_change(approximate: float | None, exact: float | None) -> float | None:
    """approximate - exact (a fraction, as the metrics), None when either is missing."""
    return None if approximate is None or exact is None else approximate - exact


def summarise_knn(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean of the approximate runs: METRICS and their `change` averaged over categories,
    `max_abs_change` per metric (the worst category), recall@1 = all hits / all recall queries,
    images/s = all scored images over all score seconds. rows: rows of `run_category` with `knn`.
    """
    knn_rows = [r["knn"] for r in rows.values() if r.get("knn")]
    mean: dict[str, Any] = {k: metrics.mean_present([r[k] for r in knn_rows]) for k in METRICS}
    changes = {k: [r["change"][k] for r in knn_rows if r["change"][k] is not None] for k in METRICS}
    mean["change"] = {k: metrics.mean_present(v) for k, v in changes.items()}
    mean["max_abs_change"] = {k: max(abs(c) for c in v) if v else None for k, v in changes.items()}
    queries = sum(r["recall_queries"] or 0 for r in knn_rows)
    mean["recall_at_1"] = sum(r["recall_hits"] or 0 for r in knn_rows) / queries if queries else None
    mean["recall_queries"] = queries
    mean["score_s"] = metrics.mean_present([r["score_s"] for r in knn_rows])
    timed = [(r, row["test_images"]) for row in rows.values() if (r := row.get("knn"))
             and r["score_s"] is not None]
    seconds = sum(r["score_s"] for r, _ in timed)
    mean["images_per_s"] = sum(n for _, n in timed) / seconds if seconds > 0 else None
    return mean


def format_cell(value: float | None, scale: float = 1.0) -> str:
    """value * scale with one decimal ('-' for None); scale 100 turns fractions into %."""
    return "-" if value is None else f"{value * scale:.1f}"


def format_change(value: float | None, signed: bool = True) -> str:
    """A metric change (fraction) in percentage points, three decimals, with its sign unless
    `signed` is False ('-' for None)."""
    if value is None:
        return "-"
    return f"{value * 100:+.3f}" if signed else f"{value * 100:.3f}"


def format_params(params: dict[str, Any] | None) -> str:
    """Resolved kNN params as 'nlist=16 nprobe=4' (an ensemble: 'member: ...' joined by '; ')."""
    if not params:
        return "-"
    if all(isinstance(v, dict) for v in params.values()):
        return "; ".join(f"{name}: {format_params(p)}" for name, p in params.items())
    return " ".join(f"{k}={v}" for k, v in params.items() if k not in ("seed", "train_size"))


def knn_table_markdown(result: dict[str, Any]) -> str:
    """The approximate --knn section of benchmark.md: per category and mean, recall@1, the
    approximate run's metrics (in %) with their change against exact search (in points), and
    its score time. result: the content of benchmark.json with knn rows."""
    head = ["category", "engine", "params", "recall@1", "image AUROC", "change", "pixel AUROC",
            "change", "PRO", "change", "score s", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---" + "|---:" * (len(head) - 3) + "|"]
    for name, row in result["categories"].items():
        r = row["knn"]
        cells = [r["engine"], format_params(r["params"]),
                 "-" if r["recall_at_1"] is None else f"{r['recall_at_1']:.3f}"]
        cells += [c for k in METRICS for c in (format_cell(r[k], 100), format_change(r["change"][k]))]
        cells += [format_cell(r["score_s"]), format_cell(r["images_per_s"])]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    mean = result["mean"]["knn"]
    cells = ["", "", "-" if mean["recall_at_1"] is None else f"{mean['recall_at_1']:.3f}"]
    cells += [c for k in METRICS for c in (format_cell(mean[k], 100), format_change(mean["change"][k]))]
    cells += [format_cell(mean["score_s"]), format_cell(mean["images_per_s"])]
    lines.append("| " + " | ".join(["**mean**", *cells]) + " |")
    worst = [c for k in METRICS for c in ("", format_change(mean["max_abs_change"][k], signed=False))]
    lines.append("| " + " | ".join(["**max abs change**", "", "", "", *worst, "", ""]) + " |")
    settings = result["settings"]["knn"]
    given = ", ".join(f"{k} {v}" for k, v in settings["requested"].items()
                      if k not in ("method", "seed") and v is not None)
    note = (f"--knn {settings['method']} ({given or 'no parameter given'}; unset parameters "
            "derived per bank) against exact search on the same bank. Metrics in %; "
            "change = approximate - exact in percentage points (0.200 = 0.002 AUROC). recall@1: "
            "share of sampled test patches whose nearest bank entry is the exact one (jobs.score: "
            "up to 1,000 seeded patches of the first 4 images each score actor scored; pooled over "
            "categories in the mean row). Pixel metrics of each run come from 2,000-bin histograms "
            "over its own value range, so a pixel change of about 0.001 points can be binning; "
            "image AUROC is exact. Times as in the first table, for the approximate score job.")
    return "\n".join([f"## kNN: {settings['method']} vs exact", "", *lines, "", note]) + "\n"


def table_markdown(result: dict[str, Any]) -> str:
    """benchmark.md: the paper's Tables 1-3 side by side (in %), plus fit and score times.

    result: the content of benchmark.json (see `run`). Paper columns only when result["paper"].
    """
    paper = result["paper"]
    head = ["category", "image AUROC", "pixel AUROC", "PRO"]
    if paper:
        head = ["category", "image AUROC", "paper", "pixel AUROC", "paper", "PRO", "paper"]
    head += ["fit s", "score s", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    named = [*result["categories"].items(), ("mean", result["mean"])]
    for name, row in named:
        if paper:
            # None for a category the paper does not have, and for the mean of a subset
            reference = paper["mean"] if name == "mean" else paper["categories"].get(name)
            cells = [c for k in METRICS
                     for c in (format_cell(row[k], 100), format_cell(reference[k] if reference else None))]
        else:
            cells = [format_cell(row[k], 100) for k in METRICS]
        cells += [format_cell(row["fit_s"]), format_cell(row["score_s"]), format_cell(row["images_per_s"])]
        label = f"**{name}**" if name == "mean" else name
        lines.append("| " + " | ".join([label, *cells]) + " |")
    settings = result["settings"]
    notes = [
        (f"PatchCore on {result['root']}: {settings['backbone']} ({settings['layers']}), "
         f"{settings['resize']} -> {settings['crop']} px, embed dim {settings['embed_dim']}, "
         f"coreset {settings['coreset']}, aggregation {settings.get('aggregation', 'authors')}, "
         f"frame {settings.get('frame', 'crop')}, device {result['device']}."),
        ("AUROC and PRO in % as in the paper's Tables 1-3 (PRO integrated to FPR 0.3, normalised; "
         "pixel metrics on raw crop-space maps). Times: wall-clock seconds of the fit job (extract, "
         "coreset, calibration) and the score job, Ray start-up of their actors included; "
         "'-' = done by an earlier run that recorded no time. Mean row: mean over categories; "
         "its images/s is all scored images over all score seconds."),
    ]
    if paper:
        notes.append(f"paper = {paper['variant']} from {paper['source']}; its mean is the paper's "
                     "average over all 15 categories, shown only when all 15 were run.")
    title = f"# PatchCore benchmark: {result['suite']}"
    text = "\n".join([title, "", *lines]) + "\n\n" + "\n\n".join(notes) + "\n"
    if result["mean"].get("knn"):
        text += "\n" + knn_table_markdown(result)
    return text


# --------------------------------------------------------------------------- job


def _timed(step: Any, config: Any, folder: str, saved: float | None, options: dict[str, Any]
           ) -> tuple[int, float | None]:
    """(exit status, seconds) of `step.run(config)`, step being jobs.fit or jobs.score.

    On a committed folder the step is a no-op: keep `saved`, the time of the run that did the work.
    """
    was_committed = storage.is_committed(folder, options) and not config.overwrite
    started = time.monotonic()
    status = step.run(config)
    return status, (saved if was_committed else time.monotonic() - started)


def run_category(config: BenchmarkConfig, category: datasets.Category, options: dict[str, Any],
                 *, fit_config: fit.FitConfig | None = None) -> tuple[int, dict[str, Any]]:
    """Fit, score and evaluate one category; (exit status, its table row).

    The row: METRICS as fractions, fit_s, score_s, images_per_s, train_images, test_images,
    bank_entries, report (report.md's URI), and with an approximate --knn `knn` (`run_knn`);
    {} with the status of the first job that fails. Writes <out>/<category>/{bank,results,report}
    and timing.json (and the --knn run's folder). fit_config: the fit job's
    config when not `config.fit_config` on train/good (jobs.sweeps: a low-shot subset);
    train_images is then len(category.train), so pass the category with that subset.
    """
    name, folder = category.name, category_folder(category)
    if fit_config is None:
        fit_config = config.fit_config(name, storage.join_uri(folder, "train", "good"))
    timing_uri = storage.join_uri(config.out, name, TIMING_FILE)
    saved = (json.loads(storage.read_bytes(timing_uri, options)) if storage.exists(timing_uri, options)
             else {"fit_s": None, "score_s": None})
    status, saved["fit_s"] = _timed(fit, fit_config, work_uri(config.out, name, "bank"),
                                    saved["fit_s"], options)
    # saved after each job, so a rerun after a failed score still knows how long fit took
    storage.write_bytes(timing_uri, json.dumps(saved).encode(), options)
    if status:
        return status, {}
    status, saved["score_s"] = _timed(score, config.score_config(name, storage.join_uri(folder, "test")),
                                      work_uri(config.out, name, "results"), saved["score_s"], options)
    storage.write_bytes(timing_uri, json.dumps(saved).encode(), options)
    if status:
        return status, {}
    evaluate.run(config.evaluate_config(name, folder))  # a no-op when the report is complete
    report = work_uri(config.out, name, "report")
    metrics = json.loads(storage.read_bytes(storage.join_uri(report, "metrics.json"), options))
    scored = storage.read_manifest(work_uri(config.out, name, "results"), "results", options)["counts"]
    bank = storage.read_manifest(work_uri(config.out, name, "bank"), "bank", options)["counts"]
    row = {
        **{k: metrics["categories"][name][k] for k in METRICS},
        "fit_s": saved["fit_s"],
        "score_s": saved["score_s"],
        "images_per_s": (scored["scored"] / saved["score_s"]
                         if saved["score_s"] and saved["score_s"] > 0 else None),
        "train_images": len(category.train),
        "test_images": scored["scored"],
        "bank_entries": bank["num_entries"],
        "report": storage.join_uri(report, "report.md"),
    }
    if config.approximate:
        status, row["knn"] = run_knn(config, category, row, options)
        if status:
            return status, {}
    return 0, row


def run_knn(config: BenchmarkConfig, category: datasets.Category, exact: dict[str, Any],
            options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Score and evaluate one category with the --knn index on the bank `run_category` fitted;
    (exit status, its row) with `exact` the category's row (exact search).

    The row: method, engine, params (resolved, from the results manifest), threads, recall_at_1,
    recall_hits, recall_queries and distance_ratio_mean (jobs.score's measurement; None for
    none), METRICS, change (approximate - exact per metric), score_s, images_per_s, results
    and report URIs. Works in <out>/<category>/<knn_folder>/{results,report} with its own
    timing.json; a rerun reuses them as `run_category` does.
    """
    name, folder = category.name, category_folder(category)
    timing_uri = storage.join_uri(config.out, name, config.knn_folder, TIMING_FILE)
    saved = (json.loads(storage.read_bytes(timing_uri, options)) if storage.exists(timing_uri, options)
             else {"score_s": None})
    score_config = config.score_config(name, storage.join_uri(folder, "test"), approximate=True)
    status, saved["score_s"] = _timed(score, score_config, score_config.out, saved["score_s"], options)
    storage.write_bytes(timing_uri, json.dumps(saved).encode(), options)
    if status:
        return status, {}
    evaluate.run(config.evaluate_config(name, folder, approximate=True))
    report = config.run_folder(name, "report", approximate=True)
    measured = json.loads(storage.read_bytes(storage.join_uri(report, "metrics.json"), options))
    measured = measured["categories"][name]
    manifest = storage.read_manifest(score_config.out, "results", options)
    knn_info, scored = manifest["knn"], manifest["counts"]["scored"]
    recall = knn_info.get("recall") or {}
    row = {
        "method": config.knn,
        "engine": knn_info["engine"],
        "params": knn_info["params"],
        "threads": knn_info["threads"],
        "recall_at_1": recall.get("recall_at_1"),
        "recall_hits": recall.get("hits"),
        "recall_queries": recall.get("num_queries"),
        "distance_ratio_mean": recall.get("distance_ratio_mean"),
        **{k: measured[k] for k in METRICS},
        "change": {k: metric_change(measured[k], exact[k]) for k in METRICS},
        "score_s": saved["score_s"],
        "images_per_s": (scored / saved["score_s"]
                         if saved["score_s"] and saved["score_s"] > 0 else None),
        "results": score_config.out,
        "report": storage.join_uri(report, "report.md"),
    }
    log.info("category %s: --knn %s recall@1 %s, change %s", name, config.knn, row["recall_at_1"],
             json.dumps(row["change"]))
    return 0, row


def run(config: BenchmarkConfig) -> int:
    """The benchmark; returns the exit status (non-zero when a job failed).

    Runs every selected category in one Ray session, then writes <out>/benchmark.json (settings,
    rows, mean row, paper reference, config, package versions) and benchmark.md and prints the
    table. A failed job stops the run before the table is written; a rerun resumes. --dry-run
    only lists the categories. ValueError for a bad --root layout or unknown --categories.
    """
    log.info("config %s", config_json(config))
    options = config.options
    found = datasets.read_mvtec(config.root, options)
    selected = select_categories(found, config.category_list, config.root)
    log.info("benchmark mvtec: %d categories: %s", len(selected), ", ".join(c.name for c in selected))
    if config.dry_run:
        for c in selected:
            also = f" (and {config.knn_folder})" if config.approximate else ""
            print(f"{c.name}: {len(c.train)} train, {len(c.test)} test images in {category_folder(c)} "
                  f"-> {storage.join_uri(config.out, c.name)}{also}")
        return 0
    rows: dict[str, dict[str, Any]] = {}
    with cluster.ray_session():  # one Ray for every job instead of one per job
        device = cluster.resolve_device(config.device)  # needs the connected Ray's GPU count
        for i, category in enumerate(selected):
            log.info("benchmark category %d/%d: %s", i + 1, len(selected), category.name)
            status, rows[category.name] = run_category(config, category, options)
            if status:
                log.error("category %s failed (exit status %d); fix it and rerun to resume",
                          category.name, status)
                return status
    specs = config.model_specs()  # several: an ensemble (--backbone a,b)
    spec = specs[0]
    coreset = f"size {config.size}" if config.size is not None else f"ratio {config.effective_ratio:g}"
    result = {
        "suite": "mvtec",
        "root": config.root,
        "device": device,
        "settings": {"backbone": ",".join(s.backbone for s in specs),
                     "layers": ";".join(",".join(s.layers) for s in specs), "resize": spec.resize,
                     "crop": spec.crop, "embed_dim": spec.embed_dim, "coreset": coreset,
                     "aggregation": spec.aggregation, "frame": spec.frame,
                     "knn": {"method": config.knn,
                             "requested": knn.options_dict(config.knn_options())}},
        "categories": rows,
        "mean": summarise(rows),
        "paper": paper_reference(config.effective_ratio, list(rows)),
        "config": config_dict(config),
        "versions": storage.package_versions(),
    }
    text = table_markdown(result)
    storage.write_bytes(storage.join_uri(config.out, "benchmark.json"),
                        json.dumps(result, indent=2, allow_nan=False).encode(), options)
    storage.write_bytes(storage.join_uri(config.out, "benchmark.md"), text.encode(), options)
    print(text)
    print(f"written: {storage.join_uri(config.out, 'benchmark.md')} and benchmark.json")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """`patchcore benchmark SUITE [flags]`; SUITE is mvtec, lowshot or sweep (jobs.sweeps).

    Exits 0 after `--help` without a suite, 2 when the suite is missing or unknown or a flag is
    bad, and with the failed job's status when a category fails.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in SUITES:
        usage = "usage: patchcore benchmark SUITE [--help] [flags]\nsuites: " + ", ".join(SUITES)
        usage += "\n`patchcore benchmark SUITE --help` lists the suite's flags and defaults."
        if args and args[0] in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        got = f"got {args[0]!r}" if args else "none given"
        print(f"{usage}\npatchcore benchmark: error: the first argument is the suite "
              f"({', '.join(SUITES)}); {got}", file=sys.stderr)
        raise SystemExit(2)
    prog = f"patchcore benchmark {args[0]}"
    if args[0] == "mvtec":
        config: BenchmarkConfig = parse_config(BenchmarkConfig, args[1:], prog=prog)
        runner = run
    else:
        from jobs import sweeps  # deferred: jobs.sweeps builds on this module

        config_class, runner = sweeps.SUITES[args[0]]
        config = parse_config(config_class, args[1:], prog=prog)
    logs.setup_logging()
    status = runner(config)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
