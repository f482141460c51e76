"""Evaluation metrics (paper §4.1): image AUROC, streaming pixel AUROC and PRO, F1 threshold.

Pixel metrics stream over images: each map is binned into fixed score bins and only counts are
kept, so memory is O(num_bins) whatever the number or size of images. Confusion counts and F1
of thresholded predictions (images or pixels) live here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import sklearn.metrics
import torch

# PRO accumulates each region's overlap fractions in fixed point (integers), so sums are exact and
# independent of the merge order. Resolution 2**-40 per region; int64 holds 2**23 regions.
_FIXED_ONE = 2**40
_MAX_REGIONS = 2**22


@dataclass
class PixelCurves:
    """Histogram counts of pixel scores over `num_bins` equal bins on [low, high].

    Bin i holds scores in [edges[i], edges[i + 1]), edges = low + (high - low) * arange(n + 1) / n
    (float64, n = num_bins); scores outside [low, high] are clipped into the first/last bin.
    Threshold i predicts "defect" for pixels in bins >= i, i.e. scores are quantised to their bin.
    negatives / positives: (num_bins,) int64 counts of nominal / defect pixels per bin.
    region_overlap: (num_bins,) int64, sum over defect regions r of
    round(2**40 * |{p in r: bin(p) >= i}| / |r|); num_regions: how many regions were summed.
    """

    low: float
    high: float
    num_bins: int
    negatives: torch.Tensor
    positives: torch.Tensor
    region_overlap: torch.Tensor
    num_regions: int = 0

    def edges(self) -> torch.Tensor:
        """(num_bins + 1,) float64 bin edges."""
        steps = torch.arange(self.num_bins + 1, dtype=torch.float64)
        return self.low + (self.high - self.low) * steps / self.num_bins


def new_pixel_curves(low: float, high: float, num_bins: int) -> PixelCurves:
    """Empty curves over [low, high] (anomaly-score units) with `num_bins` bins."""
    if not low < high or num_bins < 1:
        raise ValueError(
            f"need low < high and num_bins >= 1, got low={low}, high={high}, num_bins={num_bins}"
        )
    zeros = torch.zeros(num_bins, dtype=torch.int64)
    return PixelCurves(float(low), float(high), num_bins, zeros, zeros.clone(), zeros.clone())


def update_pixel_curves(curves: PixelCurves, amap: torch.Tensor, mask: torch.Tensor) -> PixelCurves:
    """Add one image: anomaly map (H, W) float and ground-truth defect mask (H, W) bool.

    Defect regions are the 8-connected components of the mask in this image. Updates `curves` in
    place and returns it.
    """
    if amap.ndim != 2 or amap.shape != mask.shape:
        raise ValueError(
            f"need amap and mask of the same (H, W) shape, "
            f"got {tuple(amap.shape)} and {tuple(mask.shape)}"
        )
    scores = amap.detach().to("cpu", torch.float64)
    if torch.isnan(scores).any():
        raise ValueError("amap contains NaN; check the scoring step")
    bins = torch.bucketize(scores, curves.edges()[1:-1], right=True).numpy()  # (H, W) in [0, n)
    defect = mask.detach().to("cpu", torch.bool).numpy()
    n = curves.num_bins
    curves.negatives += torch.from_numpy(np.bincount(bins[~defect], minlength=n))
    curves.positives += torch.from_numpy(np.bincount(bins[defect], minlength=n))
    labels, num_regions = scipy.ndimage.label(defect, structure=np.ones((3, 3), dtype=bool))
    if num_regions == 0:
        return curves
    if curves.num_regions + num_regions > _MAX_REGIONS:
        raise ValueError(f"more than {_MAX_REGIONS} defect regions; evaluate in smaller groups")
    # per-region histogram (R, n): row r-1 counts the pixels of region r in each bin
    region_hist = np.bincount(
        (labels[defect] - 1) * n + bins[defect], minlength=num_regions * n
    ).reshape(num_regions, n)
    above = np.cumsum(region_hist[:, ::-1], axis=1)[:, ::-1]  # pixels in bins >= i
    fraction = above / above[:, :1]  # (R, n); column 0 holds the region size
    fixed = np.rint(fraction * _FIXED_ONE).astype(np.int64)
    curves.region_overlap += torch.from_numpy(fixed.sum(axis=0))
    curves.num_regions += num_regions
    return curves


def _rates_above(counts: torch.Tensor) -> np.ndarray:
    """(n,) bin counts -> (n + 1,) fraction in bins >= i for i = n, n-1, ..., 0 (from 0 up to 1)."""
    above = np.concatenate([[0], np.cumsum(counts.numpy()[::-1])])
    return above / above[-1]


def pixel_auroc(curves: PixelCurves) -> float:
    """Area under the pixel ROC curve of the binned scores (equals sklearn on quantised scores)."""
    if int(curves.negatives.sum()) == 0 or int(curves.positives.sum()) == 0:
        raise ValueError(
            "pixel AUROC needs both nominal and defect pixels, got "
            f"{int(curves.negatives.sum())} nominal and {int(curves.positives.sum())} defect pixels"
        )
    fpr = _rates_above(curves.negatives)
    tpr = _rates_above(curves.positives)
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))


def pro_auc(curves: PixelCurves, max_fpr: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to `max_fpr` (MVTec AD's AU-PRO).

    At each threshold: PRO = mean over all defect regions (8-connected components of the ground
    truth, per image) of the fraction of the region's pixels above the threshold; FPR = fraction of
    nominal pixels (of all images) above it. The PRO-vs-FPR curve is integrated by trapezoids from
    FPR 0 to `max_fpr` (interpolating linearly at `max_fpr`) and divided by `max_fpr`.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr!r}")
    if curves.num_regions == 0 or int(curves.negatives.sum()) == 0:
        raise ValueError(
            f"PRO needs defect regions and nominal pixels, got {curves.num_regions} regions and "
            f"{int(curves.negatives.sum())} nominal pixels"
        )
    fpr = _rates_above(curves.negatives)  # (n + 1,), thresholds from high to low
    overlap = np.concatenate([[0], curves.region_overlap.numpy()[::-1]])
    pro = overlap / (_FIXED_ONE * curves.num_regions)
    inside = int(np.searchsorted(fpr, max_fpr, side="right"))  # points with fpr <= max_fpr
    xs, ys = fpr[:inside], pro[:inside]
    if inside < len(fpr):  # cut the segment that crosses max_fpr
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        xs = np.append(xs, max_fpr)
        ys = np.append(ys, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0))
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / max_fpr)


def image_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of image scores (N,) against labels (N,) (1/True = anomalous), via sklearn."""
    y_true, y_score = _check_scores_labels(scores, labels)
    return float(sklearn.metrics.roc_auc_score(y_true, y_score))


