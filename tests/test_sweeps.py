"""`patchcore benchmark lowshot` and `benchmark sweep` (jobs.sweeps): the tables hold one entry per
fitted cell, subsets are seeded, the low-shot bank follows its size rule, and the plots are PNGs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from jobs import benchmark, sweeps
from jobs.demo_data import make_demo_dataset
from patchcore_core import storage
from patchcore_core.spec import ModelSpec

TINY = ["--backbone", "efficientnet_lite0", "--weights", "default", "--resize", "72", "--crop", "64",
        "--embed-dim", "32", "--device", "cpu", "--workers", "1"]


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo data in MVTec AD layout: grass, 72 px tiles, 6 train and 7 test images."""
    root = tmp_path_factory.mktemp("mvtec")
    make_demo_dataset(str(root), categories=["grass"], num_train=6, num_test_good=2,
                      num_test_defect=1, size=72, seed=0)
    return root


def _table(markdown: str) -> list[list[str]]:
    """Rows of the first Markdown table (header included, separator dropped)."""
    block = markdown.split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
    return [r for r in rows if not r[0].startswith("---")]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    return Image.open(io.BytesIO(data)).size


# --------------------------------------------------------------------------- pure functions


def test_subsets_are_seeded_sorted_and_independent_across_repeats_and_shots() -> None:
    train = [f"t/{i:03d}.png" for i in range(20)]
    first = sweeps.draw_subset(train, 5, seed=0, repeat=0)
    assert first == sweeps.draw_subset(train, 5, seed=0, repeat=0)  # same seed, same subset
    assert len(set(first)) == 5 and first == sorted(first) and set(first) <= set(train)
    draws = {tuple(sweeps.draw_subset(train, 5, seed=0, repeat=r)) for r in range(5)}
    assert len(draws) > 1  # repeats draw other subsets
    assert sweeps.draw_subset(train, 5, seed=1, repeat=0) != first
    # not nested: the 2-shot draw of a repeat is its own draw, not the head of the 5-shot one
    heads = [sweeps.draw_subset(train, 2, 0, r) == sweeps.draw_subset(train, 5, 0, r)[:2] for r in range(5)]
    assert not all(heads)
    with pytest.raises(ValueError, match="--shots 21 exceeds the 20 train images"):
        sweeps.draw_subset(train, 21, seed=0, repeat=0)


@pytest.mark.parametrize(("flags", "patches", "expected"), [
    ({"ratio": 0.01}, 784, 8),  # the ratio alone (min bank 0): the paper's rule
    ({"ratio": 0.01, "min_bank": 100}, 784, 100),  # raised to the floor
    ({"ratio": 0.1, "min_bank": 100}, 5 * 784, 392),  # the ratio gives more than the floor
    ({"ratio": 0.01, "min_bank": 1000}, 784, 784),  # floor capped at every patch of the shots
    ({"size": 5000}, 784, 784),  # --size capped at every patch
])
def test_bank_size_is_ratio_or_size_raised_to_min_bank_and_capped(
    flags: dict[str, float], patches: int, expected: int
) -> None:
    config = sweeps.LowShotConfig(root="r", out="o", **flags)  # type: ignore[arg-type]
    assert sweeps.bank_size(config, patches) == expected


def test_patches_per_image_is_the_first_layers_grid() -> None:
    assert sweeps.patches_per_image(ModelSpec()) == 28 * 28  # WRN50 layer2, 224 px: paper §3
    assert sweeps.patches_per_image(ModelSpec(backbone="efficientnet_lite0", layers=("blocks.2", "blocks.4"),
                                              resize=72, crop=72)) == 9 * 9  # 72 / 8


def test_lowshot_summary_is_mean_and_std_over_repeats_of_the_category_mean() -> None:
    def row(value: float) -> dict[str, object]:
        return {"image_auroc": value, "pixel_auroc": value, "pro": None, "bank_entries": 6,
                "subset": ["x"]}

    cells = {
        1: [{"a": row(0.6), "b": row(0.8)}],  # one repeat
        2: [{"a": row(0.6), "b": row(0.8)}, {"a": row(0.8), "b": row(1.0)}],
    }
    one, two = sweeps.summarise_lowshot(cells, {"a": 10, "b": 20})
    assert one["repeats"] == 1 and one["image_auroc"]["std"] == 0.0
    assert one["image_auroc"]["mean"] == pytest.approx(0.7) and one["retained"] == pytest.approx(0.075)
    assert two["image_auroc"]["values"] == pytest.approx([0.7, 0.9])  # a category mean per repeat
    assert two["image_auroc"]["mean"] == pytest.approx(0.8)
    assert two["image_auroc"]["std"] == pytest.approx(0.1)
    assert two["categories"]["a"]["image_auroc"]["mean"] == pytest.approx(0.7)
    assert two["pro"]["mean"] is None and two["bank_entries"] == {"a": [6, 6], "b": [6, 6]}


def test_sweep_table_and_plot_hold_one_row_per_cell_and_mark_the_baseline() -> None:
    rows = [{"crop": s, "resize": s + 8, "patch_size": p, "baseline": (s, p) == (64, 3),
             "image_auroc": 0.5 + p / 100, "pixel_auroc": 0.9, "pro": None, "fit_s": 1.0,
             "score_s": None, "categories": {"grass": {}}}
            for s in (48, 64) for p in (1, 3)]
    result = {"root": "r", "device": "cpu", "rows": rows,
              "settings": {"backbone": "b", "layers": "l", "embed_dim": 8, "coreset": "ratio 0.1"}}
    table = _table(sweeps.sweep_markdown(result))
    assert table[0][:6] == ["S (crop px)", "resize px", "P", "image AUROC", "pixel AUROC", "PRO"]
    assert [r[:3] for r in table[1:]] == [["48", "56", "1"], ["48", "56", "3"], ["64", "72", "1"],
                                         ["64 (baseline)", "72", "3"]]
    assert table[4][3:] == ["53.0", "90.0", "-", "1.0", "-"]
    assert _png_size(sweeps.sweep_png(rows))[0] > 0


