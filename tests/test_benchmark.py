"""`patchcore benchmark mvtec`: the table holds each category's evaluate metrics and their mean,
a rerun resumes (no job redone, times kept), the paper's reference columns are transcribed
consistently, and an approximate --knn records its metrics' change against exact search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from jobs import benchmark
from jobs.demo_data import make_demo_dataset
from patchcore_core import storage

TINY = ["--backbone", "efficientnet_lite0", "--weights", "default", "--resize", "72", "--crop", "64",
        "--embed-dim", "32", "--device", "cpu", "--workers", "1", "--no-maps"]


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo data in MVTec AD layout: brick and grass, 72 px tiles, 6 train and 7 test images each."""
    root = tmp_path_factory.mktemp("mvtec")
    make_demo_dataset(str(root), categories=["brick", "grass"], num_train=6, num_test_good=2,
                      num_test_defect=1, size=72, seed=0)
    return root


def _table(markdown: str) -> dict[str, list[str]]:
    """{row label: cells} of the Markdown table in benchmark.md; the header row under "category"."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {row[0].strip("*"): row[1:] for row in [[cell.strip() for cell in r] for r in rows]}


@pytest.mark.slow
def test_table_holds_evaluate_metrics_and_their_mean_and_a_rerun_resumes(
    mvtec_root: Path, tmp_path: Path, ray_local: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    argv = ["mvtec", "--root", str(mvtec_root), "--out", str(out), "--categories", "grass", *TINY]
    benchmark.main(argv)
    printed = capsys.readouterr().out
    result = json.loads((out / "benchmark.json").read_text())
    table = _table((out / "benchmark.md").read_text())
    assert table["category"] == ["image AUROC", "pixel AUROC", "PRO", "fit s", "score s", "images/s"]
    assert "| category | image AUROC" in printed  # the table is printed too
    assert list(result["categories"]) == ["grass"] and result["paper"] is None  # not an MVTec name

    metrics = json.loads((out / "grass" / "report" / "metrics.json").read_text())["categories"]["grass"]
    row = result["categories"]["grass"]
    for i, key in enumerate(("image_auroc", "pixel_auroc", "pro")):
        assert row[key] == metrics[key]
        assert result["mean"][key] == metrics[key]  # mean of one category
        assert table["grass"][i] == f"{100 * metrics[key]:.1f}" == table["mean"][i]
    counts = storage.read_manifest(str(out / "grass" / "results"), "results")["counts"]
    assert row["test_images"] == counts["scored"] == 7 and row["train_images"] == 6
    assert row["fit_s"] > 0 and row["score_s"] > 0
    assert row["images_per_s"] == pytest.approx(7 / row["score_s"])
    assert table["grass"][3:] == [f"{row['fit_s']:.1f}", f"{row['score_s']:.1f}",
                                  f"{row['images_per_s']:.1f}"]

    # rerun: every job is a no-op on its committed folder; the recorded times are kept
    bank_manifest = out / "grass" / "bank" / "manifest.json"
    written = bank_manifest.stat().st_mtime_ns
    benchmark.main(argv)
    again = json.loads((out / "benchmark.json").read_text())
    assert bank_manifest.stat().st_mtime_ns == written
    assert again["categories"] == result["categories"]


def test_mean_row_averages_categories_and_skips_missing_values() -> None:
    rows = {
        "a": {"image_auroc": 0.9, "pixel_auroc": 0.8, "pro": None, "fit_s": 10.0, "score_s": 2.0,
              "images_per_s": 3.5, "test_images": 7},
        "b": {"image_auroc": 0.7, "pixel_auroc": 0.6, "pro": 0.5, "fit_s": 20.0, "score_s": 4.0,
              "images_per_s": 2.25, "test_images": 9},
    }
    mean = benchmark.summarise(rows)
    assert mean["image_auroc"] == pytest.approx(0.8) and mean["pixel_auroc"] == pytest.approx(0.7)
    assert mean["pro"] == 0.5  # the category without PRO is left out, not counted as 0
    assert mean["fit_s"] == 15.0 and mean["score_s"] == 3.0
    assert mean["images_per_s"] == pytest.approx(16 / 6)  # all images over all score seconds
    result = {"suite": "mvtec", "root": "r", "device": "cpu", "categories": rows, "mean": mean,
              "settings": {"backbone": "b", "layers": "l", "resize": 1, "crop": 1, "embed_dim": 1,
                           "coreset": "ratio 0.1"},
              "paper": None}
    table = _table(benchmark.table_markdown(result))
    assert table["a"][:3] == ["90.0", "80.0", "-"] and table["mean"][:3] == ["80.0", "70.0", "50.0"]
    assert table["mean"][3:] == ["15.0", "3.0", "2.7"]

    # with the paper's numbers: each metric is followed by the paper's value for that category
    rows["screw"] = rows.pop("b")
    result["paper"] = benchmark.paper_reference(0.1, list(rows))
    table = _table(benchmark.table_markdown(result))
    assert table["category"][:6] == ["image AUROC", "paper", "pixel AUROC", "paper", "PRO", "paper"]
    assert table["screw"][:6] == ["70.0", "97.0", "60.0", "99.4", "50.0", "97.9"]
    assert table["a"][:6] == ["90.0", "-", "80.0", "-", "-", "-"]
    assert table["mean"][1::2][:3] == ["-", "-", "-"]  # the paper's mean covers all 15 categories


def test_paper_reference_columns_follow_the_papers_category_order() -> None:
    ref = benchmark.paper_reference(0.1, ["screw", "bottle", "brick"])
    assert ref is not None and ref["variant"] == "PatchCore-10%" and ref["mean"] is None
    # supplementary Tables S1-S3, row PatchCore-10, columns Screw and Bottle
    assert ref["categories"] == {"screw": {"image_auroc": 97.0, "pixel_auroc": 99.4, "pro": 97.9},
                                 "bottle": {"image_auroc": 100.0, "pixel_auroc": 98.6, "pro": 96.1}}
    full = benchmark.paper_reference(0.01, list(benchmark.PAPER_CATEGORIES))
    assert full is not None and full["mean"] == {"image_auroc": 99.0, "pixel_auroc": 98.0, "pro": 93.1}
    assert benchmark.paper_reference(0.05, ["screw"]) is None  # no such variant in the paper
    assert benchmark.paper_reference(0.1, ["brick"]) is None  # not an MVTec AD category


@pytest.mark.parametrize("metric", sorted(benchmark.PAPER_ROWS))
@pytest.mark.parametrize("ratio", [0.25, 0.1, 0.01])
def test_paper_average_column_is_the_mean_of_its_15_categories(metric: str, ratio: float) -> None:
    values = [float(v) for v in benchmark.PAPER_ROWS[metric][ratio].split()]
    assert len(values) == 1 + len(benchmark.PAPER_CATEGORIES)
    assert abs(np.mean(values[1:]) - values[0]) <= 0.1  # one-decimal rounding in the paper


def test_unknown_category_names_the_categories_found(mvtec_root: Path, tmp_path: Path) -> None:
    config = benchmark.BenchmarkConfig(root=str(mvtec_root), out=str(tmp_path), categories="grass,bottle",
                                       dry_run=True)
    with pytest.raises(ValueError, match=r"\['bottle'\] not found under .*; found: brick, grass"):
        benchmark.run(config)


def test_dry_run_lists_categories_and_writes_nothing(
    mvtec_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    benchmark.main(["mvtec", "--root", str(mvtec_root), "--out", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    assert "brick: 6 train, 7 test images" in printed and "grass: 6 train, 7 test images" in printed
    assert not out.exists()


@pytest.mark.parametrize("argv", [[], ["visa", "--root", "r", "--out", "o"]])
def test_first_argument_must_be_a_suite(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        benchmark.main(argv)
    assert exited.value.code == 2
    assert "the first argument is the suite (mvtec, lowshot, sweep)" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_of_an_ensemble_records_its_members(
    mvtec_root: Path, tmp_path: Path, ray_local: None
) -> None:
    out = tmp_path / "bench"
    members = ["--layers", "blocks.2,blocks.4;blocks.1,blocks.3"]
    argv = ["mvtec", "--root", str(mvtec_root), "--out", str(out), "--categories", "brick", *TINY,
            "--backbone", "efficientnet_lite0,efficientnet_lite0", *members]
    benchmark.main(argv)
    result = json.loads((out / "benchmark.json").read_text())
    assert result["settings"]["backbone"] == "efficientnet_lite0,efficientnet_lite0"
    assert result["settings"]["layers"] == "blocks.2,blocks.4;blocks.1,blocks.3"
    bank = storage.read_manifest(str(out / "brick" / "bank"), "bank")
    names = [m["name"] for m in bank["ensemble"]["members"]]
    assert names == ["0-efficientnet_lite0", "1-efficientnet_lite0"]
    assert result["categories"]["brick"]["bank_entries"] == bank["counts"]["num_entries"] == sum(
        m["counts"]["num_entries"] for m in bank["ensemble"]["members"])
    assert 0.0 <= result["categories"]["brick"]["image_auroc"] <= 1.0


# --------------------------------------------------------------------------- approximate --knn

KNN_BANK = ["--ratio", "0.5"]  # ~190 entries: room for 4 IVF lists of ~48 entries each


@pytest.fixture(scope="module")
def knn_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One benchmark folder for the --knn tests: the first run fits the bank and scores exactly,
    later runs with other --knn settings reuse both and add only their own folder."""
    return tmp_path_factory.mktemp("knn-bench")


