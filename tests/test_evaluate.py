"""Dataset readers and `patchcore evaluate` against sklearn / brute-force recomputation.

Results folders are written by hand here in the layout jobs/score.py documents (scores parquet,
maps_raw/<rel>.npy, maps/<rel>.png, manifest), so the metrics are checked independently of scoring.
The last test runs the real demo pipeline (fit -> score -> evaluate) at tiny size.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet  # noqa: F401 - pa.parquet.read_table
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from jobs import datasets, evaluate
from patchcore_core import preprocess, storage
from patchcore_core.spec import ModelSpec

WIDTH, HEIGHT, RESIZE, CROP = 48, 40, 40, 32
# resize == HEIGHT keeps scale 1: the centre crop is exactly rows 4:36, columns 8:40 of the input
CROP_ROWS, CROP_COLS = slice(4, 36), slice(8, 40)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _masks() -> dict[str, np.ndarray]:
    """Hand-placed defects at input resolution (HEIGHT, WIDTH)."""
    crack0 = np.zeros((HEIGHT, WIDTH), bool)
    crack0[10:16, 12:21] = True
    crack0[25:30, 30:36] = True  # second region
    crack1 = np.zeros((HEIGHT, WIDTH), bool)
    crack1[18:24, 2:14] = True  # partly left of the crop (columns < 8)
    crack1[0:3, 0:6] = True  # entirely outside the crop: no region in crop space
    hole0 = np.zeros((HEIGHT, WIDTH), bool)
    hole0[20:23, 20:23] = True
    hole0[23:26, 23:26] = True  # touches diagonally: one 8-connected region
    return {"crack/000": crack0, "crack/001": crack1, "hole/000": hole0}


def _make_dataset(root: str) -> None:
    """MVTec-style category 'widget': 3 good, 3 defective test images, 1 training image."""
    rng = np.random.default_rng(0)
    names = ["good/000", "good/001", "good/002", *_masks()]
    for name in names + ["train"]:
        pixels = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
        path = "train/good/000.png" if name == "train" else f"test/{name}.png"
        storage.write_bytes(storage.join_uri(root, path), _png(pixels))
    for name, mask in _masks().items():
        defect, stem = name.split("/")
        storage.write_bytes(storage.join_uri(root, "ground_truth", defect, f"{stem}_mask.png"),
                            _png(mask.astype(np.uint8) * 255))


def _write_results(folder: str, root: str, rels: list[str], scores: list[float],
                   maps: list[np.ndarray], kind: str, image_threshold: float | None,
                   pixel_threshold: float, uri_prefix: str = "") -> None:
    """A results folder as `patchcore score --images <root>/test` lays it out (jobs/score.py)."""
    root = storage.join_uri(root, "test")
    spec = ModelSpec(backbone="efficientnet_lite0", weights="none", layers=("blocks.2",),
                     resize=RESIZE, crop=CROP, embed_dim=8)
    for rel, amap in zip(rels, maps):
        if kind == "raw":
            buffer = io.BytesIO()
            np.save(buffer, amap.astype(np.float16))
            storage.write_bytes(storage.join_uri(folder, "maps_raw", rel + ".npy"), buffer.getvalue())
        else:
            storage.write_bytes(storage.join_uri(folder, "maps", rel + ".png"), _png(amap))
    n = len(rels)
    anomalous = (pa.nulls(n, pa.bool_()) if image_threshold is None
                 else pa.array([s > image_threshold for s in scores]))
    table = pa.table({
        "uri": [uri_prefix + storage.join_uri(root, r) for r in rels],
        "rel": rels,
        "score": pa.array(scores, pa.float64()),
        "anomalous": anomalous,
        "max_y": pa.array([0] * n, pa.int32()),
        "max_x": pa.array([0] * n, pa.int32()),
        "width": pa.array([WIDTH] * n, pa.int32()),
        "height": pa.array([HEIGHT] * n, pa.int32()),
    })
    storage.write_table(storage.join_uri(folder, "scores", "part-00000.parquet"), table)
    manifest = {
        "spec": spec.to_json(), "image_threshold": image_threshold,
        "pixel_threshold": pixel_threshold, "input_root": root,
        "maps": {"png": kind == "png", "mask": False, "raw": kind == "raw"},
    }
    storage.write_manifest(folder, manifest, kind="results")


# --------------------------------------------------------------------------- independent references


def _f1_reference(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, int, int]:
    """Brute force over every distinct score, "score >= t" flags; ties go to the smaller t."""
    best = None
    for t in np.unique(scores):
        pred = scores >= t
        tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
        f1 = 2 * tp / (2 * tp + fp + fn)
        if best is None or f1 > best[1]:
            best = (float(t), float(f1), int(fp), int(fn))
    return best  # type: ignore[return-value]


def _pro_reference(maps: list[np.ndarray], masks: list[np.ndarray], max_fpr: float) -> float:
    """MVTec AU-PRO by definition: threshold at every distinct value, per-region overlap mean."""
    regions = []
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labels == r) for r in range(1, count + 1)]
    negatives = sum(int((~m).sum()) for m in masks)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fprs.append(sum(int(((a >= t) & ~m).sum()) for a, m in zip(maps, masks)) / negatives)
        pros.append(np.mean([((maps[i] >= t) & r).sum() / r.sum() for i, r in regions]))
    x, y = np.array(fprs), np.array(pros)
    keep = x <= max_fpr
    xs, ys = list(x[keep]), list(y[keep])
    j = int(keep.sum())
    if j < len(x):
        xs.append(max_fpr)
        ys.append(y[j - 1] + (y[j] - y[j - 1]) * (max_fpr - x[j - 1]) / (x[j] - x[j - 1]))
    return float(np.trapezoid(ys, xs) / max_fpr)


def _case(tmp_path: Path, kind: str, image_threshold: float | None = 1.2):
    """Dataset + one hand-made results folder; returns what the references need."""
    root = str(tmp_path / "widget")
    _make_dataset(root)
    rng = np.random.default_rng(1)
    rels = ["good/000.png", "good/001.png", "good/002.png", "crack/000.png", "crack/001.png", "hole/000.png"]
    masks_in = [np.zeros((HEIGHT, WIDTH), bool)] * 3 + list(_masks().values())
    labels = np.array([0, 0, 0, 1, 1, 1], bool)
    scores = [1.0, 1.5, 0.7, 2.0, 1.1, 3.0]  # one nominal above one defective
    pixel_threshold = 1.0
    maps, masks = [], []
    for mask in masks_in:
        if kind == "raw":  # crop space, values on a 0.25 grid (exact in float16, distinct bins)
            truth = mask[CROP_ROWS, CROP_COLS]
            amap = (rng.integers(0, 8, size=(CROP, CROP)) * 0.25 + truth * 1.0).astype(np.float32)
        else:  # 8-bit heatmap at input resolution
            truth = mask
            amap = (rng.integers(0, 160, size=(HEIGHT, WIDTH)) + truth * 80).astype(np.uint8)
        maps.append(amap)
        masks.append(truth)
    folder = str(tmp_path / "results")
    _write_results(folder, root, rels, scores, maps, kind, image_threshold, pixel_threshold)
    return root, folder, np.array(scores), labels, maps, masks, pixel_threshold


@pytest.mark.parametrize("kind", ["raw", "png"])
def test_metrics_equal_sklearn_and_brute_force(tmp_path: Path, kind: str) -> None:
    root, folder, scores, labels, maps, masks, pixel_threshold = _case(tmp_path, kind)
    out = str(tmp_path / "report")
    evaluate.main(["--results", folder, "--dataset", root, "--out", out, "--overlays", "1"])
    result = json.loads(Path(out, "metrics.json").read_text())
    m = result["categories"]["widget"]

    assert m["num_images"] == 6 and m["num_defective"] == 3
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    all_maps = np.concatenate([a.ravel() for a in maps]).astype(np.float64)
    all_masks = np.concatenate([t.ravel() for t in masks])
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(all_masks, all_maps), abs=1e-9)
    assert m["pro"] == pytest.approx(_pro_reference(maps, masks, 0.3), abs=1e-9)
    expected_regions = 4 if kind == "raw" else 5  # the corner defect lies outside the crop
    assert m["num_regions"] == expected_regions

    threshold, f1, fp, fn = _f1_reference(scores, labels)
    assert m["f1_optimal"] == pytest.approx(
        {"threshold": threshold, "f1": f1, "false_positives": fp, "false_negatives": fn})
    flagged = scores > 1.2  # the calibrated image threshold
    assert m["calibrated"]["threshold"] == 1.2
    assert m["calibrated"]["false_positives"] == int((flagged & ~labels).sum()) == 1
    assert m["calibrated"]["false_negatives"] == int((~flagged & labels).sum()) == 1

    # pixels above the calibrated pixel threshold (PNG: value v means v / 255 * 2 * threshold)
    values = all_maps if kind == "raw" else all_maps / 255 * 2 * pixel_threshold
    pixel_flag = values > pixel_threshold
    assert m["pixel"]["calibrated"]["false_positives"] == int((pixel_flag & ~all_masks).sum())
    assert m["pixel"]["calibrated"]["false_negatives"] == int((~pixel_flag & all_masks).sum())
    best_pixel_f1 = max(
        2 * (v & all_masks).sum() / ((v & all_masks).sum() * 2 + (v & ~all_masks).sum() + (~v & all_masks).sum())
        for v in (all_maps >= t for t in np.unique(all_maps))
    )
    assert m["pixel"]["f1_optimal"]["f1"] == pytest.approx(best_pixel_f1, abs=1e-12)
    assert result["mean"]["pro"] == m["pro"]

    manifest = storage.read_manifest(out, "report")
    for name in manifest["files"]:
        assert Path(out, name).is_file(), name
    assert {"overlays/widget/nominal_1.png", "overlays/widget/defective_1.png"} <= set(manifest["files"])
    assert Image.open(Path(out, "roc.png")).size[0] >= 800
    text = Path(out, "report.md").read_text()
    assert "| widget | 6 (3) |" in text and f"{m['pro']:.3f}" in text


def test_split_results_and_file_uris_give_the_same_metrics(tmp_path: Path) -> None:
    root, folder, scores, labels, maps, masks, threshold = _case(tmp_path, "raw")
    rels = ["good/000.png", "good/001.png", "good/002.png", "crack/000.png", "crack/001.png", "hole/000.png"]
    # the same results in two folders, the second naming its inputs as file:// URIs
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write_results(a, root, rels[:4], list(scores[:4]), maps[:4], "raw", 1.2, threshold)
    _write_results(b, root, rels[4:], list(scores[4:]), maps[4:], "raw", 1.2, threshold, "file://")
    evaluate.main(["--results", folder, "--dataset", root, "--out", str(tmp_path / "one"), "--overlays", "0"])
    evaluate.main(["--results", f"{a},{b}", "--dataset", root, "--out", str(tmp_path / "two"),
                   "--overlays", "0"])
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["categories"] == two["categories"]


def test_rerun_is_a_no_op_and_uncalibrated_banks_report_no_counts(tmp_path: Path) -> None:
    root, folder, *_ = _case(tmp_path, "raw", image_threshold=None)
    out = tmp_path / "report"
    evaluate.main(["--results", folder, "--dataset", root, "--out", str(out), "--overlays", "0"])
    m = json.loads((out / "metrics.json").read_text())["categories"]["widget"]
    assert m["calibrated"] == {"threshold": None, "false_positives": None, "false_negatives": None, "f1": None}
    (out / "metrics.json").write_text("sentinel")
    evaluate.main(["--results", folder, "--dataset", root, "--out", str(out)])
    assert (out / "metrics.json").read_text() == "sentinel"


def test_partly_scored_category_is_an_error(tmp_path: Path) -> None:
    root, _, scores, _, maps, _, threshold = _case(tmp_path, "raw")
    partial = str(tmp_path / "partial")
    _write_results(partial, root, ["good/000.png", "crack/000.png"], [1.0, 2.0], [maps[0], maps[3]],
                   "raw", 1.2, threshold)
    with pytest.raises(ValueError, match="4 of 6 test images have no score"):
        evaluate.run(evaluate.EvaluateConfig(results=partial, dataset=root, out=str(tmp_path / "r")))
    elsewhere = str(tmp_path / "elsewhere")
    _write_results(elsewhere, str(tmp_path / "other"), ["x/000.png"], [1.0], [maps[0]], "raw", 1.2, threshold)
    with pytest.raises(ValueError, match="no test image of the dataset"):
        evaluate.run(evaluate.EvaluateConfig(results=elsewhere, dataset=root, out=str(tmp_path / "r")))


def test_mask_to_crop_follows_the_image_crop_geometry() -> None:
    mask = np.zeros((80, 96), bool)  # twice the test size: scale 2 between input and crop
    mask[20:40, 30:50] = True
    cropped = preprocess.mask_to_crop(mask, RESIZE, CROP)
    # crop box in input pixels: (16, 8, 80, 72); block (y, x) of 2x2 input pixels -> crop pixel
    reference = mask[8:72, 16:80].reshape(32, 2, 32, 2).mean(axis=(1, 3)) >= 0.5
    np.testing.assert_array_equal(cropped, reference)


# --------------------------------------------------------------------------- dataset readers


def test_mvtec_reader_finds_categories_labels_and_masks(tmp_path: Path) -> None:
    _make_dataset(str(tmp_path / "root" / "widget"))
    for uri in (str(tmp_path / "root"), str(tmp_path / "root" / "widget") + "/"):
        category = datasets.load_dataset(uri)["widget"]
        assert category.train == (str(tmp_path / "root/widget/train/good/000.png"),)
        by_name = {Path(i.uri).parent.name + "/" + Path(i.uri).name: i for i in category.test}
        assert sorted(by_name) == sorted(["good/000.png", "good/001.png", "good/002.png",
                                          "crack/000.png", "crack/001.png", "hole/000.png"])
        assert by_name["good/000.png"] == datasets.TestItem(
            str(tmp_path / "root/widget/test/good/000.png"), 0, "good", None)
        assert by_name["hole/000.png"].mask_uri == str(tmp_path / "root/widget/ground_truth/hole/000_mask.png")
        assert by_name["crack/001.png"].label == 1 and by_name["crack/001.png"].defect == "crack"


@pytest.mark.parametrize(
    "remove, message",
    [
        ("ground_truth/crack/001_mask.png", "1 defect images have no mask"),
        ("test/good", "no nominal test images"),
        ("train", "no images in train/good"),
        ("test", "no test/ folder"),
    ],
)
def test_partial_mvtec_layout_raises_with_expected_and_found(tmp_path: Path, remove: str, message: str) -> None:
    import shutil

    root = tmp_path / "widget"
    _make_dataset(str(root))
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ValueError, match=message) as err:
        datasets.load_dataset(str(root))
    assert "expected" in str(err.value).lower() and "found" in str(err.value)


def test_root_with_a_category_lacking_test_raises(tmp_path: Path) -> None:
    _make_dataset(str(tmp_path / "a"))
    _make_dataset(str(tmp_path / "b"))
    import shutil

    shutil.rmtree(tmp_path / "b" / "test")
    with pytest.raises(ValueError, match=r"categories \['b'\] have train/"):
        datasets.load_dataset(str(tmp_path))


def test_visa_split_csv_resolves_paths_against_the_dataset_root(tmp_path: Path) -> None:
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
            ("candle", "test", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
            ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG",
             "candle/Data/Masks/Anomaly/000.png")]
    (tmp_path / "split_csv").mkdir()
    text = "object,split,label,image,mask\n" + "\n".join(",".join(r) for r in rows) + "\n"
    (tmp_path / "split_csv" / "1cls.csv").write_text(text)
    for uri in (str(tmp_path), str(tmp_path / "split_csv" / "1cls.csv")):
        candle = datasets.load_dataset(uri)["candle"]
        assert candle.train == (str(tmp_path / "candle/Data/Images/Normal/0000.JPG"),)
        assert [i.label for i in candle.test] == [1, 0]
        assert candle.test[0].mask_uri == str(tmp_path / "candle/Data/Masks/Anomaly/000.png")
    (tmp_path / "bad.csv").write_text("object,split,image\ncandle,train,x.png\n")
    with pytest.raises(ValueError, match="columns"):
        datasets.load_dataset(str(tmp_path / "bad.csv"))
    (tmp_path / "nomask.csv").write_text("object,split,label,image,mask\n" + ",".join(rows[0]) + "\n"
                                         + "candle,test,anomaly,a.png,\n")
    with pytest.raises(ValueError, match="without a mask"):
        datasets.load_dataset(str(tmp_path / "nomask.csv"))


def test_evaluate_reads_dataset_and_results_from_s3(tmp_path: Path, s3_server: str) -> None:
    base = f"s3://{s3_server}/evaluate"
    root, folder = f"{base}/widget", f"{base}/results"
    _make_dataset(root)
    _, _, scores, labels, maps, _, threshold = _case(tmp_path, "raw")
    rels = ["good/000.png", "good/001.png", "good/002.png", "crack/000.png", "crack/001.png", "hole/000.png"]
    _write_results(folder, root, rels, list(scores), maps, "raw", 1.2, threshold)
    evaluate.main(["--results", folder, "--dataset", root, "--out", f"{base}/report", "--overlays", "0"])
    remote = json.loads(storage.read_bytes(f"{base}/report/metrics.json"))
    evaluate.main(["--results", str(tmp_path / "results"), "--dataset", str(tmp_path / "widget"),
                   "--out", str(tmp_path / "report"), "--overlays", "0"])
    local = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert remote["categories"] == local["categories"]
    assert storage.read_manifest(f"{base}/report", "report")["counts"]["images"] == 6


# --------------------------------------------------------------------------- the demo pipeline


@pytest.mark.slow
def test_tiny_demo_report_matches_metrics_recomputed_from_scores_and_maps(
    tmp_path: Path, ray_local: None
) -> None:
    from jobs import demo

    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--size", "tiny", "--categories", "grass", "--device", "cpu"])
    result = json.loads((out / "report" / "metrics.json").read_text())
    m = result["categories"]["grass"]

    table = pa.concat_tables(
        [pa.parquet.read_table(p) for p in sorted((out / "results/grass/scores").glob("part-*.parquet"))]
    ).to_pylist()
    preset = demo.PRESETS["tiny"]
    assert preset.tile == preset.resize  # scale 1: the crop is a plain slice of the input
    lo = (preset.tile - preset.crop) // 2
    cut = slice(lo, lo + preset.crop)
    scores, labels, anomalous, maps, masks = [], [], [], [], []
    for row in table:
        rel = row["rel"]  # "<defect>/<name>.png" below data/grass/test
        defect, name = rel.split("/")
        scores.append(row["score"])
        labels.append(defect != "good")
        anomalous.append(row["anomalous"])
        maps.append(np.load(out / "results/grass/maps_raw" / f"{rel}.npy").astype(np.float64))
        mask_file = out / "data/grass/ground_truth" / defect / name.replace(".png", "_mask.png")
        full = np.asarray(Image.open(mask_file)) > 0 if defect != "good" else np.zeros((preset.tile,) * 2, bool)
        masks.append(full[cut, cut])
    scores_a, labels_a = np.array(scores), np.array(labels)
    assert len(table) == m["num_images"] == preset.num_test_good + 5 * preset.num_test_defect

    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels_a, scores_a), abs=1e-12)
    all_maps = np.concatenate([a.ravel() for a in maps])
    all_masks = np.concatenate([t.ravel() for t in masks])
    # raw maps go through 2000 histogram bins: equal up to that quantisation
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(all_masks, all_maps), abs=2e-3)
    assert m["pro"] == pytest.approx(_pro_reference(maps, masks, 0.3), abs=5e-3)
    threshold, f1, fp, fn = _f1_reference(scores_a, labels_a)
    assert m["f1_optimal"]["threshold"] == pytest.approx(threshold)
    assert m["f1_optimal"]["f1"] == pytest.approx(f1)
    flagged = np.array(anomalous, bool)
    assert m["calibrated"]["false_positives"] == int((flagged & ~labels_a).sum())
    assert m["calibrated"]["false_negatives"] == int((~flagged & labels_a).sum())
    assert result["mean"]["image_auroc"] == m["image_auroc"]
    assert storage.read_manifest(str(out / "report"), "report")["counts"]["images"] == len(table)


def test_copied_results_match_only_their_own_category() -> None:
    # Results of brick scored from a copy elsewhere: grass's same-named files must not match them.
    from jobs.datasets import Category, TestItem, match_test_items

    def category(name: str) -> Category:
        items = tuple(TestItem(f"/data/{name}/test/good/{i:03d}.png", 0, "good", None) for i in range(2))
        return Category(name, (), items)

    categories = {"brick": category("brick"), "grass": category("grass")}
    scored = [f"s3://copy/brick/test/good/{i:03d}.png" for i in range(2)]
    matched, skipped = match_test_items(categories, scored, {})
    assert skipped == ["grass"]
    assert [index for _, index in matched["brick"]] == [0, 1]
