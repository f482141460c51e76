"""`patchcore evaluate`: image AUROC, pixel AUROC and PRO of scored results on a labelled dataset.

Paper §4.1 metrics. Runs on the driver without Ray: scores are matched to the dataset's test items
by URI, anomaly maps are streamed one by one into fixed-bin histograms (metrics.PixelCurves), so
memory does not grow with the number or size of images. Writes the report folder (DESIGN.md §4).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from jobs import datasets, logs, report
from jobs.config import StorageFlags, arg, config_dict, config_json, parse_config
from jobs.folders import map_uri, reuse_committed
from patchcore_core import metrics, preprocess, storage

log = logging.getLogger("jobs.evaluate")

MAP_CHOICES = ("raw", "png", "none")  # which maps of a results folder the pixel metrics read
# `score --incremental` layout (jobs.incremental, not imported here: it imports Ray):
# runs/run=ID/manifest.json commits scores/run=ID/part-*.parquet and errors/run=ID/part-*.parquet
RUNS_DIR = "runs"


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(StorageFlags):
    """Evaluate scored results against a labelled dataset: image AUROC, pixel AUROC, PRO, thresholds."""

    results: str = arg("results folder of `patchcore score`; several (e.g. one per category) comma-separated")
    dataset: str = arg("labelled dataset: MVTec AD root or category folder, VisA split CSV or VisA root")
    out: str = arg("report folder (metrics.json, report.md, curve and overlay PNGs, manifest.json)")
    maps: str = arg("anomaly maps to use: raw (maps_raw/*.npy, crop space), png (maps/*.png, 8-bit, "
                    "input resolution) or none; default: raw when present, else png", "auto")
    num_bins: int = arg("score bins of the streaming pixel metrics (raw maps)", 2000)
    max_fpr: float = arg("PRO is integrated from FPR 0 to this value and normalised", 0.3)
    overlays: int = arg("worst nominal and worst defective images drawn per category", 2)
    run_id: str = arg("--results written by `score --incremental`: evaluate the run=ID partition "
                      "only; '' = every committed run, taking each input's latest row", "")
    overwrite: bool = arg("replace a finished report in --out", False)
    dry_run: bool = arg("read manifests, dataset and scores, match them, then stop", False)
    log_level: str = arg("DEBUG, INFO, WARNING or ERROR", "INFO")

    def __post_init__(self) -> None:
        """ValueError for an unknown --maps, --num-bins < 16, --max-fpr outside (0, 1], negative
        --overlays, no --results folder, or bad --storage-options."""
        if self.maps not in (*MAP_CHOICES, "auto"):
            raise ValueError(f"--maps must be one of auto, {', '.join(MAP_CHOICES)}; got {self.maps!r}")
        if self.num_bins < 16:
            raise ValueError(f"--num-bins must be >= 16, got {self.num_bins}")
        if not 0.0 < self.max_fpr <= 1.0:
            raise ValueError(f"--max-fpr must be in (0, 1], got {self.max_fpr}")
        if self.overlays < 0:
            raise ValueError(f"--overlays must be >= 0, got {self.overlays}")
        if not [r for r in self.results.split(",") if r.strip()]:
            raise ValueError("--results needs at least one results folder")
        super().__post_init__()  # the storage options check


# --------------------------------------------------------------------------- reading results


@dataclass(frozen=True)
class ResultsFolder:
    """What evaluate needs from one results folder and the bank it references."""

    uri: str
    maps: str  # "raw", "png" or "none"
    # the bank's calibrated thresholds in score units; None when it was not calibrated
    image_threshold: float | None
    pixel_threshold: float | None
    resize: int  # ModelSpec's resize and crop (px): where raw maps lie in the input image
    crop: int
    frame: str  # "crop" or "full" (ModelSpec.frame): which part of each input the maps cover


@dataclass(frozen=True)
class Scored:
    """One dataset test item with its result row. map_uri: None when maps are not used."""

    item: datasets.TestItem
    score: float
    anomalous: bool | None  # None when the bank has no image threshold
    width: int  # input image size in px, as the score job decoded it
    height: int
    folder: ResultsFolder
    map_uri: str | None


def read_results(
    folder: str, maps: str, options: dict[str, Any], run_id: str = ""
) -> tuple[ResultsFolder, list[dict[str, Any]], dict[str, str]]:
    """(folder info, result rows, {uri: error}) of one committed results folder.

    maps: --maps; "auto" takes raw maps, else PNG maps, else none. Spec and thresholds come from
    the results manifest, or from the bank manifest it names. Rows: uri, rel, score, anomalous,
    width, height from scores/part-*.parquet, plus map_uri. The error dict (errors/part-*.parquet)
    is keyed by datasets.uri_key, as match_test_items looks it up. An --incremental location
    (runs/run=ID) is read by `read_incremental` (`run_id`: one run). FileNotFoundError when the
    folder is not committed; ValueError when the manifest has neither the thresholds nor a bank
    URI, the asked map kind was not written, or PNG maps come from a bank without a pixel threshold.
    """
    runs = storage.join_uri(folder, RUNS_DIR)
    if not storage.is_committed(folder, options) and storage.subfolders(runs, options):
        return read_incremental(folder, maps, options, run_id)
    if run_id:
        raise ValueError(f"--run-id {run_id}: {folder} is not an --incremental results location "
                         f"(no {RUNS_DIR}/run=ID); drop --run-id")
    manifest = storage.read_manifest(folder, "results", options)
    if all(k in manifest for k in ("spec", "image_threshold", "pixel_threshold")):
        source = manifest  # the score job copies the bank's spec and thresholds
    elif isinstance(manifest.get("bank"), str):
        source = storage.read_manifest(manifest["bank"], "bank", options)
    else:
        raise ValueError(
            f"results manifest of {folder} has neither the bank's spec and thresholds nor a bank "
            "reference; was it written by `patchcore score`?"
        )
    info = folder_info(folder, manifest, source, maps)
    rows: list[dict[str, Any]] = []
    for part in storage.list_files(storage.join_uri(folder, "scores"), "part-*.parquet", options):
        rows += storage.read_rows(part, RESULT_COLUMNS, options)
    errors: dict[str, str] = {}
    for part in storage.list_files(storage.join_uri(folder, "errors"), "part-*.parquet", options):
        for row in storage.read_rows(part, ["uri", "error"], options):
            errors[datasets.uri_key(row["uri"])] = row["error"]
    return info, with_maps(info, rows), errors


RESULT_COLUMNS = ["uri", "rel", "score", "anomalous", "width", "height"]


def folder_info(folder: str, manifest: dict[str, Any], source: dict[str, Any], maps: str
                ) -> ResultsFolder:
    """The map kind to use (--maps; "auto": raw, else png, else none), spec and thresholds of a
    results folder; ValueError for a map kind it lacks, or PNG maps without a pixel threshold."""
    spec = source["spec"]
    available = [k for k in ("raw", "png") if manifest.get("maps", {}).get(k)]
    if maps == "auto":
        chosen = available[0] if available else "none"
    elif maps != "none" and maps not in available:
        raise ValueError(
            f"--maps {maps}: results {folder} hold maps of kinds {available or 'none'}; "
            "rerun `patchcore score` with the maps you need, or pick another --maps"
        )
    else:
        chosen = maps
    info = ResultsFolder(
        folder, chosen, source["image_threshold"], source["pixel_threshold"],
        int(spec["resize"]), int(spec["crop"]), str(spec.get("frame", "crop")),
    )
    if chosen == "png" and info.pixel_threshold is None:
        raise ValueError(
            f"results {folder}: 8-bit PNG maps are scaled by the bank's pixel threshold, but the "
            "bank has none; use --maps raw or a calibrated bank"
        )
    return info


def with_maps(info: ResultsFolder, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` with map_uri: where the chosen map of each lies (None for --maps none)."""
    for row in rows:
        row["map_uri"] = None if info.maps == "none" else map_uri(info.uri, row["rel"], info.maps)
    return rows