def _knn_benchmark(mvtec_root: Path, out: Path, knn_flags: list[str]) -> dict:
    argv = ["mvtec", "--root", str(mvtec_root), "--out", str(out), "--categories", "brick", *TINY,
            *KNN_BANK, *knn_flags]
    benchmark.main(argv)
    return json.loads((out / "benchmark.json").read_text())


def _image_scores(results: Path) -> dict[str, float]:
    """{uri: image score} of a committed results folder's scores/part-*.parquet."""
    rows = [row for part in storage.list_files(str(results / "scores"), "part-*.parquet")
            for row in storage.read_rows(part, ["uri", "score"])]
    return {row["uri"]: row["score"] for row in rows}


@pytest.mark.slow
def test_ivf_flat_probing_every_list_changes_no_metric_and_has_recall_one(
    mvtec_root: Path, knn_out: Path, ray_local: None
) -> None:
    result = _knn_benchmark(mvtec_root, knn_out, ["--knn", "ivf-flat", "--knn-nlist", "4",
                                                  "--knn-nprobe", "4"])
    row = result["categories"]["brick"]
    approx = row["knn"]
    assert approx["engine"] == "faiss-cpu-ivf-flat"
    assert approx["params"]["nlist"] == 4 and approx["params"]["nprobe"] == 4
    assert approx["recall_at_1"] == 1.0 and approx["recall_queries"] > 0
    for key in benchmark.METRICS:
        assert approx[key] == row[key] and approx["change"][key] == 0.0
        assert result["mean"]["knn"]["change"][key] == 0.0
    folder = knn_out / "brick" / "knn-ivf-flat_nlist-4_nprobe-4"
    assert _image_scores(folder / "results") == _image_scores(knn_out / "brick" / "results")
    table = (knn_out / "benchmark.md").read_text()
    assert "## kNN: ivf-flat vs exact" in table
    assert "| brick | faiss-cpu-ivf-flat | nlist=4 nprobe=4 | 1.000 |" in table


