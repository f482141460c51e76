"""The morning report of one `patchcore score --incremental` run: reports/run=ID/report.{html,md}.

Owns: what the report says (counts, errors by reason, anomaly rate against the bank's target FPR,
this run's scores against the bank's calibration scores with a drift alarm, the most anomalous
images as overlays) and its two renderings. report.html is self-contained (PNGs inline, base64).
Figures come from jobs.report; all reads and writes go through patchcore_core.storage.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from jobs import report
from jobs.folders import map_uri
from patchcore_core import preprocess, storage

log = logging.getLogger("jobs.nightly_report")

QUANTILES = (0.5, 0.95, 0.99)  # compared with the calibration scores; 0.95 and 0.99 raise alarms
ALARM_QUANTILES = (0.95, 0.99)


def _run_rows(out: str, sub: str, run: str, columns: Sequence[str],
              options: dict[str, Any]) -> dict[str, list[Any]]:
    """The `columns` of every part of `sub`/run=ID/ as lists."""
    rows: dict[str, list[Any]] = {c: [] for c in columns}
    for part in storage.list_files(storage.join_uri(out, sub, run), "part-*.parquet", options):
        table = storage.read_table(part, list(columns), options).to_pydict()
        for c in columns:
            rows[c] += table[c]
    return rows


def error_reason(error: str) -> str:
    """An error message without its particulars (URIs, sizes): its type and first clause, numbers
    as N, e.g. 'ValueError: corrupt image header'."""
    kind, _, message = error.partition(": ")
    head = re.sub(r"\d+", "N", re.split(r"[:;(]", message, maxsplit=1)[0]).strip()[:80]
    return f"{kind}: {head}" if head else kind


def calibration_of(bank_manifest: Mapping[str, Any]) -> tuple[np.ndarray | None, float | None]:
    """(calibration image scores or None, target FPR or None) recorded in a bank's manifest (by
    `patchcore fit`: info.fit.calibration; by model.fit: info.calibration, info.config)."""
    info = bank_manifest.get("info") or {}
    fit = (info.get("fit") or {}).get("calibration") or {}
    scores = fit.get("scores") or (info.get("calibration") or {}).get("scores")
    fpr = fit.get("target_fpr", (info.get("config") or {}).get("target_fpr"))
    return (np.asarray(scores, np.float64) if scores else None), fpr


def drift(scores: np.ndarray, reference: np.ndarray | None, tolerance: float) -> dict[str, Any]:
    """QUANTILES of this run's and of the reference scores; alarm when an ALARM_QUANTILES one of
    the run exceeds the reference's by more than `tolerance` times the reference's."""
    out: dict[str, Any] = {"tolerance": tolerance, "quantiles": {}, "alarm": None, "moved": []}
    if reference is None or not len(scores):
        return out
    for q in QUANTILES:
        night, calib = float(np.quantile(scores, q)), float(np.quantile(reference, q))
        out["quantiles"][f"p{round(q * 100)}"] = {"run": night, "calibration": calib}
        if q in ALARM_QUANTILES and night > calib * (1.0 + tolerance):
            out["moved"].append(f"p{round(q * 100)}")
    out["alarm"] = bool(out["moved"])
    return out


def _overlay(out: str, uri: str, rel: str, score: float, manifest: Mapping[str, Any],
             options: dict[str, Any]) -> bytes:
    """Image / heatmap / predicted-mask panels of one scored input (maps/ and masks/ if written)."""
    pixel_threshold = manifest["pixel_threshold"]
    image = np.asarray(preprocess.decode_image(storage.read_bytes(uri, options)).convert("RGB"))
    amap, mask = None, np.zeros(image.shape[:2], bool)
    if manifest["maps"]["png"]:
        heat = np.asarray(Image.open(io.BytesIO(storage.read_bytes(map_uri(out, rel, "png"), options))))
        amap = heat.astype(np.float32) / 255.0 * 2.0 * pixel_threshold  # the fixed map scale
        mask = np.asarray(Image.open(io.BytesIO(storage.read_bytes(map_uri(out, rel, "mask"),
                                                                   options)))) > 127
    vmax = 2.0 * pixel_threshold if pixel_threshold else float(score)
    return report.overlay_png(image, amap, mask, f"{rel}: score {score:.4g}", vmax, pixel_threshold,
                              mask_label="predicted defect mask")


def summarise(out: str, run_id: str, manifest: Mapping[str, Any], bank_manifest: Mapping[str, Any],
              options: dict[str, Any], top: int, drift_tolerance: float) -> dict[str, Any]:
    """The report's numbers (also stored in the run's manifest as `report`)."""
    run = f"run={run_id}"
    rows = _run_rows(out, "scores", run, ["uri", "rel", "score", "anomalous"], options)
    errors = _run_rows(out, "errors", run, ["error"], options)["error"]
    scores = np.asarray(rows["score"], np.float64)
    calibration, target_fpr = calibration_of(bank_manifest)
    anomalous = sum(1 for a in rows["anomalous"] if a)
    order = np.argsort(-scores, kind="stable")[:top]
    return {
        "run_id": run_id, "bank_id": manifest["bank_id"], "bank_digest": manifest["bank_digest"],
        "counts": dict(manifest["counts"]),
        "errors_by_reason": dict(Counter(error_reason(e) for e in errors).most_common()),
        "anomalous": anomalous,
        "anomaly_rate": anomalous / len(scores) if len(scores) else None,
        "target_fpr": target_fpr,
        "image_threshold": manifest["image_threshold"],
        "calibration_scores": None if calibration is None else len(calibration),
        "drift": drift(scores, calibration, drift_tolerance),
        "top": [{"uri": rows["uri"][i], "rel": rows["rel"][i], "score": float(scores[i])}
                for i in order],
    }


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.2%}"


def _lines(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table, shared by both renderings."""
    counts, d, threshold = summary["counts"], summary["drift"], summary["image_threshold"]
    errors = ", ".join(f"{k}: {v}" for k, v in summary["errors_by_reason"].items()) or "none"
    if d["alarm"] is None:
        drift_text = "not checked: the bank stores no calibration scores (refit with `patchcore fit`)"
    elif d["alarm"]:
        drift_text = (f"ALARM: {', '.join(d['moved'])} above calibration by more than "
                      f"{d['tolerance']:.0%} (--drift-tolerance)")
    else:
        drift_text = f"ok: p95 and p99 within {d['tolerance']:.0%} of calibration (--drift-tolerance)"
    return [
        ("bank", f"{summary['bank_id']} (digest {summary['bank_digest'][:12]})"),
        ("inputs listed", str(counts["listed"])),
        ("already scored with this bank (skipped)", str(counts["already_scored"])),
        ("inputs of this run", str(counts["inputs"])),
        ("scored", str(counts["scored"])),
        ("errors", f"{counts['errors']} ({errors})"),
        ("anomalous", str(summary["anomalous"])),
        ("anomaly rate", (f"{_rate(summary['anomaly_rate'])} (bank's calibrated target FPR "
                          f"{_rate(summary['target_fpr'])}, image threshold "
                          f"{'–' if threshold is None else f'{threshold:.4g}'})")),
        ("score drift", drift_text),
    ]


