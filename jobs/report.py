"""Figures and Markdown of the evaluation report (DESIGN.md §4 "Report"): ROC/PR curves, overlays.

Pure rendering: arrays and metric dicts in, PNG bytes and Markdown text out. Uses matplotlib's
object API on the Agg canvas (no pyplot, no global backend state). Must not read or write files
or compute metrics: jobs.evaluate and patchcore_core.metrics do.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Curve:
    """One line of a curve plot: x, y (n,) float arrays, a legend label, an optional marked point.

    x and y are rates in [0, 1]; point: an (x, y) drawn as a dot (the best-F1 point of a PR curve).
    """

    x: np.ndarray
    y: np.ndarray
    label: str
    point: tuple[float, float] | None = None


def _thin(x: np.ndarray, y: np.ndarray, points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` samples of a curve (plots of 2000-bin histograms stay small)."""
    if len(x) <= points:
        return x, y
    # evenly spaced indices, both ends included, so a thinned curve starts and ends as before
    keep = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
    return x[keep], y[keep]


def histogram_curves(
    negatives: np.ndarray, positives: np.ndarray, roc_label: str, pr_label: str
) -> tuple[Curve, Curve]:
    """Pixel ROC and PR curves from binned counts (n,) of nominal and defect pixels per score bin.

    Threshold i flags bins >= i; points run from the highest threshold to the lowest.
    Returns (ROC: x FPR, y TPR; PR: x recall, y precision), each thinned to at most 400 points.
    """
    # cumulative counts from the top bin down; the leading 0 is "flag nothing", point (0, 0)
    false_pos = np.concatenate([[0], np.cumsum(negatives[::-1])]).astype(np.float64)
    true_pos = np.concatenate([[0], np.cumsum(positives[::-1])]).astype(np.float64)
    fpr, tpr = false_pos / max(1.0, false_pos[-1]), true_pos / max(1.0, true_pos[-1])
    # precision is undefined while nothing is flagged; 1 there, as sklearn's PR curve ends
    precision = np.where(true_pos > 0, true_pos / np.maximum(1.0, true_pos + false_pos), 1.0)
    return Curve(*_thin(fpr, tpr), roc_label), Curve(*_thin(tpr, precision), pr_label)


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure of width x height inches at 110 dpi, drawn on its own Agg canvas."""
    # deferred import: matplotlib is only needed when a report is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # constrained layout: titles, legends and colour bars do not overlap the axes
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself: savefig renders without pyplot's global backend
    return figure


def _png(figure: Any) -> bytes:
    """The figure rendered as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def curves_png(
    panels: Sequence[tuple[str, str, str, Sequence[Curve]]], diagonal: bool
) -> bytes:
    """Side-by-side line plots; panels: (title, x label, y label, curves). PNG bytes.

    diagonal: draw the chance line y = x (ROC plots). A panel without curves says "not
    available" (pixel plots when no category has maps).
    """
    figure = _figure(5.2 * len(panels), 4.8)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, xlabel, ylabel, curves) in zip(axes, panels):
        for curve in curves:
            (line,) = ax.plot(curve.x, curve.y, linewidth=1.8, label=curve.label)
            if curve.point is not None:
                ax.plot(*curve.point, marker="o", markersize=6, color=line.get_color())
        if diagonal:
            ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
        # limits just past [0, 1]: lines along an edge (TPR = 1, precision = 1) stay visible
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(-0.01, 1.01), ylim=(-0.01, 1.02))
        ax.grid(alpha=0.3)
        if curves:  # the legend goes to the corner that ROC (or PR) curves usually leave empty
            ax.legend(loc="lower right" if diagonal else "lower left", fontsize=9)
        else:
            ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
    return _png(figure)