@pytest.mark.slow
def test_recorded_knn_change_is_the_difference_of_independent_aurocs(
    mvtec_root: Path, knn_out: Path, ray_local: None
) -> None:
    result = _knn_benchmark(mvtec_root, knn_out, ["--knn", "ivf-flat", "--knn-nlist", "4",
                                                  "--knn-nprobe", "1"])
    row = result["categories"]["brick"]
    approx = row["knn"]
    assert approx["params"]["nprobe"] == 1 and 0.0 <= approx["recall_at_1"] <= 1.0
    exact_scores = _image_scores(knn_out / "brick" / "results")
    approx_scores = _image_scores(knn_out / "brick" / "knn-ivf-flat_nlist-4_nprobe-1" / "results")
    assert approx_scores.keys() == exact_scores.keys()
    assert approx_scores != exact_scores  # one list of four probed: some patch scores grow
    uris = sorted(exact_scores)
    labels = [0 if uri.split("/")[-2] == "good" else 1 for uri in uris]
    exact_auroc = roc_auc_score(labels, [exact_scores[u] for u in uris])
    approx_auroc = roc_auc_score(labels, [approx_scores[u] for u in uris])
    assert row["image_auroc"] == pytest.approx(exact_auroc, abs=1e-12)
    assert approx["image_auroc"] == pytest.approx(approx_auroc, abs=1e-12)
    assert approx["change"]["image_auroc"] == pytest.approx(approx_auroc - exact_auroc, abs=1e-12)
    for key in ("pixel_auroc", "pro"):
        assert approx["change"][key] == pytest.approx(approx[key] - row[key], abs=1e-15)
    assert result["mean"]["knn"]["change"] == approx["change"]  # the mean of one category


