"""The benchmark scripts run end to end at toy sizes, and the README plots read what they print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import plot_results

ROOT = Path(__file__).resolve().parents[1]


def test_coreset_bench_selects_the_plain_loop_indices_and_its_table_plots(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "coreset_bench.py"), "--n", "20000", "--ratio", "0.005",
         "--plain-full-steps", "20", "--plain-prefix", "30"],
        check=True, capture_output=True, text=True, timeout=300,
    )
    table = tmp_path / "coreset.md"
    table.write_text(done.stdout)
    rows = plot_results.read_coreset_tables([str(table)])
    assert len(rows) == 1
    row = rows[0]
    assert (row["n"], row["ratio"], row["steps"], row["extrapolated"]) == (20000, 0.005, 100, True)
    assert row["plain_s"] > 0 and row["fast_s"] > 0  # timed, and printed with enough digits
    line = next(line for line in done.stdout.splitlines() if line.startswith("| 20,000"))
    assert line.rstrip().endswith("| yes (first 30) |")  # the same indices as the plain loop
    plot_results.plot_coreset(rows, str(tmp_path / "coreset.png"))
    assert (tmp_path / "coreset.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coreset_bench_on_real_photo_features_selects_the_plain_loop_indices(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    command = [sys.executable, str(ROOT / "benchmarks" / "coreset_bench.py"), "--features", "real",
               "--n", "2000", "--ratio", "0.01", "--plain-full-steps", "50", "--threads", "1",
               "--cache-dir", str(cache)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    line = next(line for line in done.stdout.splitlines() if line.startswith("| 2,000"))
    assert line.rstrip().endswith("| yes |")  # all 20 steps run by both, same indices
    assert "real patch features" in done.stdout
    (path,) = cache.glob("coreset_real_*_2000_128_0.npy")
    cached = np.load(path, allow_pickle=False)
    assert cached.shape == (2000, 128) and cached.dtype == np.float32
    assert len(np.unique(cached, axis=0)) == 2000  # distinct views: no duplicated patches
    written = path.stat().st_mtime_ns
    again = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    assert path.stat().st_mtime_ns == written  # the rerun read the cache, did not extract again
    assert any(row.startswith("| 2,000") and row.rstrip().endswith("| yes |")
               for row in again.stdout.splitlines())


def test_plot_reader_names_the_file_without_a_table(tmp_path: Path) -> None:
    empty = tmp_path / "empty.md"
    empty.write_text("# no table here\n")
    with pytest.raises(ValueError, match="no coreset_bench table rows"):
        plot_results.read_coreset_tables([str(empty)])


def test_options_bench_reports_every_option_with_metrics_in_range() -> None:
    from benchmarks import options_bench

    rows = options_bench.main(["--categories", "brick", "--tile", "72", "--crop", "64", "--train", "4",
                               "--test-good", "2", "--test-defect", "1", "--embed-dim", "64"])
    assert {(r["aggregation"], r["frame"]) for r in rows} == {*options_bench.OPTIONS, ("plain", "crop")}
    for r in rows:
        assert all(0.0 <= r[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "pro")), r
        assert 0 <= r["eq7_not_1"] <= r["images"] == 7 and 0.0 < r["eq7_min"] <= 1.0


def test_knn_bench_prints_one_row_per_engine_with_recall_for_approximate_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import knn_bench

    knn_bench.main(["--sizes", "800", "--dims", "16", "--threads", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 800 ")]
    assert [r[2].strip() for r in rows] == list(knn_bench.ENGINES)
    for row in rows:
        recall = row[9].strip()
        if "ivf" in row[2]:
            assert 0.0 <= float(recall) <= 1.0 and float(row[10]) >= 1.0
        else:
            assert recall == "-"


def test_cost_model_projects_step_time_as_compute_over_ranks_plus_collective(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import cost_model

    # 1e6 patches at 1 %: 10,000 steps; one rank updates 1e9 rows/s -> 1 ms of compute per step
    cost_model.main(["--patches", "1e6", "--ratio", "0.01", "--nodes", "1,2,4", "--archives", "1000",
                     "--step-rows-per-s", "1e9", "--collective-ms", "1=0,2=0.3,4=0.6",
                     "--extract-img-s", "10", "--score-img-s", "5"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.strip() and line.split()[0].isdigit()}
    # columns: nodes, extract (value, unit), step ms, compute ms, collective ms, coreset, fit, score
    step_ms = [float(rows[k][3]) for k in ("1", "2", "4")]
    assert step_ms == pytest.approx([1.0, 0.8, 0.85])  # 1 / K + collective(K)
    assert [float(rows[k][4]) for k in ("1", "2", "4")] == pytest.approx([1.0, 0.5, 0.25])
    # 1,000 images at 5 img/s per node on 2 nodes: 100 s; 1e6 / 784 images at 10 img/s on 4 nodes
    assert rows["2"][-2:] == ["1.7", "min"]
    assert rows["4"][1:3] == [f"{1e6 / 784 / 40 / 60:.1f}", "min"]
    assert "at 4 ranks" in out  # 0.25 ms of compute < 0.6 ms of collective


def test_cost_model_measures_a_real_gloo_all_gather() -> None:
    from benchmarks import cost_model

    assert 0.0 < cost_model.measure_collective_ms(2, steps=20) < 1000.0


def test_gpu_check_smoke_runs_every_section_on_cpu_and_passes() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--coreset-n", "20000",
         "--coreset-steps", "50", "--plain-steps", "20"],
        capture_output=True, text=True, timeout=300, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    # faiss, two score checks, two engines x two banks of the scoring section, two coreset checks
    assert sum(line.startswith("PASS ") for line in lines) == 9
    assert sum("bank 2,000 " in line and "img/s" in line for line in lines) == 2
    assert lines[-1] == "summary: 9 passed, 0 failed"


def test_knn_accuracy_bench_rows_every_option_and_probing_every_list_changes_nothing(
    tmp_path: Path,
) -> None:
    from benchmarks import knn_accuracy_bench

    out = tmp_path / "knn_accuracy.md"
    text = knn_accuracy_bench.main([
        "--out", str(out), "--categories", "brick", "--tile", "72", "--crop", "64",
        "--num-train", "3", "--test-good", "2", "--test-defect", "1", "--bank-size", "150",
        "--nprobes", "1,999", "--wrn-bank-size", "200", "--wrn-images", "2", "--repeats", "1"])
    assert out.read_text() == text
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| brick |")]
    labels = [r[1] for r in rows]
    assert labels == ["exact", "ivf-flat (defaults)", "ivf-flat nprobe 1",
                      "ivf-flat nprobe 999 (capped to 3)", "ivf-pq (defaults, rerank 4)",
                      "ivf-pq rerank 1"]
    for row in rows:
        assert 0.0 <= float(row[7]) <= 1.0 and all(0.0 <= float(row[i]) <= 100.0 for i in (8, 10, 12))
    for row in (rows[0], rows[3]):  # exact, and IVF-Flat probing all 3 lists: the exact neighbours
        assert row[7] == "1.000" and [row[i] for i in (9, 11, 13)] == ["+0.000"] * 3
    speed = [line for line in text.splitlines() if line.startswith("| ivf-pq rerank 1 | nlist=")]
    assert len(speed) == 1 and "ceiling of predict" in text


def test_bank_memory_bench_prints_every_case_and_removes_its_bank(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bank_memory_bench.py"), "--rows", "2000",
         "--dim", "64", "--queries", "49", "--dir", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| case")}
    assert rows == {"old": "faiss-cpu-exact", "faiss": "faiss-cpu-exact",
                    "torch": "torch-cpu-exact", "2 x faiss, process 1": "faiss-cpu-exact",
                    "2 x faiss, process 2": "faiss-cpu-exact"}
    shared = next(line for line in done.stdout.splitlines() if line.startswith("2 x faiss, both"))
    ratio = float(shared.split(" = ")[1].split(" x ")[0])
    assert 0.9 < ratio < 1.1  # the two processes' maps of the bank add up to one bank
    assert list(tmp_path.iterdir()) == []  # the temporary bank is deleted