def f1_optimal_threshold(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(threshold, F1) maximising F1 when "score >= threshold" predicts anomalous.

    Candidates are the distinct scores (as sklearn's precision_recall_curve); equal F1 goes to the
    smallest threshold. scores, labels: (N,), labels 1/True = anomalous.
    """
    y_true, y_score = _check_scores_labels(scores, labels)
    order = np.argsort(-y_score, kind="stable")
    ordered, positive = y_score[order], y_true[order]
    true_pos = np.cumsum(positive)
    false_pos = np.cumsum(~positive)
    # the prediction set for threshold ordered[i] ends at the last index holding that value
    last = np.flatnonzero(np.append(ordered[1:] != ordered[:-1], True))
    f1 = 2 * true_pos[last] / (true_pos[last] + false_pos[last] + true_pos[-1])
    best = len(last) - 1 - int(np.argmax(f1[::-1]))  # ties: the last, i.e. smallest threshold
    return float(ordered[last[best]]), float(f1[best])


def f1_score(true_pos: np.ndarray | int, false_pos: np.ndarray | int, false_neg: np.ndarray | int
             ) -> np.ndarray | float:
    """F1 = 2 TP / (2 TP + FP + FN), elementwise; 0 where there is nothing to count."""
    if np.ndim(true_pos) == 0:
        return 2 * int(true_pos) / max(1, 2 * int(true_pos) + int(false_pos) + int(false_neg))
    return 2 * true_pos / np.maximum(1, 2 * true_pos + false_pos + false_neg)


def confusion_counts(predicted: np.ndarray | torch.Tensor, defective: np.ndarray | torch.Tensor
                     ) -> dict[str, int]:
    """true_positives, false_positives, false_negatives of boolean predictions against boolean
    labels of the same shape (images or pixels)."""
    if predicted.shape != defective.shape:
        raise ValueError(f"predictions {tuple(predicted.shape)} and labels "
                         f"{tuple(defective.shape)} differ in shape")
    return {"true_positives": int((predicted & defective).sum()),
            "false_positives": int((predicted & ~defective).sum()),
            "false_negatives": int((~predicted & defective).sum())}


def pixel_f1_optimal(curves: PixelCurves) -> dict[str, float | int]:
    """Best pixel F1 over the histogram's bin edges, where "bin >= i" predicts defect: threshold
    (the bin's lower edge), f1, false_positives, false_negatives. Ties: the lowest edge."""
    true_pos = np.cumsum(curves.positives.numpy()[::-1])[::-1]  # (n,) defect pixels in bins >= i
    false_pos = np.cumsum(curves.negatives.numpy()[::-1])[::-1]
    positives = true_pos[0]
    f1 = f1_score(true_pos, false_pos, positives - true_pos)
    best = int(np.argmax(f1))
    return {"threshold": float(curves.edges()[best]), "f1": float(f1[best]),
            "false_positives": int(false_pos[best]), "false_negatives": int(positives - true_pos[best])}


def _check_scores_labels(
    scores: torch.Tensor, labels: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) scores and labels -> (bool, float64) numpy arrays with both classes present."""
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"need scores and labels of the same (N,) shape, "
            f"got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    y_true = labels.detach().cpu().numpy()
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError(f"labels must be 0/1 or bool, got values {np.unique(y_true)[:5].tolist()}")
    y_true = y_true.astype(bool)
    if y_true.all() or not y_true.any():
        raise ValueError(
            "need both nominal and anomalous labels, "
            f"got {int(y_true.sum())} anomalous of {len(y_true)}"
        )
    return y_true, scores.detach().to("cpu", torch.float64).numpy()


def mean_present(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None (e.g. categories without pixel metrics); None when
    none is."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None
