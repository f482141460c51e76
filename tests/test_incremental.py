"""`patchcore score --incremental` on the local S3 server: nights of a growing archive leave each
(input version, bank) scored exactly once, readable as one Hive-partitioned table by duckdb,
pyarrow.dataset, pandas and polars; a run cut short resumes; another bank is refused unless
--new-bank; each run writes a self-contained morning report."""

from __future__ import annotations

import collections
import io
import os
import shutil
import signal
import subprocess
import sys
import time
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


ROOT = Path(__file__).parents[1]


def _brute_rows(out: str, sub: str) -> list[dict[str, Any]]:
    """Every row of RESULTS/sub/run=ID/part-*.parquet, read part by part (no Hive reader), with
    its run id taken from the folder name: the reference the duckdb answers are checked against."""
    rows = []
    for run_dir in storage.subfolders(f"{out}/{sub}"):
        for part in storage.list_files(f"{out}/{sub}/{run_dir}", "part-*.parquet"):
            table = storage.read_table(part, ["uri", "input_version", "bank_digest", "anomalous",
                                              "score"] if sub == "scores"
                                       else ["uri", "input_version", "bank_digest"])
            rows += [{**r, "run": run_dir.removeprefix("run=")} for r in table.to_pylist()]
    return rows


def _kill_after_first_commit(argv: list[str], state: str, log_path: Path) -> int:
    """Run `python -m jobs score ARGV` on the session's Ray and SIGKILL it as soon as the store
    holds its first shard commit record (STATE/_shards/*.json); returns the driver's pid."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(log_path, "wb") as log_out:
        driver = subprocess.Popen([sys.executable, "-m", "jobs", "score", *argv], cwd=ROOT, env=env,
                                  stdout=log_out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while driver.poll() is None and time.monotonic() < deadline:
            if storage.list_files(f"{state}/_shards", "part-*.json"):
                break
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
    return driver.pid


def test_nights_at_issue_scale_with_a_real_kill_score_each_input_version_once(
    ray_local: None, s3_server: str, banks: tuple[str, str], tmp_path: Path,
) -> None:
    """Night 1: 200 images. Night 2: 50 new, 5 changed, 3 corrupt; its driver is SIGKILLed after
    its first shard commit (a real process kill). Night 3: nothing new, refused until night 2 is
    finished by rerunning it. Checked against a brute-force listing of each night."""
    import duckdb

    bank = banks[0]
    digest = incremental.bank_identity(bank, storage.read_manifest(bank, "bank"))[1]
    base = f"s3://{s3_server}/scale"
    images, out = f"{base}/images", f"{base}/results"
    rng = np.random.default_rng(7)

    def put(name: str, data: bytes) -> None:
        storage.write_bytes(f"{images}/{name}", data)

    def listing() -> dict[str, str]:
        return {u: v for u, _, v in storage.list_image_versions(images)}

    for i in range(200):
        put(f"n1/{i:04d}.png", _texture(rng, defect=i % 40 == 3))
    seen_1 = listing()
    assert run_night(bank, images, out, "n1", "--shard-size", "16") == 0
    for i in range(50):
        put(f"n2/{i:04d}.png", _texture(rng, defect=i == 10))
    for i in range(5):
        put(f"n1/{i:04d}.png", _texture(rng))  # changed: new content, new ETag
    put("n2/corrupt.png", b"\x89PNG\r\n\x1a\n" + rng.bytes(64))
    put("n2/empty.png", b"")
    put("n2/truncated.png", _texture(rng)[:100])
    seen_2 = listing()
    corrupt = {f"{images}/n2/{n}.png" for n in ("corrupt", "empty", "truncated")}

    argv = ["--bank", bank, "--images", images, "--out", out, "--incremental", "--run-id", "n2",
            "--max-failures", "10", "--report-top", "3", *PIPELINE, "--shard-size", "8"]
    state = f"{out}/runs/run=n2"
    _kill_after_first_commit(argv, state, tmp_path / "driver.log")
    assert not storage.is_committed(state)
    committed = storage.list_files(f"{state}/_shards", "part-*.json")
    shards = -(-(50 + 5 + 3) // 8)
    assert 1 <= len(committed) < shards, committed
    kept = {f"{out}/scores/run=n2/{Path(c).stem}.parquet" for c in committed}
    before = {uri: storage.read_bytes(uri) for uri in kept if storage.exists(uri)}
    assert before  # the committed shards' parts (a shard of corrupt inputs only has no scores)
    with pytest.raises(ValueError, match="unfinished.*--run-id n2"):
        run_night(bank, images, out, "n3")
    assert run_night(bank, images, out, "n2", "--shard-size", "8") == 0  # the same command again
    assert {uri: storage.read_bytes(uri) for uri in before} == before  # committed: not redone
    assert run_night(bank, images, out, "n3") == 0  # night 3: nothing new
    assert listing() == seen_2

    counts = {r: storage.read_manifest(f"{out}/runs/run={r}", "results")["counts"]
              for r in ("n1", "n2", "n3")}
    assert counts == {
        "n1": {"listed": 200, "already_scored": 0, "inputs": 200, "scored": 200, "errors": 0},
        "n2": {"listed": 253, "already_scored": 195, "inputs": 58, "scored": 55, "errors": 3},
        "n3": {"listed": 253, "already_scored": 253, "inputs": 0, "scored": 0, "errors": 0}}
    # exactly the expected rows: each (uri, input version, bank) of a night's listing once
    scores, errors = _brute_rows(out, "scores"), _brute_rows(out, "errors")
    expected = ({(u, v, "n1") for u, v in seen_1.items()}
                | {(u, v, "n2") for u, v in seen_2.items() if seen_1.get(u) != v})
    got = collections.Counter((r["uri"], r["input_version"], r["run"]) for r in scores + errors)
    assert set(got) == expected and set(got.values()) == {1}
    assert {r["uri"] for r in errors} == corrupt and {r["bank_digest"] for r in scores} == {digest}

    # duckdb over the Hive layout answers as the brute-force count does
    con = duckdb.connect()
    con.register_filesystem(s3fs_filesystem())
    s3fs_filesystem().invalidate_cache()
    table = f"read_parquet('{out}/scores/**/*.parquet', hive_partitioning=true)"
    per_run = dict(con.sql(f"select run::varchar, count(*) from {table} group by all").fetchall())
    assert per_run == collections.Counter(r["run"] for r in scores) == {"n1": 200, "n2": 55}
    flagged = dict(con.sql(f"select run::varchar, sum(anomalous::int) from {table} group by all"
                           ).fetchall())
    assert flagged == {n: sum(r["anomalous"] for r in scores if r["run"] == n) for n in per_run}
    assert con.sql(f"select count(distinct uri) from {table}").fetchall()[0][0] == len(
        {r["uri"] for r in scores}) == 250
    twice = con.sql(f"select uri, count(*) from {table} group by uri having count(*) > 1").fetchall()
    assert sorted(u for u, _ in twice) == [f"{images}/n1/{i:04d}.png" for i in range(5)]


def test_inputs_that_change_vanish_or_repeat_and_foreign_or_half_written_runs(
    ray_local: None, banks: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bad inputs of a growing archive: an object rewritten or deleted between the listing and
    its scoring, one object under several URIs, a run id committed with another bank, and a run
    partition left half-written (a part truncated, its shard uncommitted) by a killed run."""
    bank, other_bank = banks
    images, out = tmp_path / "images", str(tmp_path / "results")
    rng = np.random.default_rng(3)
    for i in range(6):
        storage.write_bytes(str(images / f"{i}.png"), _texture(rng))
    changed, vanished = str(images / "1.png"), str(images / "2.png")
    real_plan = incremental.plan_inputs

    def plan_then_touch(*args: Any, **kwargs: Any) -> incremental.Plan:
        plan = real_plan(*args, **kwargs)
        storage.write_bytes(changed, _texture(rng) + b"\0")  # rewritten after it was listed
        os.remove(vanished)  # deleted after it was listed
        return plan
    monkeypatch.setattr(incremental, "plan_inputs", plan_then_touch)
    listed = {u: v for u, _, v in storage.list_image_versions(str(images))}
    assert run_night(bank, str(images), out, "a") == 0
    monkeypatch.setattr(incremental, "plan_inputs", real_plan)
    scores, errors = _brute_rows(out, "scores"), _brute_rows(out, "errors")
    # each listed input once, under the version it was listed with; the vanished one as an error
    assert sorted((r["uri"], r["input_version"]) for r in scores + errors) == sorted(listed.items())
    assert [r["uri"] for r in errors] == [vanished]
    # the next night scores the changed input again under its new version; the vanished one is
    # no longer listed, so nothing is done for it
    now = {u: v for u, _, v in storage.list_image_versions(str(images))}
    assert run_night(bank, str(images), out, "b") == 0
    night_b = [(r["uri"], r["input_version"]) for r in _brute_rows(out, "scores") if r["run"] == "b"]
    assert night_b == [(changed, now[changed])] and now[changed] != listed[changed]

    # a run id committed with another bank is refused, not silently taken as done
    with pytest.raises(ValueError, match="run a was committed with bank line-a-v1.*another --run-id"):
        run_night(other_bank, str(images), out, "a", "--new-bank")

    # a killed run's half-written partition: part truncated, shard not committed, no manifest
    part = f"{out}/scores/run=b/part-00000.parquet"
    before = storage.read_table(part, ["uri", "input_version", "score"]).to_pylist()
    storage.remove(f"{out}/runs/run=b/manifest.json")
    storage.remove(f"{out}/runs/run=b/_shards/part-00000.json")
    storage.write_bytes(part, storage.read_bytes(part)[:50])
    with pytest.raises(ValueError, match="run b is unfinished"):
        run_night(bank, str(images), out, "c")  # its rows would be scored twice otherwise
    assert run_night(bank, str(images), out, "b") == 0  # the same command finishes it
    after = storage.read_table(part, ["uri", "input_version", "score"]).to_pylist()
    assert [(r["uri"], r["input_version"]) for r in after] == [(r["uri"], r["input_version"])
                                                               for r in before]
    np.testing.assert_allclose([r["score"] for r in after], [r["score"] for r in before], rtol=1e-5)

    # one object under several URIs of a manifest: one input; a copy under another name: its own
    copy = images / "copy-of-0.png"
    shutil.copyfile(images / "0.png", copy)
    manifest = images / "list.txt"
    manifest.write_text(f"0.png\n./0.png\n{images}/0.png\nsub/../0.png\ncopy-of-0.png\n")
    assert run_night(bank, str(manifest), str(tmp_path / "dup"), "a") == 0
    rows = _brute_rows(str(tmp_path / "dup"), "scores")
    assert sorted(r["uri"] for r in rows) == sorted([str(copy), str(images / "0.png")])
    counts = storage.read_manifest(str(tmp_path / "dup/runs/run=a"), "results")["counts"]
    assert counts["listed"] == counts["inputs"] == counts["scored"] == 2


