"""Reliability and security of the jobs (issue 6): bad input, killed actors and drivers, truncated
shards, the run lock, --overwrite, planted secrets, path escapes, and no unsafe deserialisation.

Every job run is checked against an independent reference: the single-process `model.predict`
on the readable inputs, or an uninterrupted run of the same job.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import posixpath
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import cli, extract, fit, score
from jobs import config as _cli
from jobs import lock as _lock
from jobs.lock import FolderLockedError, RunLock
from jobs.folders import OutputFolder
from patchcore_core import backbone, model, preprocess, storage
from patchcore_core.spec import ModelSpec

ROOT = Path(__file__).parents[1]
SPEC = ModelSpec(backbone="efficientnet_lite0", weights="none", layers=("blocks.2", "blocks.4"),
                 resize=40, crop=32, embed_dim=16, sigma=2.0)
MODEL_FLAGS = ["--backbone", "efficientnet_lite0", "--weights", "none", "--resize", "40",
               "--crop", "32", "--embed-dim", "16", "--sigma", "2.0"]
# The session's Ray has 2 CPUs shared by every test: one half-CPU actor leaves room for decoding.
PIPELINE = ["--workers", "1", "--cpus-per-worker", "0.5", "--batch-size", "4", "--shard-size", "4",
            "--device", "cpu"]
NUM_CLEAN = 24  # 6 shards of 4


# --------------------------------------------------------------------------- data


def _texture(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Seeded striped texture with noise, (height, width, 3) uint8."""
    x = np.arange(width)[None, :]
    base = 128 + 60 * np.sin(x / 3.0) + 20 * rng.standard_normal((height, width))
    return np.clip(np.stack([base, base * 0.8, base * 0.6], -1), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but whose pixel data is a 16-byte stub (a bomb)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def write_clean(root: str, count: int = NUM_CLEAN, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        storage.write_bytes(f"{root}/{i:03d}.png", _encode(Image.fromarray(_texture(48, 40, rng))))


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A calibrated bank fitted in one process (no Ray): the jobs only read it."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = torch.stack([preprocess.to_tensor(Image.fromarray(_texture(48, 40, rng)), SPEC.resize,
                                               SPEC.crop) for _ in range(8)])
    fitted = model.fit(images[:6], SPEC, ratio=0.25, calibration_images=images[6:],
                       image_ids=[f"train/{i}.png" for i in range(6)])
    uri = str(tmp_path_factory.mktemp("bank") / "bank")
    model.save(fitted, uri)
    return uri


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("clean") / "images")
    write_clean(root)
    return root


def score_argv(bank: str, images: str, out: str, *extra: str) -> list[str]:
    return ["--bank", bank, "--images", images, "--out", out, *PIPELINE, *extra]


def run_score(bank: str, images: str, out: str, *extra: str) -> int:
    return score.run(_cli.parse_config(score.ScoreConfig, score_argv(bank, images, out, *extra)))


def read_rows(folder: str, sub: str = "scores", options: dict | None = None) -> list[dict]:
    fs, path = storage.url_to_fs(folder, options)
    fs.invalidate_cache()
    rows = []
    for part in sorted(fs.glob(posixpath.join(path, sub, "part-*.parquet"))):
        uri = part if "://" not in folder else fs.unstrip_protocol(part)
        rows += storage.read_table(uri, None, options).to_pylist()
    return rows


