"""`patchcore score --incremental` on the local S3 server: nights of a growing archive leave each
(input version, bank) scored exactly once, readable as one Hive-partitioned table by duckdb,
pyarrow.dataset, pandas and polars; a run cut short resumes; another bank is refused unless
--new-bank; each run writes a self-contained morning report."""

from __future__ import annotations

import collections
import io
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import striped_png
from PIL import Image

from jobs import config as _cli
from jobs import incremental, nightly_report, score
from patchcore_core import model, preprocess, storage
from patchcore_core.spec import ModelSpec

SPEC = ModelSpec(backbone="efficientnet_lite0", weights="none", layers=("blocks.2", "blocks.4"),
                 resize=40, crop=32, embed_dim=16, sigma=2.0)
PIPELINE = ["--workers", "1", "--cpus-per-worker", "0.5", "--batch-size", "4", "--shard-size", "4",
            "--device", "cpu"]
NIGHTS = ("2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04")


def _texture(rng: np.random.Generator, defect: bool = False) -> bytes:
    """Seeded striped 48 x 40 PNG; `defect` paints a bright square (a high score)."""
    return striped_png(rng, 48, 40, (slice(10, 22), slice(14, 30)) if defect else None)


def _fit_bank(uri: str, ratio: float, bank_id: str) -> str:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = torch.stack([preprocess.to_tensor(Image.open(io.BytesIO(_texture(rng))), SPEC.resize,
                                               SPEC.crop) for _ in range(10)])
    fitted = model.fit(images[:6], SPEC, ratio=ratio, calibration_images=images[6:],
                       image_ids=[f"train/{i}.png" for i in range(6)])
    fitted.bank.info["bank_id"] = bank_id
    model.save(fitted, uri)
    return uri


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two calibrated banks fitted in one process (no Ray): ratio 0.25 and 0.5."""
    root = tmp_path_factory.mktemp("banks")
    return (_fit_bank(str(root / "bank-a"), 0.25, "line-a-v1"),
            _fit_bank(str(root / "bank-b"), 0.5, "line-a-v2"))


def run_night(bank: str, images: str, out: str, run_id: str, *extra: str) -> int:
    argv = ["--bank", bank, "--images", images, "--out", out, "--incremental", "--run-id", run_id,
            "--max-failures", "10", "--report-top", "3", *PIPELINE, *extra]
    return score.run(_cli.parse_config(score.ScoreConfig, argv))


def s3fs_filesystem() -> Any:
    fs, _ = storage.url_to_fs("s3://x")
    return fs


def read_all(out: str) -> list[dict[str, Any]]:
    """Every night's scores through duckdb on the fsspec S3 filesystem (hive partitioning)."""
    import duckdb

    con = duckdb.connect()
    con.register_filesystem(s3fs_filesystem())
    s3fs_filesystem().invalidate_cache()
    # run ids that are dates come back as DATE: as text here, to compare with the ids
    return con.sql(f"select * replace (run::varchar as run) from read_parquet("
                   f"'{out}/scores/**/*.parquet', hive_partitioning=true)").fetchdf().to_dict("records")


class Interrupted(Exception):
    """Stands in for the driver dying after its first shard commit."""