def committed_runs(folder: str, options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{run id: manifest} of the committed runs of an --incremental location; an unfinished run
    (no manifest yet: its rows may be partial) is left out, with a warning."""
    runs = {}
    for name in storage.subfolders(storage.join_uri(folder, RUNS_DIR), options):
        state = storage.join_uri(folder, RUNS_DIR, name)
        if not name.startswith("run="):
            continue
        if storage.is_committed(state, options):
            runs[name[len("run="):]] = storage.read_manifest(state, "results", options)
        else:
            log.warning("%s: run %s is unfinished (no manifest yet); its rows are not evaluated",
                        folder, name)
    return runs


def read_incremental(
    folder: str, maps: str, options: dict[str, Any], run_id: str
) -> tuple[ResultsFolder, list[dict[str, Any]], dict[str, str]]:
    """`read_results` of an --incremental location: run=`run_id`, or every committed run.

    Over several runs an input scored more than once (it changed, or failed then was fixed) counts
    by its latest row (scored_at, then run id), an error included, so each input counts once as
    the archive stands now. ValueError when the chosen runs used different banks (their scores
    do not compare): pick one with --run-id. FileNotFoundError for an unknown --run-id.
    """
    runs = committed_runs(folder, options)
    if run_id and run_id not in runs:
        raise FileNotFoundError(f"{folder} has no committed run {run_id!r} (committed: "
                                f"{sorted(runs) or 'none'}); pass one of them to --run-id, or "
                                "finish that run first")
    chosen = [run_id] if run_id else sorted(runs)
    if not chosen:
        raise FileNotFoundError(f"{folder} has no committed --incremental run; finish one first")
    banks = sorted({(runs[r]["bank_id"], runs[r]["bank_digest"]) for r in chosen})
    if len(banks) > 1:
        raise ValueError(f"{folder}: its runs used {len(banks)} banks ({', '.join(i for i, _ in banks)}); "
                         "their scores do not compare: pass --run-id to evaluate one run")
    info = folder_info(folder, runs[chosen[-1]], runs[chosen[-1]], maps)  # one bank: one spec
    newest: dict[str, tuple[Any, str, dict[str, Any] | None, str]] = {}  # uri -> latest outcome
    for run in chosen:
        for sub in ("scores", "errors"):
            parts = storage.list_files(storage.join_uri(folder, sub, f"run={run}"), "part-*.parquet",
                                       options)
            columns = RESULT_COLUMNS if sub == "scores" else ["uri", "error"]
            for part in parts:
                for row in storage.read_rows(part, [*columns, "scored_at"], options):
                    when = (row.pop("scored_at"), run)
                    if row["uri"] not in newest or newest[row["uri"]][:2] < when:
                        newest[row["uri"]] = (*when, row if sub == "scores" else None,
                                              row.get("error", ""))
    rows = [row for _, _, row, _ in newest.values() if row is not None]
    errors = {datasets.uri_key(uri): error for uri, (_, _, row, error) in newest.items()
              if row is None}
    return info, with_maps(info, rows), errors


def match(
    categories: dict[str, datasets.Category],
    folders: Sequence[tuple[ResultsFolder, list[dict[str, Any]], dict[str, str]]],
) -> tuple[dict[str, list[Scored]], list[str]]:
    """({category: its scored test items}, categories without scores); see datasets.match_test_items.

    folders: `read_results` of each --results folder; their errors are merged to explain
    unscored images. ValueError (from match_test_items) for a URI scored twice, a partly scored
    category, or no match at all.
    """
    rows = [(info, row) for info, folder_rows, _ in folders for row in folder_rows]
    errors = {k: v for _, _, errs in folders for k, v in errs.items()}
    matched, skipped = datasets.match_test_items(categories, [row["uri"] for _, row in rows], errors)
    out = {}
    for name, pairs in matched.items():
        out[name] = [
            Scored(item, float(row["score"]), row["anomalous"], int(row["width"]), int(row["height"]),
                   info, row["map_uri"])
            for item, (info, row) in ((item, rows[i]) for item, i in pairs)
        ]
    return out, skipped


# --------------------------------------------------------------------------- maps and masks


def load_map(entry: Scored, options: dict[str, Any]) -> torch.Tensor:
    """The anomaly map of one image in score units, float32.

    raw: (crop, crop), exactly as scored. png: (height, width); the 8-bit value v stands for
    v / 255 * 2 * pixel_threshold (the score job's documented scaling, saturating above that).
    ValueError when the map's shape is not the one its kind and image call for.
    """
    assert entry.map_uri is not None
    data = storage.read_bytes(entry.map_uri, options)
    crop = entry.folder.crop
    if entry.folder.maps == "raw":
        # stored float16 by the score job; allow_pickle=False: a results folder is data, not code
        amap = np.load(io.BytesIO(data), allow_pickle=False)
        if amap.shape != (crop, crop):
            raise ValueError(f"{entry.map_uri}: raw map of shape {amap.shape}, expected ({crop}, {crop})")
        return torch.from_numpy(amap.astype(np.float32))
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)
    if pixels.shape != (entry.height, entry.width):
        raise ValueError(
            f"{entry.map_uri}: PNG map of {pixels.shape[1]}x{pixels.shape[0]} px, "
            f"the image is {entry.width}x{entry.height}"
        )
    scale = 2.0 * float(entry.folder.pixel_threshold) / 255.0  # type: ignore[arg-type]
    return torch.from_numpy(pixels * scale)


def load_mask(entry: Scored, options: dict[str, Any]) -> torch.Tensor:
    """Ground truth (bool) in the map's space: crop space for raw maps (preprocess.mask_to_crop),
    else the input resolution. All False for nominal images (they have no mask file).
    ValueError when the mask's size differs from its image's."""
    folder = entry.folder
    if entry.item.mask_uri is None:
        size = (folder.crop, folder.crop) if folder.maps == "raw" else (entry.height, entry.width)
        return torch.zeros(size, dtype=torch.bool)
    defect = datasets.read_mask(entry.item.mask_uri, options)
    if defect.shape != (entry.height, entry.width):
        raise ValueError(
            f"mask {entry.item.mask_uri} is {defect.shape[1]}x{defect.shape[0]} px but its image "
            f"{entry.item.uri} is {entry.width}x{entry.height}"
        )
    if folder.maps != "raw":
        return torch.from_numpy(defect)
    return torch.from_numpy(preprocess.mask_to_crop(defect, folder.resize, folder.crop, folder.frame))


def _value_range(entries: Sequence[Scored], options: dict[str, Any]) -> tuple[float, float]:
    """(low, high) over all maps of a category: the histogram range (first of two passes)."""
    folder = entries[0].folder
    if folder.maps == "png":  # 8-bit levels span this range by construction: no pass needed
        return 0.0, 2.0 * float(folder.pixel_threshold)  # type: ignore[arg-type]
    low, high = float("inf"), float("-inf")
    for entry in entries:
        amap = load_map(entry, options)
        low, high = min(low, float(amap.min())), max(high, float(amap.max()))
    return (low, high) if high > low else (low, low + 1.0)  # constant maps: bins need low < high


# --------------------------------------------------------------------------- metrics


def _counts(predicted: np.ndarray, defective: np.ndarray) -> dict[str, Any]:
    """false_positives, false_negatives and f1 of boolean predictions against the labels."""
    counts = metrics.confusion_counts(predicted, defective)
    f1 = metrics.f1_score(counts["true_positives"], counts["false_positives"], counts["false_negatives"])
    return {"false_positives": counts["false_positives"],
            "false_negatives": counts["false_negatives"], "f1": f1}


def image_metrics(name: str, entries: Sequence[Scored]) -> tuple[dict[str, Any], dict[str, report.Curve]]:
    """Image AUROC, F1-optimal and calibrated thresholds with FP/FN counts; plus ROC/PR curves.

    Returns ({num_images, num_defective, image_auroc, f1_optimal, calibrated}, {"image_roc",
    "image_pr"}); f1_optimal and calibrated hold threshold, f1, false_positives and
    false_negatives. Calibrated counts are None for an uncalibrated bank; its threshold is None
    when the entries come from banks with different thresholds.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve  # deferred: slow to import

    scores = torch.tensor([e.score for e in entries], dtype=torch.float64)
    labels = torch.tensor([e.item.label for e in entries], dtype=torch.int64)
    defective = labels.numpy().astype(bool)
    threshold, best_f1 = metrics.f1_optimal_threshold(scores, labels)  # "score >= threshold"
    best = {"threshold": threshold, **_counts(scores.numpy() >= threshold, defective), "f1": best_f1}
    if any(e.anomalous is None for e in entries):  # uncalibrated bank: no calibrated labels
        calibrated: dict[str, Any] = {"false_positives": None, "false_negatives": None, "f1": None}
    else:  # the score job's `anomalous` column: score > the bank's image threshold
        calibrated = _counts(np.array([bool(e.anomalous) for e in entries]), defective)
    thresholds = {e.folder.image_threshold for e in entries}
    calibrated["threshold"] = thresholds.pop() if len(thresholds) == 1 else None
    out = {
        "num_images": len(entries),
        "num_defective": int(labels.sum()),
        "image_auroc": metrics.image_auroc(scores, labels),
        "f1_optimal": best,
        "calibrated": calibrated,
    }
    fpr, tpr, _ = roc_curve(defective, scores.numpy())
    precision, recall, _ = precision_recall_curve(defective, scores.numpy())
    # (recall, precision) at the F1-optimal threshold, marked on the PR plot
    true_pos = int(labels.sum()) - best["false_negatives"]
    point = (true_pos / int(labels.sum()), true_pos / max(1, true_pos + best["false_positives"]))
    curves = {
        "image_roc": report.Curve(fpr, tpr, f"{name} (AUROC {out['image_auroc']:.3f})"),
        "image_pr": report.Curve(recall, precision, f"{name} (best F1 {best_f1:.3f})", point=point),
    }
    return out, curves


def pixel_metrics(
    name: str, entries: Sequence[Scored], config: EvaluateConfig, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, report.Curve]]:
    """Pixel AUROC, PRO, pixel F1 and calibrated-threshold counts, streaming one map at a time.

    Raw maps are read twice (value range, then histograms); only one map and mask are in memory
    at a time. ValueError when the category's folders differ in map geometry or a map and its
    mask differ in shape. All pixel metrics None (logged) when no defect pixel is in the maps.
    """
    # one histogram range per category: its maps must share kind, geometry and (PNG) scale
    geometry = {(e.folder.maps, e.folder.crop, e.folder.resize, e.folder.frame,
                 e.folder.pixel_threshold if e.folder.maps == "png" else None) for e in entries}
    if len(geometry) != 1:
        raise ValueError(
            f"category {name!r}: its results folders differ in map kind, crop, frame or PNG scale; "
            "score the category with one bank, or pass --maps raw"
        )
    low, high = _value_range(entries, options)
    num_bins = 256 if entries[0].folder.maps == "png" else config.num_bins  # PNG: one bin per level
    curves = metrics.new_pixel_curves(low, high, num_bins)
    calibrated = {"true_positives": 0, "false_positives": 0, "false_negatives": 0}
    for entry in entries:
        amap, mask = load_map(entry, options), load_mask(entry, options)
        if amap.shape != mask.shape:
            raise ValueError(f"{entry.item.uri}: map {tuple(amap.shape)} vs mask {tuple(mask.shape)}")
        metrics.update_pixel_curves(curves, amap, mask)
        if entry.folder.pixel_threshold is not None:
            # `>`: the score job's masks/ flag the pixels above the pixel threshold
            counts = metrics.confusion_counts(amap > entry.folder.pixel_threshold, mask)
            calibrated = {k: calibrated[k] + counts[k] for k in calibrated}
    if curves.num_regions == 0:  # e.g. every defect lies outside the centre crop
        log.warning("category %s: no defect pixels in the evaluated maps; no pixel metrics", name)
        return {"pixel_auroc": None, "pro": None, "num_regions": 0, "pixel": None}, {}
    pixel_thresholds = {e.folder.pixel_threshold for e in entries}
    out = {
        "pixel_auroc": metrics.pixel_auroc(curves),
        "pro": metrics.pro_auc(curves, config.max_fpr),
        "num_regions": curves.num_regions,
        "pixel": {
            "f1_optimal": metrics.pixel_f1_optimal(curves),
            "calibrated": {
                "threshold": pixel_thresholds.pop() if len(pixel_thresholds) == 1 else None,
                "false_positives": calibrated["false_positives"],
                "false_negatives": calibrated["false_negatives"],
                "f1": metrics.f1_score(calibrated["true_positives"], calibrated["false_positives"],
                                       calibrated["false_negatives"]),
            },
            "histogram": {"low": low, "high": high, "num_bins": num_bins},
        },
    }
    roc, pr = report.histogram_curves(
        curves.negatives.numpy(), curves.positives.numpy(),
        f"{name} (AUROC {out['pixel_auroc']:.3f})", f"{name} (best F1 {out['pixel']['f1_optimal']['f1']:.3f})",
    )
    return out, {"pixel_roc": roc, "pixel_pr": pr}


def evaluate_category(
    name: str, entries: Sequence[Scored], config: EvaluateConfig, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, report.Curve]]:
    """(metrics, curves for the plots) of one category; pixel metrics None without maps.

    metrics: `image_metrics`'s and `pixel_metrics`'s keys, plus "maps" (the map kind used).
    """
    out, curves = image_metrics(name, entries)
    maps = entries[0].folder.maps
    if maps == "none":
        pixel: dict[str, Any] = {"pixel_auroc": None, "pro": None, "num_regions": None, "pixel": None}
    else:
        pixel, pixel_curves = pixel_metrics(name, entries, config, options)
        curves.update(pixel_curves)
    return {**out, **pixel, "maps": maps}, curves


