"""benchmarks/accuracy_bench.py: a toy-size run, and its plain re-implementation against the
project's paper/crop path (same preprocessing, backbone maps, patch features and maps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import accuracy_bench as ab
from patchcore_core import backbone, features, metrics, preprocess

TILE, CROP = 72, 64  # crop box: pixels 4..67 of the tile


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    return ab.plain_backbone()


@pytest.fixture(scope="module")
def data() -> ab.CategoryData:
    return ab.category_data("gravel", TILE, num_train=3, num_good=2, num_defect=1, seed=0)


def test_toy_run_has_every_method_category_and_placement_with_metrics_in_range(
    tmp_path: Path,
) -> None:
    rows, eq7 = ab.main(["--categories", "brick,hubble", "--tile", str(TILE), "--crop", str(CROP),
                         "--train", "3", "--test-good", "2", "--test-defect", "1",
                         "--embed-dim", "64", "--out", str(tmp_path)])
    keys = [(r["placement"], r["category"], r["method"]) for r in rows]
    expected = {(p, c, m) for p in ab.PLACEMENTS for c in ("brick", "hubble") for m in ab.METHODS}
    assert len(keys) == len(expected) and set(keys) == expected
    for r in rows:
        assert all(0.0 <= r[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "pro")), r
        # the data property the border placement exists for: part of each defect is cut off
        if r["placement"] == "centre":
            assert r["outside_crop"] == 0.0
        else:
            assert r["outside_crop"] > 0.2
    assert len(eq7) == len(ab.PLACEMENTS) * 2 * len(ab.PROJECT_METHODS)
    for r in eq7:
        assert r["images"] == 2 + 5 and 0 <= r["differ"] <= r["images"]
        assert 0.0 < r["min"] <= r["median"] <= 1.0
        assert r["check"] < 1e-6  # these weights reproduce the model's Eq. 7 image scores
    table = (tmp_path / "accuracy.md").read_text()
    for placement, category, method in expected:
        assert f"| {placement} | {category} | {method} |" in table
    for placement in ab.PLACEMENTS:
        for method in ab.METHODS:
            assert f"| {placement} | **mean** | {method} |" in table


def test_border_defects_lie_in_the_outer_band_and_centre_defects_inside_the_crop(
    data: ab.CategoryData,
) -> None:
    band = ab.border_band(TILE)
    for placement, test in data.tests.items():
        defects = test.masks[2:]
        assert len(defects) == 5 and all(m.any() for m in defects)
        assert not any(m.any() for m in test.masks[:2])
        if placement == "border":
            assert not any((mask & ~band).any() for mask in defects)
        else:
            assert ab.outside_crop_fraction(defects, TILE, CROP) == 0.0
    # border defects are painted on the clean tiles under the demo's centre defects
    centre, border = data.tests["centre"], data.tests["border"]
    for c_img, c_mask, b_img, b_mask in zip(centre.images[2:], centre.masks[2:], border.images[2:],
                                            border.masks[2:]):
        untouched = ~c_mask & ~b_mask
        np.testing.assert_array_equal(c_img[untouched], b_img[untouched])


def test_plain_preprocessing_and_backbone_equal_the_project_ones(
    network: torch.nn.Module, data: ab.CategoryData
) -> None:
    spec = ab.project_spec("paper", "crop", TILE, CROP, 64)
    images = data.train[:2]
    plain = ab.plain_preprocess(images, TILE, CROP)
    project = ab._project_tensors(images, spec)
    torch.testing.assert_close(plain, project, atol=1e-5, rtol=0)
    with torch.inference_mode():
        project_maps = backbone.load_backbone(spec, "cpu")(project)
    for mine, theirs in zip(ab.plain_feature_maps(network, project), project_maps, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_plain_patch_features_equal_project_paper_aggregation_on_the_same_maps(
    network: torch.nn.Module, data: ab.CategoryData
) -> None:
    maps = ab.plain_feature_maps(network, ab.plain_preprocess(data.train[:1], TILE, CROP))
    mine = ab.plain_patch_features(maps, 1024)
    theirs = features.patch_features(maps, 3, 1024, aggregation="paper")
    assert mine.shape == theirs.shape == (1, CROP // 8, CROP // 8, 1024)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    # and differ from the authors' unfold + pool, which keeps the raw 3x3 stencil here
    authors = features.patch_features(maps, 3, 1024, aggregation="authors")
    assert float((authors - theirs).abs().max()) > 1e-2


def test_whole_bank_plain_and_project_paper_crop_give_the_same_maps_and_max_scores(
    network: torch.nn.Module, data: ab.CategoryData
) -> None:
    # ratio 1 keeps every patch in both banks, so no coreset sampling separates the two
    spec = ab.project_spec("paper", "crop", TILE, CROP, 64)
    tests = {"centre": data.tests["centre"]}
    project = ab.run_project(spec, data.train, tests, ratio=1.0, seed=0)["centre"]
    plain = ab.run_plain(network, data.train, tests, TILE, CROP, 64, ratio=1.0, seed=0)["centre"]
    scale = float(plain.maps.max())
    np.testing.assert_allclose(project.maps, plain.maps, atol=2e-3 * scale, rtol=0)
    # project score = Eq. 7 weight x max patch distance; plain score = max patch distance
    np.testing.assert_allclose(project.scores / project.eq7_weights, plain.scores, rtol=2e-3)


@pytest.mark.parametrize("frame", ["crop", "full"])
def test_crop_frame_maps_are_zero_outside_the_crop_and_full_frame_maps_cover_it(
    frame: str, network: torch.nn.Module, data: ab.CategoryData
) -> None:
    spec = ab.project_spec("paper", frame, TILE, CROP, 64)
    outcome = ab.run_project(spec, data.train, {"border": data.tests["border"]}, 0.5, 0)["border"]
    plain = ab.run_plain(network, data.train, {"border": data.tests["border"]}, TILE, CROP, 64,
                         0.5, 0)["border"]
    left, top, right, bottom = (int(v) for v in preprocess.crop_box(TILE, TILE, TILE, CROP))
    outside = np.ones((TILE, TILE), dtype=bool)
    outside[top:bottom, left:right] = False
    assert outcome.maps.shape == plain.maps.shape == (7, TILE, TILE)
    if frame == "crop":
        assert (outcome.maps[:, outside] == 0).all()
        assert (outcome.maps[:, ~outside] > 0).all()
    else:
        assert (outcome.maps > 0).all()
    assert (plain.maps[:, outside] == 0).all() and (plain.maps[:, ~outside] > 0).all()


@pytest.mark.parametrize("category", ["grain", "uniform"])
def test_surface_categories_use_demo_tiles_and_stay_grey_in_both_placements(category: str) -> None:
    from jobs import demo_data

    data = ab.category_data(category, TILE, num_train=2, num_good=2, num_defect=1, seed=0)
    expected = demo_data.demo_sample(category, "train", "good", 1, size=TILE, seed=0).image
    np.testing.assert_array_equal(data.train[1], expected)
    band = ab.border_band(TILE)
    for placement, test in data.tests.items():
        for image in test.images:
            assert (image == image[..., :1]).all(), placement  # a grey camera's image
        assert all(m.any() for m in test.masks[2:])
        if placement == "border":
            assert not any((mask & ~band).any() for mask in test.masks[2:])


def test_fade_defect_scales_the_change_from_the_clean_tile(rng: np.random.Generator) -> None:
    clean = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    faded = ab.fade_defect(image, clean, 0.3).astype(float)
    expected = clean + 0.3 * (image.astype(float) - clean)
    assert np.abs(faded - expected).max() <= 0.5  # rounding only
    np.testing.assert_array_equal(ab.fade_defect(image, clean, 1.0), image)


def test_defect_opacity_changes_only_masked_pixels_and_one_keeps_the_bytes(
    data: ab.CategoryData,
) -> None:
    faded = ab.category_data("gravel", TILE, 3, 2, 1, seed=0, opacity=0.3)
    same = ab.category_data("gravel", TILE, 3, 2, 1, seed=0, opacity=1.0)
    for placement, test in data.tests.items():
        pairs = zip(test.images, test.masks, faded.tests[placement].images,
                    faded.tests[placement].masks, same.tests[placement].images, strict=True)
        for full, mask, weak, weak_mask, kept in pairs:
            np.testing.assert_array_equal(kept, full)
            np.testing.assert_array_equal(weak_mask, mask)
            np.testing.assert_array_equal(weak[~mask], full[~mask])
            if mask.any():
                assert (weak[mask] != full[mask]).any()


def test_metric_table_adds_photo_means_only_when_grey_surfaces_are_present() -> None:
    def row(category: str, value: float) -> dict:
        return {"placement": "centre", "category": category, "method": "paper/crop",
                "image_auroc": value, "pixel_auroc": value, "pro": value, "outside_crop": 0.0,
                "seconds": 1.0}

    mixed = ab.metric_table([row("brick", 0.9), row("hubble", 0.7), row("grain", 0.2)])
    assert "| centre | **mean** | paper/crop | 0.600 | 0.600 | 0.600 |" in mixed
    assert "| centre | **mean, 2 photos** | paper/crop | 0.800 | 0.800 | 0.800 |" in mixed
    assert "photos" not in ab.metric_table([row("brick", 0.9), row("hubble", 0.7)])


def test_plain_pro_matches_the_project_binned_pro(rng: np.random.Generator) -> None:
    masks = np.zeros((4, 40, 40), dtype=bool)
    masks[1, 5:15, 5:12] = True
    masks[2, 20:30, 25:38] = True
    masks[2, 2:4, 2:4] = True  # a second, small region in the same image
    maps = rng.random((4, 40, 40)).astype(np.float32) + 0.8 * masks
    curves = metrics.new_pixel_curves(0.0, float(maps.max()), 100_000)
    for amap, mask in zip(maps, masks):
        metrics.update_pixel_curves(curves, torch.from_numpy(amap), torch.from_numpy(mask))
    assert ab.plain_pro(maps, masks) == pytest.approx(metrics.pro_auc(curves), abs=1e-3)
    assert ab.plain_pro(maps, masks) < 1.0
    assert ab.plain_pro(np.where(masks, 2.0, 0.5).astype(np.float32), masks) == pytest.approx(1.0)