def test_three_nights_score_each_input_version_once_and_read_as_one_table(
    ray_local: None, s3_server: str, banks: tuple[str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads

    bank, other_bank = banks
    base = f"s3://{s3_server}/nightly"
    images, out = f"{base}/images", f"{base}/results"
    rng = np.random.default_rng(1)
    expected: dict[str, set[str]] = {}  # run id -> uris it scores or records as errors

    def put(name: str, data: bytes) -> str:
        storage.write_bytes(f"{images}/{name}", data)
        return f"{images}/{name}"

    # night 1: 20 images, two with a defect
    expected[NIGHTS[0]] = {put(f"a/{i:03d}.png", _texture(rng, defect=i in (4, 9))) for i in range(20)}
    assert run_night(bank, images, out, NIGHTS[0]) == 0
    # night 2: 5 new, 2 changed (rewritten), 2 corrupt
    expected[NIGHTS[1]] = ({put(f"b/{i:03d}.png", _texture(rng, defect=i == 2)) for i in range(5)}
                           | {put(f"a/{i:03d}.png", _texture(rng)) for i in (3, 7)}
                           | {put("b/corrupt.png", b"\x89PNG\r\n\x1a\n" + rng.bytes(64)),
                              put("b/empty.png", b"")})
    assert run_night(bank, images, out, NIGHTS[1]) == 0  # 2 errors <= --max-failures 10
    # night 3: 6 new; the driver dies after its first shard commit, then the same command resumes
    expected[NIGHTS[2]] = {put(f"c/{i:03d}.png", _texture(rng)) for i in range(6)}
    real = incremental.write_shard

    def dies_after_first(*args: Any, **kwargs: Any) -> dict[str, Any]:
        real(*args, **kwargs)  # the shard is committed, then the driver "dies"
        raise Interrupted
    monkeypatch.setattr(incremental, "write_shard", dies_after_first)
    with pytest.raises(Interrupted):
        run_night(bank, images, out, NIGHTS[2])
    monkeypatch.setattr(incremental, "write_shard", real)
    parts = storage.list_files(f"{out}/scores/run={NIGHTS[2]}", "part-*.parquet")
    assert len(parts) == 1  # of 2 shards (6 inputs, --shard-size 4): the one committed first
    before = storage.read_bytes(parts[0])
    assert not storage.is_committed(f"{out}/runs/run={NIGHTS[2]}")
    # a new run id while night 3 is unfinished is refused: night 3 must be finished first
    with pytest.raises(ValueError, match="unfinished"):
        run_night(bank, images, out, "other")
    assert run_night(bank, images, out, NIGHTS[2]) == 0
    assert storage.read_bytes(parts[0]) == before  # the committed shard was not redone
    # night 4: nothing new; a rerun of a committed night is a no-op
    expected[NIGHTS[3]] = set()
    assert run_night(bank, images, out, NIGHTS[3]) == 0
    assert run_night(bank, images, out, NIGHTS[1]) == 0
    assert storage.read_manifest(f"{out}/runs/run={NIGHTS[1]}", "results")["counts"] == {
        "listed": 27, "already_scored": 18, "inputs": 9, "scored": 7, "errors": 2}

    # the index of scored inputs: from the runs' key files = from their parquet columns
    digest = incremental.bank_identity(bank, storage.read_manifest(bank, "bank"))[1]
    runs = incremental.committed_runs(out, {}, current="")
    from_keys = incremental.scored_index(out, runs, digest, {})
    no_keys = {r: {k: v for k, v in m.items() if k != "input_keys"} for r, m in runs.items()}
    np.testing.assert_array_equal(from_keys, incremental.scored_index(out, no_keys, digest, {}))
    assert len(from_keys) == 20 + 9 + 6

    # exactly the expected rows: scores + errors of each night = what that night had to do
    rows = read_all(out)
    con = duckdb.connect()
    con.register_filesystem(s3fs_filesystem())
    err_rows = con.sql(f"select * replace (run::varchar as run) from read_parquet("
                       f"'{out}/errors/**/*.parquet', hive_partitioning=true)").fetchdf().to_dict("records")
    assert {r["uri"] for r in err_rows} == {f"{images}/b/corrupt.png", f"{images}/b/empty.png"}
    assert {r["run"] for r in err_rows} == {NIGHTS[1]}
    for night, uris in expected.items():
        got = {r["uri"] for r in rows if r["run"] == night} | {
            r["uri"] for r in err_rows if r["run"] == night}
        assert got == uris, night
    assert len(rows) + len(err_rows) == sum(len(u) for u in expected.values())  # 20 + 9 + 6
    # the columns of DESIGN.md §5, the same bank on every row, input versions from the listing
    assert {"uri", "rel", "score", "anomalous", "max_y", "max_x", "width", "height", "bank_id",
            "bank_digest", "input_version", "scored_at", "run"} <= set(rows[0])
    assert {(r["bank_id"], r["bank_digest"]) for r in rows} == {
        ("line-a-v1", incremental.bank_identity(bank, storage.read_manifest(bank, "bank"))[1])}
    listing = {u: v for u, _, v in storage.list_image_versions(images)}
    latest = {r["uri"]: r["input_version"] for r in sorted(rows, key=lambda r: r["run"])}
    assert latest == {u: v for u, v in listing.items() if "corrupt" not in u and "empty" not in u}
    # the changed inputs were scored twice, under two versions; unchanged ones once
    per_uri = collections.Counter(r["uri"] for r in rows)
    assert {u for u, n in per_uri.items() if n > 1} == {f"{images}/a/003.png", f"{images}/a/007.png"}

    # duckdb answers the nightly questions, as a brute-force count over the rows does
    con.execute(f"create view s as select * replace (run::varchar as run) from read_parquet("
                f"'{out}/scores/**/*.parquet', hive_partitioning=true)")
    last = max(r["run"] for r in rows)
    top = con.sql(f"select uri, score from s where run = '{last}' order by score desc limit 3"
                  ).fetchall()
    brute = sorted(((r["uri"], r["score"]) for r in rows if r["run"] == last), key=lambda t: -t[1])
    assert top == brute[:3]
    rates = dict(con.sql("select run, avg(anomalous::int) from s group by run").fetchall())
    for night in {r["run"] for r in rows}:
        flags = [r["anomalous"] for r in rows if r["run"] == night]
        assert rates[night] == pytest.approx(sum(flags) / len(flags))
    twice = con.sql("select uri, input_version, bank_digest, count(*) n from s "
                    "group by all having n > 1").fetchall()
    assert twice == [] and len({(r["uri"], r["input_version"]) for r in rows}) == len(rows)

    # pyarrow.dataset, pandas and polars read the same table
    fs = s3fs_filesystem()
    root = out.removeprefix("s3://")
    table = pads.dataset(f"{root}/scores", filesystem=fs, partitioning="hive").to_table()
    assert table.num_rows == len(rows)
    assert sorted(table.column("uri").to_pylist()) == sorted(r["uri"] for r in rows)
    frame = pd.read_parquet(f"{out}/scores", storage_options={})
    assert len(frame) == len(rows) and set(frame["run"].astype(str)) == {r["run"] for r in rows}
    polars_frame = pl.scan_pyarrow_dataset(pads.dataset(f"{root}/scores", filesystem=fs,
                                                        partitioning="hive")).collect()
    assert polars_frame.height == len(rows)
    assert polars_frame.group_by("run").len().sort("run")["len"].to_list() == [
        sum(1 for r in rows if r["run"] == n) for n in sorted({r["run"] for r in rows})]

    # a run with another bank is refused; with --new-bank it scores every input again
    with pytest.raises(ValueError, match="another bank.*--new-bank"):
        run_night(other_bank, images, out, "2026-01-05")
    assert run_night(other_bank, images, out, "2026-01-05", "--new-bank") == 0
    rows = read_all(out)
    new = [r for r in rows if r["run"] == "2026-01-05"]
    assert {r["bank_id"] for r in new} == {"line-a-v2"}
    assert len(new) == len(listing) - 2  # every readable input, once, with the new bank
    assert {r["bank_id"] for r in rows if r["run"] != "2026-01-05"} == {"line-a-v1"}

    # the morning report: counts, drift check and overlays, self-contained
    html = storage.read_bytes(f"{out}/reports/run={NIGHTS[1]}/report.html").decode()
    md = storage.read_bytes(f"{out}/reports/run={NIGHTS[1]}/report.md").decode()
    assert "| scored | 7 |" in md and "| errors | 2 (" in md, md
    assert html.count("data:image/png;base64,") == 1 + 3  # histogram + --report-top 3 overlays
    assert "src=\"http" not in html and "src='http" not in html
    report = storage.read_manifest(f"{out}/runs/run={NIGHTS[1]}", "results")["report"]
    assert report["drift"]["alarm"] is not None  # the bank stores calibration scores
    local = tmp_path / "report.html"
    local.write_text(html)
    shot = _screenshot(local, tmp_path / "report.png")
    if shot is not None:
        pixels = np.asarray(Image.open(shot).convert("L"))
        assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and figures drawn


def _screenshot(page: Path, png: Path) -> Path | None:
    """Headless Chromium screenshot of `page`, or None when Chromium is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):  # .ci/run installs it: a CI run must look at the page
            pytest.fail("headless Chromium is not installed; `apt-get install -y chromium`")
        return None
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1200,1600", page.as_uri()], check=True, capture_output=True,
                   timeout=120)
    keep = Path("/tmp/patchcore_nightly_report.png")
    shutil.copyfile(png, keep)  # for a person to look at
    return png


def test_drift_alarm_fires_only_past_the_tolerance() -> None:
    reference = np.linspace(1.0, 2.0, 101)
    assert nightly_report.drift(reference * 1.1, reference, 0.25)["alarm"] is False
    moved = nightly_report.drift(reference * 1.5, reference, 0.25)
    assert moved["alarm"] is True and moved["moved"] == ["p95", "p99"]
    assert nightly_report.drift(reference, None, 0.25)["alarm"] is None


def test_pending_inputs_are_those_whose_version_the_index_lacks() -> None:
    listing = [("s3://b/a.png", 3, "3:e1"), ("s3://b/b.png", 3, "3:e2"), ("s3://b/c.png", 4, "4:e3")]
    index = np.sort(incremental.version_keys(["s3://b/a.png", "s3://b/b.png"], ["3:e1", "3:old"]))
    assert [u for u, _, _ in incremental.pending_inputs(listing, index)] == ["s3://b/b.png",
                                                                            "s3://b/c.png"]
    empty = np.empty(0, np.uint64)
    assert incremental.pending_inputs(listing, empty) == listing


@pytest.mark.parametrize(("flags", "message"), [
    (["--run-id", "x"], "add --incremental"),
    (["--new-bank"], "add --incremental"),
    (["--incremental", "--run-id", "a/b"], "--run-id must be"),
    (["--incremental", "--drift-tolerance", "-1"], "--drift-tolerance must be"),
])
def test_incremental_flags_are_checked(flags: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli.parse_config(score.ScoreConfig, ["--bank", "b", "--images", "i", "--out", "o", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_error_reasons_drop_the_particulars() -> None:
    assert nightly_report.error_reason("ValueError: corrupt image header (72 bytes): broken") == (
        "ValueError: corrupt image header")
    assert nightly_report.error_reason(
        "ValueError: data of 0 bytes starting b'' is not an image format Pillow reads") == (
        "ValueError: data of N bytes starting b'' is not an image format Pillow reads")
    assert nightly_report.error_reason("OSError") == "OSError"


def test_image_versions_change_when_a_file_is_rewritten(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a/1.png", "a/2.png", "b/3.png"):
        storage.write_bytes(str(tmp_path / name), _texture(rng))
    (tmp_path / "notes.txt").write_text("not an image")
    before = storage.list_image_versions(str(tmp_path))
    assert [u for u, _, _ in before] == storage.list_images(str(tmp_path))
    assert all(v.startswith(f"{size}:") for _, size, v in before)
    storage.write_bytes(str(tmp_path / "a/2.png"), _texture(rng) + b"\0")
    after = {u: v for u, _, v in storage.list_image_versions(str(tmp_path))}
    changed = {u for u, _, v in before if after[u] != v}
    assert changed == {str(tmp_path / "a/2.png")}
    manifest = tmp_path / "list.txt"
    manifest.write_text("a/1.png\ngone.png\n")
    listed = storage.list_image_versions(str(manifest))
    assert [(u, v) for u, _, v in listed] == [(str(tmp_path / "a/1.png"), after[str(tmp_path / "a/1.png")]),
                                               (str(tmp_path / "gone.png"), "missing")]


def test_plain_and_incremental_results_never_share_a_location(banks: tuple[str, str],
                                                              tmp_path: Path) -> None:
    nightly, plain = tmp_path / "nightly", tmp_path / "plain"
    (nightly / "runs" / "run=2026-01-01").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds --incremental runs"):
        incremental.check_plain_target(str(nightly), {})
    storage.write_manifest(str(plain), {"counts": {}}, kind="results")
    storage.write_bytes(str(tmp_path / "images" / "1.png"), _texture(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="plain `patchcore score` run"):
        run_night(banks[0], str(tmp_path / "images"), str(plain), "2026-01-01")