# --------------------------------------------------------------------------- overlays


def _overlay(entry: Scored, kind: str, rank: int, options: dict[str, Any]) -> bytes:
    """PNG of one worst case, drawn in the space the metrics used.

    raw maps: the input resized and cropped as the backbone saw it (crop x crop px); png maps:
    input resolution; none: image and ground truth only. Colour scale [0, 2 x pixel threshold]
    as the PNG maps use, else up to the map's maximum. kind: "nominal" | "defective", rank from 1.
    """
    image = preprocess.decode_image(storage.read_bytes(entry.item.uri, options))
    folder = entry.folder
    amap = None if folder.maps == "none" else load_map(entry, options).numpy()
    if folder.maps == "raw":
        box = preprocess.crop_box(image.width, image.height, folder.resize, folder.crop,
                                  frame=folder.frame)
        image = image.resize((folder.crop, folder.crop), Image.Resampling.BILINEAR, box=box)
        mask = load_mask(entry, options).numpy()
    elif folder.maps == "png":
        mask = load_mask(entry, options).numpy()
    else:
        mask = np.zeros((image.height, image.width), dtype=bool)
        if entry.item.mask_uri is not None:
            mask = datasets.read_mask(entry.item.mask_uri, options)
    threshold = folder.pixel_threshold
    vmax = 2.0 * threshold if threshold else float(amap.max()) if amap is not None else 1.0
    calibrated = "" if folder.image_threshold is None else f" (threshold {folder.image_threshold:.4g})"
    title = (f"{kind} #{rank}: {entry.item.defect}/{posixpath.basename(entry.item.uri)}  "
             f"score {entry.score:.4g}{calibrated}")
    return report.overlay_png(np.asarray(image), amap, mask, title, vmax, threshold)