def test_evaluate_reads_incremental_runs_all_or_one(
    ray_local: None, banks: tuple[str, str], tmp_path: Path,
) -> None:
    """`patchcore evaluate` on an --incremental location: every committed run (each input's latest
    row) or one --run-id; image AUROC equal to sklearn's on the rows read back by hand."""
    from sklearn.metrics import roc_auc_score
    from test_evaluate import _make_dataset

    from jobs import evaluate

    root, out = str(tmp_path / "widget"), str(tmp_path / "results")
    _make_dataset(root)
    assert run_night(banks[0], f"{root}/test", out, "n1") == 0
    rewritten = f"{root}/test/good/000.png"
    storage.write_bytes(rewritten, _texture(np.random.default_rng(5), defect=True))  # now scores high
    assert run_night(banks[0], f"{root}/test", out, "n2") == 0
    rows = _brute_rows(out, "scores")
    assert [r["uri"] for r in rows if r["run"] == "n2"] == [rewritten]

    def auroc(run_ids: set[str]) -> float:
        """sklearn's image AUROC over the latest row per input among `run_ids`."""
        table = {r["uri"]: r for r in sorted(rows, key=lambda r: r["run"]) if r["run"] in run_ids}
        uris = sorted(table)
        labels = [0 if "/good/" in u else 1 for u in uris]
        return float(roc_auc_score(labels, [table[u]["score"] for u in uris]))

    def evaluate_run(run_id: str, name: str) -> dict[str, Any]:
        argv = ["--results", out, "--dataset", root, "--out", str(tmp_path / name)]
        return evaluate.run(_cli.parse_config(evaluate.EvaluateConfig,
                                              [*argv, "--run-id", run_id] if run_id else argv))

    every = evaluate_run("", "report-all")
    assert every["mean"]["image_auroc"] == pytest.approx(auroc({"n1", "n2"}))
    first = evaluate_run("n1", "report-n1")
    assert first["mean"]["image_auroc"] == pytest.approx(auroc({"n1"}))
    assert first["mean"]["image_auroc"] != every["mean"]["image_auroc"]  # the rewrite counts
    with pytest.raises(FileNotFoundError, match="no committed run 'n9'.*'n1', 'n2'"):
        evaluate_run("n9", "report-n9")


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


@pytest.mark.parametrize("chunk_size", [1, 3, 10_000])
def test_streamed_plan_equals_the_whole_listing_filtered(tmp_path: Path, chunk_size: int) -> None:
    for i in range(11):
        (tmp_path / f"d{i % 3}" / "e").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"d{i % 3}" / ("e" if i % 2 else "") / f"{i:02d}.png").write_bytes(b"x" * i)
    (tmp_path / "notes.txt").write_text("not an image")
    listing = storage.list_image_versions(str(tmp_path))
    index = np.sort(incremental.version_keys([u for u, _, _ in listing[::2]],
                                             [v for _, _, v in listing[::2]]))
    plan = incremental.plan_inputs(str(tmp_path), index, {}, chunk_size=chunk_size)
    reference = incremental.pending_inputs(listing, index)
    assert list(zip(plan.uris, plan.versions)) == [(u, v) for u, _, v in reference]
    assert (plan.listed, plan.first, plan.last) == (11, listing[0][0], listing[-1][0])
    with pytest.raises(ValueError, match="no images found"):
        incremental.plan_inputs(str(tmp_path / "d0" / "*.jpg"), index, {})


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