def curve_pngs(plots: dict[str, dict[str, Curve]]) -> dict[str, bytes]:
    """roc.png and pr.png (image level left, pixel level right) from each category's curves.

    plots: {category: {"image_roc", "image_pr" and, with maps, "pixel_roc", "pixel_pr": Curve}}.
    One line per category in each panel; a category without maps is missing from the pixel panels.
    """
    def lines(key: str) -> list[Curve]:
        return [p[key] for p in plots.values() if key in p]

    rates = ("false positive rate", "true positive rate")
    return {
        "roc.png": curves_png(
            [("Image-level ROC", *rates, lines("image_roc")), ("Pixel-level ROC", *rates, lines("pixel_roc"))],
            diagonal=True,
        ),
        "pr.png": curves_png(
            [("Image-level precision-recall", "recall", "precision", lines("image_pr")),
             ("Pixel-level precision-recall", "recall", "precision", lines("pixel_pr"))],
            diagonal=False,
        ),
    }


def overlay_png(
    image: np.ndarray,
    amap: np.ndarray | None,
    mask: np.ndarray,
    title: str,
    vmax: float,
    threshold: float | None,
    mask_label: str = "ground truth",
) -> bytes:
    """Three panels: image with the ground-truth contour, heatmap over the image, heatmap alone.

    image: (H, W, 3) uint8; amap: (H, W) anomaly scores or None; mask: (H, W) bool ground truth
    (or another mask, named by `mask_label`, e.g. the predicted defect mask).
    The colour scale is [0, vmax] in score units; `threshold` (pixel) is drawn as a white contour.
    Returns PNG bytes of a 12 x 4.6 inch figure at 110 dpi, `title` above the panels.
    """
    figure = _figure(12.0, 4.6)
    axes = figure.subplots(1, 3)
    figure.suptitle(title, fontsize=11)
    axes[0].imshow(image)
    axes[0].set_title(f"image + {mask_label} (green)", fontsize=9)
    heat = None
    if amap is not None:
        axes[1].imshow(image)
        axes[1].imshow(amap, cmap="jet", alpha=0.45, vmin=0.0, vmax=vmax)
        axes[1].set_title("anomaly map over image", fontsize=9)
        heat = axes[2].imshow(amap, cmap="jet", vmin=0.0, vmax=vmax)
        thr = "" if threshold is None else f", white = pixel threshold {threshold:.3g}"
        axes[2].set_title(f"anomaly map{thr}", fontsize=9)
        # a contour level outside the map's range draws nothing and makes Matplotlib warn
        if threshold is not None and float(amap.min()) < threshold < float(amap.max()):
            for ax in axes[1:]:
                ax.contour(amap, levels=[threshold], colors="white", linewidths=0.9)
    else:
        for ax in axes[1:]:
            ax.text(0.5, 0.5, "no anomaly map", ha="center", va="center", transform=ax.transAxes)
    if mask.any():  # on the heatmap panels too, so that missed defects show against the map
        for ax in axes if amap is not None else axes[:1]:
            ax.contour(mask.astype(np.float32), levels=[0.5], colors="lime", linewidths=1.2)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if heat is not None:
        # fraction 0.046: the usual value that makes the bar about as tall as a square image
        figure.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.02, label="score")
    return _png(figure)