def test_knn_mean_pools_recall_and_keeps_the_largest_change() -> None:
    def knn_row(auroc: float, change: float, hits: int, queries: int, score_s: float) -> dict:
        return {"image_auroc": auroc, "pixel_auroc": None, "pro": 0.5, "recall_hits": hits,
                "recall_queries": queries, "recall_at_1": hits / queries, "score_s": score_s,
                "change": {"image_auroc": change, "pixel_auroc": None, "pro": 0.0},
                "engine": "faiss-cpu-ivf-flat", "params": {"nlist": 4, "nprobe": 1, "seed": 0},
                "images_per_s": 1.0}

    rows = {
        "a": {"image_auroc": 0.9, "pixel_auroc": 0.8, "pro": 0.5, "fit_s": 1.0, "score_s": 2.0,
              "test_images": 10, "knn": knn_row(0.88, -0.02, 90, 100, 2.0)},
        "b": {"image_auroc": 0.7, "pixel_auroc": 0.6, "pro": 0.5, "fit_s": 1.0, "score_s": 2.0,
              "test_images": 30, "knn": knn_row(0.71, 0.01, 280, 300, 3.0)},
    }
    mean = benchmark.summarise(rows)["knn"]
    assert mean["recall_at_1"] == pytest.approx(370 / 400)  # hits over queries, not mean of ratios
    assert mean["change"]["image_auroc"] == pytest.approx(-0.005)
    assert mean["max_abs_change"]["image_auroc"] == pytest.approx(0.02)  # the worst category
    assert mean["change"]["pixel_auroc"] is None and mean["max_abs_change"]["pixel_auroc"] is None
    assert mean["images_per_s"] == pytest.approx(40 / 5.0)
    assert "knn" not in benchmark.summarise({k: {**r, "knn": None} for k, r in rows.items()})
    result = {"categories": rows, "mean": {"knn": mean},
              "settings": {"knn": {"method": "ivf-flat", "requested": {"method": "ivf-flat",
                                                                     "nlist": 4, "nprobe": 1}}}}
    table = _table(benchmark.knn_table_markdown(result))
    assert table["a"][:5] == ["faiss-cpu-ivf-flat", "nlist=4 nprobe=1", "0.900", "88.0", "-2.000"]
    assert table["mean"][2:5] == ["0.925", "79.5", "-0.500"]
    assert table["max abs change"][4] == "2.000"