def _worst(entries: Sequence[Scored], count: int) -> list[tuple[str, int, Scored]]:
    """(kind, rank from 1, entry) of the `count` highest-scoring nominal and lowest-scoring
    defective entries: the likeliest false positives and false negatives."""
    nominal = sorted((e for e in entries if e.item.label == 0), key=lambda e: -e.score)[:count]
    defective = sorted((e for e in entries if e.item.label == 1), key=lambda e: e.score)[:count]
    return [("nominal", i + 1, e) for i, e in enumerate(nominal)] + [
        ("defective", i + 1, e) for i, e in enumerate(defective)
    ]


# --------------------------------------------------------------------------- job


def run(config: EvaluateConfig) -> dict[str, Any] | None:
    """Evaluate and write the report; returns the metrics (None for a dry run or a no-op rerun).

    Writes into --out overlays/<category>/<kind>_<rank>.png, roc.png, pr.png, metrics.json,
    report.md and last manifest.json, the commit (DESIGN.md §4). ValueError or
    FileNotFoundError for a bad dataset, an uncommitted results folder, or unmatched results.
    """
    options = config.options
    if reuse_committed(config.out, "report", options, overwrite=config.overwrite) is not None:
        return None
    categories = datasets.load_dataset(config.dataset, options, require_train=False)
    folders = [read_results(r.strip(), config.maps, options, config.run_id)
               for r in config.results.split(",") if r.strip()]
    matched, skipped = match(categories, folders)
    log.info(
        "matched %s; skipped (no scores): %s",
        {name: len(v) for name, v in matched.items()}, skipped or "none",
    )
    if config.dry_run:
        return None
    if config.overwrite:  # un-commit first: a crash midway must not leave the old manifest
        storage.remove(storage.join_uri(config.out, storage.MANIFEST_NAME), options)

    per_category, plots, overlays = {}, {}, []
    for name, entries in matched.items():
        log.info("evaluating %s (%d images, maps: %s)", name, len(entries), entries[0].folder.maps)
        per_category[name], plots[name] = evaluate_category(name, entries, config, options)
        for kind, rank, entry in _worst(entries, config.overlays):
            path = f"overlays/{name}/{kind}_{rank}.png"
            storage.write_bytes(storage.join_uri(config.out, path), _overlay(entry, kind, rank, options), options)
            overlays.append((f"{name}: {kind} #{rank} ({entry.item.defect}, score {entry.score:.4g})", path))
    mean = {k: metrics.mean_present([m[k] for m in per_category.values()]) for k in ("image_auroc", "pixel_auroc", "pro")}
    kinds = sorted({m["maps"] for m in per_category.values()})
    notes = {
        "raw": "raw float maps in crop space (ground truth resized and centre-cropped as the images)",
        "png": "8-bit PNG maps at input resolution (saturate at 2x the pixel threshold: approximate)",
        "none": "none (pixel metrics not computed)",
    }
    result = {
        "categories": per_category,
        "mean": mean,
        "skipped": skipped,
        "settings": {"max_fpr": config.max_fpr, "num_bins": config.num_bins,
                     "maps": kinds, "maps_note": "; ".join(notes[k] for k in kinds)},
        "inputs": {"results": [f[0].uri for f in folders], "dataset": config.dataset},
    }
    figures = report.curve_pngs(plots)  # {"roc.png": bytes, "pr.png": bytes}
    for path, data in figures.items():
        storage.write_bytes(storage.join_uri(config.out, path), data, options)
    text = json.dumps(result, indent=2, sort_keys=False, allow_nan=False)
    storage.write_bytes(storage.join_uri(config.out, "metrics.json"), text.encode(), options)
    markdown = report.report_markdown(result, {"ROC curves": "roc.png", "Precision-recall curves": "pr.png"},
                               overlays)
    storage.write_bytes(storage.join_uri(config.out, "report.md"), markdown.encode(), options)
    manifest = {
        "config": config_dict(config),
        "inputs": result["inputs"],
        "mean": mean,
        "counts": {"categories": len(per_category), "images": sum(len(v) for v in matched.values()),
                   "skipped_categories": len(skipped), "overlays": len(overlays)},
        "files": ["metrics.json", "report.md", "roc.png", "pr.png", *[p for _, p in overlays]],
    }
    storage.write_manifest(config.out, manifest, kind="report", storage_options=options)  # commit
    log.info("report written to %s: %s", config.out, json.dumps(mean))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """`patchcore evaluate [flags]`: parse the flags (errors exit 2), log the config, run."""
    config = parse_config(EvaluateConfig, argv, prog="patchcore evaluate")
    logs.setup_logging(config.log_level)
    log.info("config %s", config_json(config))
    run(config)


if __name__ == "__main__":
    main()
