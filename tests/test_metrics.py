"""Streaming pixel metrics against sklearn and a brute-force PRO; image AUROC; F1 threshold."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
import sklearn.metrics
import torch

from patchcore_core import metrics

LOW, HIGH, BINS = 0.0, 4.0, 64


def label_8_connected(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Pixels of each 8-connected component of `mask`, by breadth-first search."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, region = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if (
                        0 <= v < mask.shape[0]
                        and 0 <= u < mask.shape[1]
                        and mask[v, u]
                        and not seen[v, u]
                    ):
                        seen[v, u] = True
                        queue.append((v, u))
        regions.append(region)
    return regions


def quantise(scores: np.ndarray, low: float, high: float, num_bins: int) -> np.ndarray:
    """Bin index of each score: bins [e_i, e_i+1) of equal width, outside values clipped."""
    edges = low + (high - low) * np.arange(num_bins + 1) / num_bins
    return np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, num_bins - 1)


def brute_force_pro(images, low, high, num_bins, max_fpr=0.3) -> float:
    """Sweep thresholds over quantised scores: mean region overlap vs nominal FPR, trapezoids."""
    quantised = [(quantise(a, low, high, num_bins), m) for a, m in images]
    regions = [q[tuple(np.array(r).T)] for q, m in quantised for r in label_8_connected(m)]
    nominal = np.concatenate([q[~m] for q, m in quantised])
    points = []
    for t in range(num_bins, -1, -1):  # "defect" means bin >= t; t = num_bins predicts nothing
        fpr = np.mean(nominal >= t)
        pro = np.mean([np.mean(r >= t) for r in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def make_images(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Images of different sizes with several defect regions each (one image defect-free)."""
    rng = np.random.default_rng(seed)
    images = []
    for index, (h, w) in enumerate([(20, 24), (16, 16), (24, 18), (12, 30)]):
        mask = np.zeros((h, w), dtype=bool)
        if index != 1:
            for _ in range(3):
                y, x = rng.integers(0, h - 4), rng.integers(0, w - 5)
                mask[y : y + rng.integers(1, 4), x : x + rng.integers(1, 5)] = True
            mask[h - 1, w - 1] = mask[h - 2, w - 2] = True  # diagonal neighbours: one region
        amap = rng.gamma(2.0, 0.5, size=(h, w)) + 1.5 * mask * rng.random((h, w))
        amap[0, 0] = -1.0  # outside [LOW, HIGH]: clipped into the end bins
        amap[0, 1] = 9.0
        images.append((amap.astype(np.float32), mask))
    return images


def curves_of(images, low=LOW, high=HIGH, num_bins=BINS) -> metrics.PixelCurves:
    curves = metrics.new_pixel_curves(low, high, num_bins)
    for amap, mask in images:
        metrics.update_pixel_curves(curves, torch.from_numpy(amap), torch.from_numpy(mask))
    return curves


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_equals_sklearn_on_bin_centre_quantised_scores(seed: int) -> None:
    images = make_images(seed)
    labels = np.concatenate([m.ravel() for _, m in images])
    bins = np.concatenate([quantise(a.ravel(), LOW, HIGH, BINS) for a, _ in images])
    centres = LOW + (bins + 0.5) * (HIGH - LOW) / BINS
    expected = sklearn.metrics.roc_auc_score(labels, centres)
    assert metrics.pixel_auroc(curves_of(images)) == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_with_fine_bins_is_close_to_unquantised() -> None:
    images = make_images(0)
    labels = np.concatenate([m.ravel() for _, m in images])
    scores = np.concatenate([a.ravel() for a, _ in images])
    expected = sklearn.metrics.roc_auc_score(labels, scores)
    fine = curves_of(images, low=float(scores.min()), high=float(scores.max()), num_bins=20_000)
    assert metrics.pixel_auroc(fine) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_pro_auc_equals_brute_force_region_sweep(seed: int, max_fpr: float) -> None:
    images = make_images(seed)
    expected = brute_force_pro(images, LOW, HIGH, BINS, max_fpr)
    assert metrics.pro_auc(curves_of(images), max_fpr) == pytest.approx(expected, abs=1e-9)


def test_perfect_maps_give_pro_and_auroc_of_one() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:4, 2:5] = mask[7:9, 6:8] = True
    curves = curves_of([(mask.astype(np.float32) * 3 + 0.5, mask)])
    assert metrics.pixel_auroc(curves) == 1.0
    assert metrics.pro_auc(curves) == pytest.approx(1.0, abs=1e-12)


def test_regions_are_8_connected_per_image() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal: one region
    mask[4, 4] = True  # a second one
    curves = curves_of([(np.zeros((6, 6), np.float32), mask), (np.zeros((6, 6), np.float32), mask)])
    assert curves.num_regions == 4 == 2 * len(label_8_connected(mask))


def test_histograms_clip_scores_into_the_end_bins() -> None:
    curves = metrics.new_pixel_curves(0.0, 1.0, 4)
    amap = torch.tensor([[-5.0, 0.1, 0.3, 0.6, 0.99, 1.0, 7.0]])
    metrics.update_pixel_curves(curves, amap, torch.zeros_like(amap, dtype=torch.bool))
    assert curves.negatives.tolist() == [2, 1, 1, 3]
    assert curves.positives.tolist() == [0, 0, 0, 0]


def test_curves_memory_does_not_grow_with_image_count_or_size() -> None:
    one = curves_of(make_images(0)[:1])
    many = curves_of(
        make_images(0) * 3 + [(np.ones((200, 300), np.float32), np.ones((200, 300), bool))]
    )
    for field in ("negatives", "positives", "region_overlap"):
        assert getattr(one, field).shape == getattr(many, field).shape == (BINS,)


def test_pixel_metrics_need_both_classes() -> None:
    curves = curves_of([(np.zeros((4, 4), np.float32), np.zeros((4, 4), bool))])
    with pytest.raises(ValueError, match="0 defect pixels"):
        metrics.pixel_auroc(curves)
    with pytest.raises(ValueError, match="0 regions"):
        metrics.pro_auc(curves)


def test_image_auroc_hand_example() -> None:
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    assert metrics.image_auroc(scores, torch.tensor([0, 0, 1, 1])) == 0.75  # 3 of 4 pairs ordered


def brute_force_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    best = (-1.0, 0.0)
    for t in sorted(set(scores.tolist())):  # ascending: keep the first (smallest) best threshold
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        f1 = 2 * tp / (2 * tp + np.sum(predicted & ~labels) + np.sum(~predicted & labels))
        if f1 > best[0]:
            best = (f1, t)
    return best[1], best[0]


@pytest.mark.parametrize("seed", range(4))
def test_f1_optimal_threshold_equals_brute_force_sweep(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.3
    scores = rng.integers(0, 12, size=60) + 4 * labels * rng.random(60).round(1)  # with ties
    threshold, f1 = metrics.f1_optimal_threshold(torch.from_numpy(scores), torch.from_numpy(labels))
    expected_threshold, expected_f1 = brute_force_f1(scores, labels)
    assert threshold == expected_threshold
    assert f1 == pytest.approx(expected_f1, abs=1e-12)


def test_metrics_reject_single_class_labels() -> None:
    with pytest.raises(ValueError, match="both nominal and anomalous"):
        metrics.image_auroc(torch.rand(5), torch.zeros(5))