@pytest.mark.parametrize(("flags", "message"), [
    ({"shots": "1,0"}, "--shots must be >= 1"),
    ({"repeats": 0}, "--repeats must be >= 1"),
    ({"min_bank": -1}, "--min-bank must be >= 0"),
    ({"maps": True}, "--maps needs a calibrated pixel threshold"),
])
def test_lowshot_rejects_bad_flags(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sweeps.LowShotConfig(root="r", out="o", **flags)  # type: ignore[arg-type]


def test_sweep_rejects_an_even_neighbourhood_size() -> None:
    with pytest.raises(ValueError, match="patch_size must be a positive odd number, got 4"):
        sweeps.SweepConfig(root="r", out="o", patch_sizes="3,4")


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_lowshot_table_has_one_value_per_repeat_and_a_rerun_redraws_the_same_subsets(
    mvtec_root: Path, tmp_path: Path, ray_local: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lowshot"
    # --min-bank above one image's 64 patches: the 1-shot bank must hold every patch, which also
    # checks patches_per_image against the real feature grid
    argv = ["lowshot", "--root", str(mvtec_root), "--out", str(out), "--shots", "1", "--repeats", "2",
            "--min-bank", "1000", "--seed", "3", *TINY]
    benchmark.main(argv)
    assert "| shots | retained % | image AUROC" in capsys.readouterr().out
    result = json.loads((out / "metrics.json").read_text())
    [row] = result["rows"]
    assert row["shots"] == 1 and row["repeats"] == 2
    train = sorted(str(p) for p in (mvtec_root / "grass" / "train" / "good").glob("*.png"))
    spec = sweeps.LowShotConfig(root="r", out="o", resize=72, crop=64, backbone="efficientnet_lite0",
                                embed_dim=32).model_spec()
    assert row["bank_entries"] == {"grass": [sweeps.patches_per_image(spec)] * 2} == {"grass": [64, 64]}
    for r in range(2):
        subset = sweeps.draw_subset(train, 1, seed=3, repeat=r)
        cell = out / "shots-1" / f"repeat-{r}" / "grass"
        assert row["subsets"]["grass"][r] == subset
        assert (cell / "train.txt").read_text().split() == subset
        bank = storage.read_manifest(str(cell / "bank"), "bank")
        assert bank["info"]["fit"]["train_images"] == 1  # every shot in the bank, none held out
        metrics = json.loads((cell / "report" / "metrics.json").read_text())["categories"]["grass"]
        for key in benchmark.METRICS:  # one category: the value of a repeat is its metric
            assert row[key]["values"][r] == metrics[key]
    for key in benchmark.METRICS:
        values = row[key]["values"]
        assert row[key]["n"] == 2 and row[key]["mean"] == pytest.approx(sum(values) / 2)
        assert row[key]["std"] == pytest.approx(abs(values[0] - values[1]) / 2)
    table = _table((out / "report.md").read_text())
    assert table[0] == ["shots", "retained %", "image AUROC", "pixel AUROC", "PRO", "repeats",
                        "bank entries"]
    m = row["image_auroc"]
    assert table[1][:3] == ["1", f"{100 / 6:.1f}", f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}"]
    assert table[1][5:] == ["2", "64"]  # repeats per cell, bank entries
    assert _png_size((out / "lowshot.png").read_bytes()) == (1210, 374)

    # rerun: the same seeds draw the same subsets, and every fit is a no-op
    bank_manifest = out / "shots-1" / "repeat-0" / "grass" / "bank" / "manifest.json"
    written = bank_manifest.stat().st_mtime_ns
    benchmark.main(argv)
    again = json.loads((out / "metrics.json").read_text())["rows"][0]
    assert again["subsets"] == row["subsets"] and bank_manifest.stat().st_mtime_ns == written
    assert again["image_auroc"] == row["image_auroc"]


@pytest.mark.slow
def test_sweep_cell_runs_with_its_own_image_size_and_neighbourhood(
    mvtec_root: Path, tmp_path: Path, ray_local: None
) -> None:
    # one (S, P) cell keeps the test short; the grid's table and plot are tested without Ray above
    out = tmp_path / "sweep"
    benchmark.main(["sweep", "--root", str(mvtec_root), "--out", str(out), "--crops", "48",
                    "--patch-sizes", "1", "--no-maps", *TINY])
    result = json.loads((out / "metrics.json").read_text())
    [row] = result["rows"]
    # resize keeps --resize / --crop = 72 / 64; the baseline (--crop 64, P 3) is not in the grid
    assert (row["crop"], row["resize"], row["patch_size"], row["baseline"]) == (48, 54, 1, False)
    cell = out / "crop-48_p-1" / "grass"
    spec = storage.read_manifest(str(cell / "bank"), "bank")["spec"]
    assert (spec["crop"], spec["resize"], spec["patch_size"]) == (48, 54, 1)
    metrics = json.loads((cell / "report" / "metrics.json").read_text())["categories"]["grass"]
    assert all(row[k] == metrics[k] for k in benchmark.METRICS)  # the mean of one category
    assert row["fit_s"] > 0 and row["score_s"] > 0
    table = _table((out / "report.md").read_text())
    assert table[1] == ["48", "54", "1", *(f"{100 * metrics[k]:.1f}" for k in benchmark.METRICS),
                        f"{row['fit_s']:.1f}", f"{row['score_s']:.1f}"]
    assert _png_size((out / "sweep.png").read_bytes()) == (1210, 374)