def render_markdown(summary: Mapping[str, Any]) -> str:
    """report.md: the summary table, the quantiles and the top images (figures: report.html)."""
    out = [f"# Scoring run {summary['run_id']}", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in _lines(summary)]
    quantiles = summary["drift"]["quantiles"]
    if quantiles:
        out += ["", "| quantile | this run | calibration |", "|---|---|---|"]
        out += [f"| {q} | {v['run']:.4g} | {v['calibration']:.4g} |" for q, v in quantiles.items()]
    out += ["", f"## {len(summary['top'])} most anomalous", "", "| score | input |", "|---|---|"]
    out += [f"| {t['score']:.4g} | {t['uri']} |" for t in summary["top"]]
    out += ["", "Figures (score histogram, overlays): report.html", ""]
    return "\n".join(out)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def render_html(summary: Mapping[str, Any], histogram: bytes, overlays: Sequence[tuple[str, bytes]]
                ) -> str:
    """report.html, self-contained: the summary, the histogram and the overlays inline."""
    e = html.escape
    alarm = summary["drift"]["alarm"]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _lines(summary))
    quantiles = "".join(f"<tr><td>{e(q)}</td><td>{v['run']:.4g}</td><td>{v['calibration']:.4g}</td></tr>"
                        for q, v in summary["drift"]["quantiles"].items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Scoring run {e(summary['run_id'])}</title>",
        ("<style>body{font-family:sans-serif;margin:2em;background:#fff}"
         "table{border-collapse:collapse}th,td{border:1px solid #999;padding:4px 8px;"
         "text-align:left}.alarm{background:#c00;color:#fff;padding:8px}</style></head><body>"),
        f"<h1>Scoring run {e(summary['run_id'])}</h1>",
        "<p class='alarm'>Score drift alarm</p>" if alarm else "",
        f"<table>{rows}</table>",
    ]
    if quantiles:
        parts.append("<h2>Scores vs calibration</h2><table><tr><th>quantile</th><th>this run</th>"
                     f"<th>calibration</th></tr>{quantiles}</table>")
    parts.append(_img(histogram, "score histogram"))
    parts.append(f"<h2>{len(overlays)} most anomalous</h2>")
    parts += [f"<div><p>{e(title)}</p>{_img(png, title)}</div>" for title, png in overlays]
    parts.append("</body></html>")
    return "\n".join(parts)


def write(out: str, run_id: str, manifest: Mapping[str, Any], bank_manifest: Mapping[str, Any],
          options: dict[str, Any], *, top: int, drift_tolerance: float) -> dict[str, Any]:
    """Write reports/run=ID/report.html and report.md from the run's committed parts; returns the
    summary. An overlay whose input can no longer be read is left out (logged)."""
    summary = summarise(out, run_id, manifest, bank_manifest, options, top, drift_tolerance)
    scores = np.asarray(_run_rows(out, "scores", f"run={run_id}", ["score"], options)["score"])
    calibration, _ = calibration_of(bank_manifest)
    histogram = report.score_histogram_png(scores, calibration, manifest["image_threshold"],
                                           f"run {run_id}: image scores")
    overlays = []
    for item in summary["top"]:
        title = f"{item['score']:.4g}  {item['uri']}"
        try:
            overlays.append((title, _overlay(out, item["uri"], item["rel"], item["score"], manifest,
                                             options)))
        except (FileNotFoundError, OSError, ValueError) as err:  # replaced or removed since
            log.warning("report: no overlay for %s (%s)", item["uri"], err)
    folder = storage.join_uri(out, "reports", f"run={run_id}")
    storage.write_bytes(storage.join_uri(folder, "report.html"),
                        render_html(summary, histogram, overlays).encode("utf-8"), options)
    storage.write_bytes(storage.join_uri(folder, "report.md"),
                        render_markdown(summary).encode("utf-8"), options)
    log.info("report of run %s: %s", run_id, storage.join_uri(folder, "report.html"))
    return summary