def reference_scores(bank: str, uris: list[str]) -> np.ndarray:
    torch.set_num_threads(1)
    return model.predict(model.load(bank), model.load_images(uris, SPEC)).scores.numpy()


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def clean_results(ray_local: None, bank: str, clean_data: str,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Two `score` runs started at the same moment into one --out; returns (out, outcomes)."""
    out = tmp_path_factory.mktemp("clean-results") / "results"
    outcomes: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def attempt(name: str) -> None:
        barrier.wait()
        try:
            outcomes[name] = run_score(bank, clean_data, str(out), "--raw-maps")
        except FolderLockedError as err:
            outcomes[name] = err

    threads = [threading.Thread(target=attempt, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out, outcomes


# --------------------------------------------------------------------------- 1. bad input


def test_bad_inputs_land_in_errors_with_a_reason_and_set_the_exit_status(
    ray_local: None, bank: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    root = tmp_path / "archive"
    root.mkdir()
    pixels = _texture(48, 40, rng)
    valid = _encode(Image.fromarray(pixels))
    good = {  # every image mode a camera or archive produces, 48 x 40 = 1920 px
        "rgb.png": valid,
        "gray.png": _encode(Image.fromarray(pixels[..., 0])),
        "rgba.png": _encode(Image.fromarray(np.dstack([pixels, np.full((40, 48), 9, np.uint8)]))),
        "palette.png": _encode(Image.fromarray(pixels).quantize(16)),
        "gray16.png": _encode(Image.fromarray(pixels[..., 1].astype(np.uint16) * 257)),
        "cmyk.jpg": _encode(Image.fromarray(pixels).convert("CMYK"), "JPEG"),
    }
    bad = {  # name -> (bytes, words the recorded reason must contain)
        "truncated.png": (valid[: len(valid) // 2], ("ValueError", "truncated")),
        "empty.png": (b"", ("ValueError", "0 bytes")),
        "notes.png": (b"shift report: all fine\n" * 20, ("ValueError", "not an image")),
        "random.jpg": (rng.bytes(700), ("ValueError", "not an image")),
        "bomb.png": (_png_header_only(30_000, 30_000), ("ValueError", "max_pixels=5000", "bomb")),
        "large.png": (_encode(Image.fromarray(_texture(80, 80, rng))), ("ValueError", "max_pixels")),
        "thin.png": (_encode(Image.fromarray(_texture(2000, 1, rng))), ("ValueError", "aspect")),
        "vanished.png": (valid, ("FileNotFoundError", "no such file")),
    }
    for name, data in good.items():
        (root / name).write_bytes(data)
    for name, (data, _) in bad.items():
        (root / name).write_bytes(data)
    (root / "readme.txt").write_text("not an input: wrong extension")

    listed = storage.list_images(str(root))
    (root / "vanished.png").unlink()  # listed, then gone before any worker reads it
    monkeypatch.setattr(storage, "list_images", lambda uri, options=None: list(listed))
    out = tmp_path / "results"
    assert run_score(bank, str(root), str(out), "--max-pixels", "5000", "--no-maps") == 2

    inputs = sorted(str(root / n) for n in [*good, *bad])
    scored = read_rows(str(out))
    errors = read_rows(str(out), "errors")
    assert sorted([r["uri"] for r in scored] + [e["uri"] for e in errors]) == inputs  # each once
    assert {Path(r["uri"]).name for r in scored} == set(good)
    reasons = {Path(e["uri"]).name: e["error"] for e in errors}
    assert set(reasons) == set(bad)
    for name, (_, words) in bad.items():
        for word in words:
            assert word in reasons[name], (name, reasons[name])
    counts = storage.read_manifest(str(out), "results")["counts"]
    assert counts == {"inputs": 14, "scored": 6, "errors": 8}
    uris = [r["uri"] for r in scored]
    np.testing.assert_allclose([r["score"] for r in scored], reference_scores(bank, uris),
                               rtol=1e-5, atol=1e-5)
    # the exit status follows --max-failures (a rerun of a committed folder re-reports its counts)
    assert run_score(bank, str(root), str(out), "--max-pixels", "5000", "--no-maps",
                     "--max-failures", "8") == 0
    assert run_score(bank, str(root), str(out), "--max-pixels", "5000", "--no-maps",
                     "--max-failures", "7") == 2


@pytest.mark.parametrize("layout", ["empty", "no_images"])
def test_archive_without_images_is_one_error_line_and_exit_status_1(
    bank: str, tmp_path: Path, layout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "archive"
    (archive / "sub").mkdir(parents=True)
    if layout == "no_images":
        (archive / "sub" / "notes.txt").write_text("x")
        (archive / "labels.csv").write_text("uri\n")
    with pytest.raises(SystemExit) as exited:
        cli.main(["score", *score_argv(bank, str(archive), str(tmp_path / "out"))])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("patchcore score: error:")]
    assert len(errors) == 1 and "no images found" in errors[0] and str(archive) in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_extreme_aspect_ratio_is_refused_before_resizing() -> None:
    image = Image.new("RGB", (100_000, 1))
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess.to_tensor(image, 256, 224, max_pixels=100_000_000)
    assert preprocess.to_tensor(Image.new("RGB", (300, 256)), 256, 224).shape == (3, 224, 224)


# --------------------------------------------------------------------------- 2. faults


def killing(base: type, marker: str, kill_at: int) -> type:
    """`base` actor whose process SIGKILLs itself on its first batch holding an input position
    >= kill_at; the marker file (created exclusively) makes that happen once per test, so the
    restarted actor then works. Defined in a function: Ray pickles it by value."""

    class Killing(base):  # type: ignore[valid-type,misc]
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if int(np.max(batch["position"])) >= kill_at:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)  # mid-batch: this batch's work is lost
            return super().__call__(batch)

    return Killing


def test_actor_killed_mid_score_still_scores_every_input_exactly_once(
    clean_results: tuple[Path, dict], bank: str, clean_data: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marker = tmp_path / "killed"
    monkeypatch.setattr(score, "ScoreActor", killing(score.ScoreActor, str(marker), 9))
    out = tmp_path / "results"
    assert run_score(bank, clean_data, str(out), "--raw-maps") == 0
    assert marker.exists()  # the actor process really died mid-run
    rows, reference = read_rows(str(out)), read_rows(str(clean_results[0]))
    assert [r["uri"] for r in rows] == [r["uri"] for r in reference]  # no loss, no duplicate
    np.testing.assert_allclose([r["score"] for r in rows], [r["score"] for r in reference], rtol=1e-6)
    assert sorted(p.name for p in (out / "maps_raw").iterdir()) == sorted(
        p.name for p in (clean_results[0] / "maps_raw").iterdir())
    assert storage.read_manifest(str(out), "results")["counts"]["scored"] == NUM_CLEAN


def test_actor_killed_mid_extract_still_extracts_every_input_exactly_once(
    ray_local: None, clean_data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "killed"
    monkeypatch.setattr(extract, "FeatureActor", killing(extract.FeatureActor, str(marker), 9))
    out = tmp_path / "features"
    extract.main(["--train", clean_data, "--out", str(out), *MODEL_FLAGS, *PIPELINE,
                  "--feature-dtype", "float32"])
    assert marker.exists()
    manifest = storage.read_manifest(str(out), "features")
    uris = storage.list_images(clean_data)
    grid = 4 * 4  # crop 32 at stride 8
    assert manifest["counts"] == {"inputs": NUM_CLEAN, "extracted": NUM_CLEAN, "errors": 0,
                                  "patches": NUM_CLEAN * grid}
    shards = [storage.read_feature_shard(str(out / s["file"])) for s in manifest["shards"]]
    assert [i for s in shards for i in s["image_id"]] == [u for u in uris for _ in range(grid)]
    torch.set_num_threads(1)
    expected = model.embed_images(backbone.load_backbone(SPEC), model.load_images(uris, SPEC), SPEC)
    torch.testing.assert_close(torch.cat([s["feature"] for s in shards]),
                               expected.reshape(-1, SPEC.embed_dim), rtol=1e-5, atol=1e-5)


def test_driver_killed_mid_score_rerun_redoes_only_uncommitted_shards(
    clean_results: tuple[Path, dict], bank: str, clean_data: str, tmp_path: Path
) -> None:
    import ray

    out = tmp_path / "results"
    argv = score_argv(bank, clean_data, str(out), "--raw-maps", "--batch-size", "2")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "AWS_SECRET_ACCESS_KEY": "PLANTED-DRIVER-SECRET-789"}
    log_file = tmp_path / "driver.log"
    with open(log_file, "wb") as log_out:
        driver = subprocess.Popen([sys.executable, "-m", "jobs", "score", *argv], cwd=ROOT, env=env,
                                  stdout=log_out, stderr=subprocess.STDOUT)
        records = out / "_shards"
        deadline = time.monotonic() + 300
        while driver.poll() is None and time.monotonic() < deadline:
            if records.is_dir() and any(p.suffix == ".json" for p in records.iterdir()):
                break
            time.sleep(0.005)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, log_file.read_text()
    assert not (out / "manifest.json").exists()  # killed before the commit point
    committed = sorted(p.stem for p in records.glob("*.json"))
    assert 1 <= len(committed) < NUM_CLEAN // 4
    kept = {f"scores/{name}.parquet" for name in committed} | {f"_shards/{name}.json" for name in committed}
    before = mtimes(out)
    assert json.loads((out / "_lock.json").read_text())["pid"] == driver.pid  # left by the dead run

    assert score.run(_cli.parse_config(score.ScoreConfig, argv)) == 0  # the same command again
    after = mtimes(out)
    assert all(after[name] == before[name] for name in kept)  # committed shards were not redone
    redone = {name for name in after if name.startswith("scores/") and after[name] != before.get(name)}
    assert redone == {f"scores/part-{i:05d}.parquet" for i in range(NUM_CLEAN // 4)} - kept
    assert not (out / "_lock.json").exists() and not (out / "_job.json").exists()
    rows, reference = read_rows(str(out)), read_rows(str(clean_results[0]))
    assert [r["uri"] for r in rows] == [r["uri"] for r in reference]
    np.testing.assert_allclose([r["score"] for r in rows], [r["score"] for r in reference], rtol=1e-6)
    assert len(list((out / "maps_raw").iterdir())) == NUM_CLEAN
    assert "PLANTED-DRIVER-SECRET-789" not in log_file.read_text()


def test_truncated_or_half_written_shards_are_redone_never_read(
    clean_results: tuple[Path, dict], bank: str, clean_data: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="jobs")
    out = tmp_path / "results"
    shutil.copytree(clean_results[0], out)
    manifest = storage.read_manifest(str(out), "results")
    (out / "manifest.json").unlink()  # an interrupted run: shards committed, no manifest yet
    (out / "_job.json").write_text(json.dumps(manifest["identity"], sort_keys=True))
    cut = out / "scores" / "part-00001.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # half-written data file
    (out / "_shards" / "part-00003.json").write_text('{"inputs": 4, "sco')  # half-written record
    swapped = out / "scores" / "part-00004.parquet"  # same size, not Parquet: footer unreadable
    swapped.write_bytes(b"\0" * swapped.stat().st_size)
    before = mtimes(out)

    assert run_score(bank, clean_data, str(out), "--raw-maps") == 0
    after = mtimes(out)
    redone = {name for name in after if name.startswith(("scores/", "_shards/"))
              and after[name] != before.get(name)}
    assert redone == {f"{sub}/part-{i:05d}.{ext}" for i in (1, 3, 4)
                      for sub, ext in (("scores", "parquet"), ("_shards", "json"))}
    for name in ("part-00001", "part-00003", "part-00004"):
        assert f"shard {name} is not committed intact" in caplog.text
    rows, reference = read_rows(str(out)), read_rows(str(clean_results[0]))
    assert [r["uri"] for r in rows] == [r["uri"] for r in reference]
    np.testing.assert_allclose([r["score"] for r in rows], [r["score"] for r in reference], rtol=1e-6)


# --------------------------------------------------------------------------- 3. artifacts


def test_two_concurrent_runs_cannot_both_commit(clean_results: tuple[Path, dict], bank: str,
                                                clean_data: str) -> None:
    out, outcomes = clean_results
    assert sorted(type(v).__name__ for v in outcomes.values()) == ["FolderLockedError", "int"]
    assert 0 in outcomes.values()
    refusal = next(str(v) for v in outcomes.values() if isinstance(v, FolderLockedError))
    assert "another run" in refusal and "_lock.json" in refusal
    manifest = storage.read_manifest(str(out), "results")
    assert manifest["counts"] == {"inputs": NUM_CLEAN, "scored": NUM_CLEAN, "errors": 0}
    assert not (out / "_lock.json").exists()
    uris = [r["uri"] for r in read_rows(str(out))]
    assert uris == storage.list_images(clean_data)
    np.testing.assert_allclose([r["score"] for r in read_rows(str(out))],
                               reference_scores(bank, uris), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_run_lock_admits_exactly_one_of_many_concurrent_claims(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    folder = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_server')}/lock-race"
    winners: list[OutputFolder] = []
    refused: list[FolderLockedError] = []
    barrier = threading.Barrier(6)

    def claim() -> None:
        attempt = OutputFolder(folder, {})
        barrier.wait()
        try:
            attempt.acquire_lock()
            winners.append(attempt)
        except FolderLockedError as err:
            refused.append(err)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and len(refused) == 5
    winners[0].verify_lock()
    winners[0].release_lock()
    assert not storage.exists(storage.join_uri(folder, "_lock.json"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exclusive_create_and_compare_and_swap(where: str, tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    folder = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_server')}/cas"
    uri = storage.join_uri(folder, "x.json")
    assert storage.create_exclusive(uri, b"one")
    assert not storage.create_exclusive(uri, b"two")
    assert storage.read_bytes(uri) == b"one"
    assert not storage.replace_if_unchanged(uri, b"three", b"stale")
    assert storage.replace_if_unchanged(uri, b"three", b"one")
    assert storage.read_bytes(uri) == b"three"
    assert not storage.remove_if_unchanged(uri, b"one")
    assert storage.remove_if_unchanged(uri, b"three")
    assert not storage.exists(uri)
    assert not storage.replace_if_unchanged(uri, b"four", b"three")  # missing: nothing to swap
    assert not storage.exists(uri)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_heartbeat_renews_the_lock_and_notices_a_takeover(
    where: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_lock, "LOCK_HEARTBEAT_S", 0.05)
    folder = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_server')}/beat"
    uri = storage.join_uri(folder, "_lock.json")
    lock = RunLock(uri, {})
    lock.acquire()
    first = json.loads(storage.read_bytes(uri))["heartbeat"]
    deadline = time.monotonic() + 10
    while json.loads(storage.read_bytes(uri))["heartbeat"] == first and time.monotonic() < deadline:
        time.sleep(0.02)
    assert json.loads(storage.read_bytes(uri))["heartbeat"] > first  # renewed in place
    lock.verify()
    storage.write_bytes(uri, json.dumps({"run_id": "intruder", "heartbeat": time.time()}).encode())
    while lock._lost is None and time.monotonic() < deadline:  # the heartbeat's swap fails
        time.sleep(0.02)
    with pytest.raises(FolderLockedError, match="replaced or removed"):
        lock.verify()
    lock.release()
    assert json.loads(storage.read_bytes(uri))["run_id"] == "intruder"


def _write_lock(folder: Path, **fields: Any) -> None:
    body = {"run_id": "other", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "heartbeat": time.time(), **fields}
    (folder / "_lock.json").write_text(json.dumps(body))


def test_lock_of_a_dead_run_is_taken_over_and_a_live_one_refused(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    _write_lock(tmp_path, pid=dead_pid)  # same host, process gone
    first = OutputFolder(str(tmp_path), {})
    first.acquire_lock()
    first.release_lock()
    _write_lock(tmp_path, host="elsewhere", heartbeat=time.time() - _lock.LOCK_LEASE_S - 5)
    second = OutputFolder(str(tmp_path), {})
    second.acquire_lock()  # another host, heartbeat past the lease
    second.release_lock()
    _write_lock(tmp_path, host="elsewhere")  # fresh heartbeat on another host: alive
    with pytest.raises(FolderLockedError, match="run other on host elsewhere"):
        OutputFolder(str(tmp_path), {}).acquire_lock()


def test_run_that_lost_its_lock_cannot_commit(tmp_path: Path) -> None:
    lock = RunLock(str(tmp_path / "_lock.json"), {})
    lock.acquire()
    lock.verify()
    _write_lock(tmp_path, run_id="intruder")  # e.g. taken over after this run stalled
    with pytest.raises(FolderLockedError, match="lost .*intruder"):
        lock.verify()
    lock.release()
    assert json.loads((tmp_path / "_lock.json").read_text())["run_id"] == "intruder"  # not ours


def test_held_lock_stops_a_score_run_before_it_writes_anything(
    bank: str, clean_data: str, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    holder = OutputFolder(str(out), {})
    holder.acquire_lock()
    try:
        with pytest.raises(FolderLockedError):
            run_score(bank, clean_data, str(out))
        assert sorted(p.name for p in out.iterdir()) == ["_lock.json"]
    finally:
        holder.release_lock()


def test_overwrite_is_the_only_way_to_replace_committed_results(
    ray_local: None, bank: str, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    write_clean(str(images), count=3)
    out = tmp_path / "results"
    assert run_score(bank, str(images), str(out), "--no-maps") == 0
    before = mtimes(out)
    with pytest.raises(ValueError, match="--overwrite"):  # other settings: refused, untouched
        run_score(bank, str(images), str(out), "--no-maps", "--max-pixels", "1000")
    assert mtimes(out) == before
    assert run_score(bank, str(images), str(out), "--no-maps") == 0  # same settings: no-op
    assert mtimes(out) == before
    assert run_score(bank, str(images), str(out), "--no-maps", "--max-pixels", "1000",
                     "--overwrite") == 2  # replaced: every 1920 px input is over the limit now
    counts = storage.read_manifest(str(out), "results")["counts"]
    assert counts == {"inputs": 3, "scored": 0, "errors": 3}
    assert read_rows(str(out)) == []


def test_readers_refuse_uncommitted_or_other_kind_folders(
    bank: str, clean_data: str, tmp_path: Path
) -> None:
    half = tmp_path / "half-bank"
    shutil.copytree(bank, half)
    (half / "manifest.json").unlink()  # files present, commit point missing
    with pytest.raises(FileNotFoundError, match="did not finish"):
        run_score(str(half), clean_data, str(tmp_path / "r1"))
    results = tmp_path / "results"
    storage.write_manifest(str(results), {"counts": {}}, kind="results")
    with pytest.raises(ValueError, match="'results' artifact, expected 'bank'"):
        run_score(str(results), clean_data, str(tmp_path / "r2"))
    with pytest.raises(FileNotFoundError, match="did not finish"):
        model.load(str(half))
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


# --------------------------------------------------------------------------- 4. security


SOURCE_DIRS = ("jobs", "patchcore_core", "benchmarks", "infra")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "shelve", "marshal", "joblib", "cloudpickle"}


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Deserialisation that can run code, and code evaluation from strings."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
                found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            bare = isinstance(func, ast.Name)  # eval(...), not model.eval()
            name = func.id if bare else getattr(func, "attr", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            constants = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
            where = f"line {node.lineno}"
            if bare and name in ("eval", "exec", "__import__"):
                found.append(f"{name}() at {where}")
            elif owner == "torch" and name == "load" and constants.get("weights_only") is not True:
                found.append(f"torch.load without weights_only=True at {where}")
            elif owner == "yaml" and name in ("load", "load_all", "unsafe_load"):
                found.append(f"yaml.{name} at {where}")
            elif owner in ("np", "numpy") and name == "load" and constants.get("allow_pickle") is not False:
                found.append(f"np.load without allow_pickle=False at {where}")
            elif name == "read_pickle":
                found.append(f"read_pickle() at {where}")
            elif name in ("run", "Popen", "call", "check_output") and constants.get("shell") is True:
                found.append(f"subprocess shell=True at {where}")
    return found


def test_unsafe_call_finder_flags_known_bad_code() -> None:
    bad = ("import pickle\nfrom dill import loads\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
           "eval(s)\nyaml.load(s)\nnp.load(f)\nsubprocess.run(c, shell=True)\n")
    assert len(_unsafe_calls(ast.parse(bad))) == 8
    good = ("torch.load(f, map_location='cpu', weights_only=True)\nnp.load(f, allow_pickle=False)\n"
            "self.model.eval()\n")
    assert _unsafe_calls(ast.parse(good)) == []


def test_source_tree_has_no_pickle_eval_or_unsafe_loads() -> None:
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    problems = {str(p.relative_to(ROOT)): found for p in files
                if (found := _unsafe_calls(ast.parse(p.read_text(), filename=str(p))))}
    assert problems == {}


def _all_bytes(fs: Any, root: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {path: fs.cat_file(path) for path in fs.find(root)}


@pytest.mark.slow
def test_planted_secret_never_reaches_outputs_or_logs(
    ray_local: None, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    from jobs import demo_data, evaluate

    secrets = ("PLANTED-SECRET-123", "PLANTED-KEYID-123", "PLANTED-ENV-SECRET-456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets[2])  # driver-side credential chain
    options = json.dumps({"key": secrets[1], "secret": secrets[0]})  # moto accepts any keys
    caplog.set_level(logging.INFO)
    base = f"s3://{s3_server}/secret"
    data = f"{base}/data"
    demo_data.make_demo_dataset(data, categories=("grass",), num_train=6, num_test_good=2,
                                num_test_defect=1, size=40, defect_types=("stain",))
    common = ["--storage-options", options]
    fit.main(["--train", f"{data}/grass/train/good", "--out", f"{base}/bank", *MODEL_FLAGS, *PIPELINE,
              "--calibration-fraction", "0.34", "--ratio", "0.25", *common])
    score.main(["--bank", f"{base}/bank", "--images", f"{data}/grass/test", "--out", f"{base}/results",
                *PIPELINE, "--raw-maps", *common])
    evaluate.main(["--results", f"{base}/results", "--dataset", f"{data}/grass", "--out",
                   f"{base}/report", "--overlays", "1", *common])
    assert storage.read_manifest(f"{base}/report", "report")["counts"]["images"] == 3

    fs, path = storage.url_to_fs(base, json.loads(options))
    written = _all_bytes(fs, path)
    assert any(p.endswith("report/metrics.json") for p in written) and len(written) > 30
    captured = capfd.readouterr()
    texts = {"log records": caplog.text, "stdout": captured.out, "stderr": captured.err}
    import ray

    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    texts.update({f"ray log {p.name}": p.read_text(errors="replace")
                  for p in logs_dir.rglob("*") if p.is_file()})
    assert any(name.startswith("ray log") for name in texts)
    for secret in secrets:
        assert not [p for p, data in written.items() if secret.encode() in data], secret
        assert not [name for name, text in texts.items() if secret in text], secret
    assert "<redacted>" in caplog.text  # the config line names the option keys only


def test_output_paths_from_input_names_stay_below_the_output_prefix(
    ray_local: None, s3_server: str, bank: str
) -> None:
    import boto3

    base = f"pathtest-{time.monotonic_ns()}"
    client = boto3.client("s3")
    rng = np.random.default_rng(5)
    keys = [f"{base}/in/good.png", f"{base}/in/../../evil.png", f"{base}/in/a/../../../../up.png",
            f"{base}/in//double.png"]
    for key in keys:  # S3 keys are plain strings: '..' and '//' are legal, nothing resolves them
        client.put_object(Bucket=s3_server, Key=key, Body=_encode(Image.fromarray(_texture(48, 40, rng))))
    manifest = "\n".join(f"s3://{s3_server}/{key}" for key in keys) + "\n"
    client.put_object(Bucket=s3_server, Key=f"{base}/list.txt", Body=manifest.encode())

    def bucket_keys() -> set[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3_server)
        return {o["Key"] for page in pages for o in page.get("Contents", [])}

    before = bucket_keys()
    out = f"s3://{s3_server}/{base}/out"
    assert run_score(bank, f"s3://{s3_server}/{base}/list.txt", out, "--raw-maps") == 0
    new = bucket_keys() - before
    assert new and all(k.startswith(f"{base}/out/") for k in new)
    assert all(".." not in k.split("/") and "//" not in k for k in new)
    assert f"{base}/out/maps/%2E%2E/%2E%2E/evil.png.png" in new
    assert f"{base}/out/maps_raw/a/%2E%2E/%2E%2E/%2E%2E/%2E%2E/up.png.npy" in new
    assert f"{base}/out/masks/%/double.png.png" in new
    rows = read_rows(out)
    assert sorted(r["uri"] for r in rows) == sorted(f"s3://{s3_server}/{k}" for k in keys)


def test_batch_killing_its_actor_beyond_retries_fails_the_run_and_a_rerun_completes(
    clean_results: tuple[Path, dict], bank: str, clean_data: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    marker = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(score, "ScoreActor", killing(score.ScoreActor, str(marker), 9))
        with pytest.raises(ray.exceptions.RayError):  # --retries 0: the lost batch is not retried
            run_score(bank, clean_data, str(tmp_path / "results"), "--raw-maps", "--retries", "0")
    assert marker.exists()
    out = tmp_path / "results"
    assert not (out / "manifest.json").exists() and not (out / "_lock.json").exists()
    assert run_score(bank, clean_data, str(out), "--raw-maps") == 0
    rows, reference = read_rows(str(out)), read_rows(str(clean_results[0]))
    assert [r["uri"] for r in rows] == [r["uri"] for r in reference]
    np.testing.assert_allclose([r["score"] for r in rows], [r["score"] for r in reference], rtol=1e-6)