def score_histogram_png(
    scores: np.ndarray, reference: np.ndarray | None, threshold: float | None, title: str
) -> bytes:
    """Density histograms of image scores (n,) and of `reference` scores (m,) (e.g. the bank's
    calibration scores; None: not drawn) on shared bins, the image threshold as a dashed line."""
    figure = _figure(7.0, 3.6)
    ax = figure.subplots()
    both = [a for a in (scores, reference) if a is not None and len(a)]
    values = np.concatenate(both) if both else np.zeros(1)
    bins = np.linspace(float(values.min()), float(values.max()) + 1e-9, 31)
    if len(scores):
        ax.hist(scores, bins=bins, density=True, alpha=0.6, label=f"this run ({len(scores)})")
    if reference is not None and len(reference):
        ax.hist(reference, bins=bins, density=True, alpha=0.6,
                label=f"calibration, nominal ({len(reference)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="image threshold")
    ax.set_xlabel("image score")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _png(figure)


def _fmt(value: Any, digits: int = 3) -> str:
    """A table cell: '–' for None or NaN, floats to `digits` decimals, anything else as str()."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report_markdown(metrics: dict[str, Any], figures: dict[str, str], overlays: Sequence[tuple[str, str]]) -> str:
    """report.md text from metrics.json's content.

    figures: {caption: relative PNG path}; overlays: (caption, relative PNG path) pairs.
    Sections: headline means, per category, image thresholds, pixel thresholds (when any
    category has pixel metrics), skipped categories, curves, worst cases (when overlays).
    KeyError when `metrics` lacks a key that evaluate.run writes.
    """
    cats = metrics["categories"]
    lines = [
        "# PatchCore evaluation report",
        "",
        f"Results: `{', '.join(metrics['inputs']['results'])}`  ",
        f"Dataset: `{metrics['inputs']['dataset']}`  ",
        f"Anomaly maps: {metrics['settings']['maps_note']}",
        "",
        "## Headline (mean over categories)",
        "",
        "| image AUROC | pixel AUROC | PRO (FPR ≤ {}) |".format(metrics["settings"]["max_fpr"]),
        "|---:|---:|---:|",
        "| {} | {} | {} |".format(
            *(_fmt(metrics["mean"][k]) for k in ("image_auroc", "pixel_auroc", "pro"))
        ),
        "",
        "## Per category",
        "",
        "| category | images (defective) | image AUROC | pixel AUROC | PRO | regions |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in cats.items():
        lines.append(
            f"| {name} | {m['num_images']} ({m['num_defective']}) | {_fmt(m['image_auroc'])} | "
            f"{_fmt(m['pixel_auroc'])} | {_fmt(m['pro'])} | {m['num_regions']} |"
        )
    lines += [
        "",
        "## Image thresholds",
        "",
        "`score >= threshold` flags an image at the F1-optimal threshold (chosen on these labels, "
        "an optimistic upper bound); the calibrated threshold comes from the bank (nominal images "
        "only, `score > threshold`), which is what `patchcore score` reports as `anomalous`.",
        "",
        "| category | F1-opt. threshold | F1 | FP | FN | calibrated threshold | F1 | FP | FN |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in cats.items():
        best, cal = m["f1_optimal"], m["calibrated"]
        lines.append(
            f"| {name} | {_fmt(best['threshold'], 4)} | {_fmt(best['f1'])} | {_fmt(best['false_positives'])} | "
            f"{_fmt(best['false_negatives'])} | {_fmt(cal['threshold'], 4)} | {_fmt(cal['f1'])} | "
            f"{_fmt(cal['false_positives'])} | {_fmt(cal['false_negatives'])} |"
        )
    if any(m["pixel"] is not None for m in cats.values()):
        lines += [
            "",
            "## Pixel thresholds",
            "",
            "| category | F1-opt. threshold | pixel F1 | calibrated threshold | pixel F1 | FP pixels | FN pixels |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in cats.items():
            p = m["pixel"]
            if p is None:
                continue
            lines.append(
                f"| {name} | {_fmt(p['f1_optimal']['threshold'], 4)} | {_fmt(p['f1_optimal']['f1'])} | "
                f"{_fmt(p['calibrated']['threshold'], 4)} | {_fmt(p['calibrated']['f1'])} | "
                f"{_fmt(p['calibrated']['false_positives'])} | {_fmt(p['calibrated']['false_negatives'])} |"
            )
    if metrics.get("skipped"):
        lines += ["", f"Categories in the dataset without scores (skipped): {', '.join(metrics['skipped'])}"]
    lines += ["", "## Curves", ""]
    lines += [f"![{caption}]({path})" for caption, path in figures.items()]
    if overlays:
        lines += [
            "",
            "## Worst cases",
            "",
            "Highest-scoring nominal and lowest-scoring defective test images of each category.",
            "",
        ]
        for caption, path in overlays:
            lines += [f"**{caption}**", "", f"![{caption}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"
