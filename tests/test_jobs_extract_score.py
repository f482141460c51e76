"""jobs.fit / extract / score on a local Ray: same bank and scores as the single-process model.py,
inputs = scored + errors, shard-level resume, no-op reruns, S3 paths, path sanitisation, and CPU
plans that would starve the decode stage refused instead of hanging."""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import cli, extract, fit, score
from jobs import cluster as _shards
from jobs import config as _cli
from jobs.folders import input_root, make_shards, map_uri, relative_key, safe_relative_path
from patchcore_core import backbone, knn, model, preprocess, storage
from patchcore_core.bank import Bank
from patchcore_core.spec import ModelSpec

SPEC = ModelSpec(backbone="efficientnet_lite0", weights="none", layers=("blocks.2", "blocks.4"),
                 resize=72, crop=64, embed_dim=32)
MODEL_FLAGS = ["--backbone", "efficientnet_lite0", "--weights", "none", "--resize", "72",
               "--crop", "64", "--embed-dim", "32"]
# Ray in tests has 2 CPUs shared by every test: one half-CPU actor leaves room for decode tasks.
PIPELINE_FLAGS = ["--workers", "1", "--cpus-per-worker", "0.5", "--batch-size", "3",
                  "--shard-size", "4", "--device", "cpu"]
FIT_FLAGS = ["--calibration-fraction", "0.25", "--ratio", "0.1", "--feature-dtype", "float32"]
SIZES = [(72, 72), (80, 64), (64, 88), (96, 72)]  # (width, height): several aspect ratios
NUM_TRAIN = 16


def _texture(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Seeded striped texture with noise, (height, width, 3) uint8."""
    x = np.arange(width)[None, :]
    base = 128 + 60 * np.sin(x / 3.0) + 20 * rng.standard_normal((height, width))
    return np.clip(np.stack([base, base * 0.8, base * 0.6], -1), 0, 255).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_dataset(root: str) -> None:
    """train/000..015.png; test/{good,bad}/000..003.png, test/corrupt.png, test/empty.png."""
    rng = np.random.default_rng(0)
    for i in range(NUM_TRAIN):
        storage.write_bytes(f"{root}/train/{i:03d}.png", _png(_texture(*SIZES[i % 4], rng)))
    for sub in ("good", "bad"):
        for i in range(4):
            pixels = _texture(*SIZES[(i + 1) % 4], rng)
            if sub == "bad":
                pixels[20:34, 24:40] = (250, 30, 30)
            storage.write_bytes(f"{root}/test/{sub}/{i:03d}.png", _png(pixels))
    storage.write_bytes(f"{root}/test/corrupt.png", b"\x89PNG\r\n\x1a\n" + rng.bytes(100))
    storage.write_bytes(f"{root}/test/empty.png", b"")


def run_fit(train: str, bank: str) -> int:
    return fit.run(_cli.parse_config(fit.FitConfig, ["--train", train, "--out", bank,
                                                     *MODEL_FLAGS, *PIPELINE_FLAGS, *FIT_FLAGS]))


def run_score(bank: str, images: str, out: str, *extra: str) -> int:
    argv = ["--bank", bank, "--images", images, "--out", out, "--raw-maps", *PIPELINE_FLAGS, *extra]
    return score.run(_cli.parse_config(score.ScoreConfig, argv))


def read_scores(folder: str) -> list[dict]:
    fs, path = storage.url_to_fs(folder)
    rows = []
    for part in sorted(fs.glob(posixpath.join(path, "scores", "part-*.parquet"))):
        rows += storage.read_table(part if "://" not in folder else fs.unstrip_protocol(part)).to_pylist()
    return rows


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(str(root))
    return root


@pytest.fixture(scope="module")
def local_bank(ray_local: None, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bank = tmp_path_factory.mktemp("fit") / "bank"
    assert run_fit(str(dataset / "train"), str(bank)) == 0
    return bank


@pytest.fixture(scope="module")
def local_results(local_bank: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("score") / "results"
    status = run_score(str(local_bank), str(dataset / "test"), str(out))
    assert status == 2  # two unreadable inputs, --max-failures 0
    return out


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("good/000.png", "good/000.png"),
        ("../../etc/passwd", "%2E%2E/%2E%2E/etc/passwd"),
        ("/abs/x.png", "%/abs/x.png"),
        ("a/./b//c.png", "a/%2E/b/%/c.png"),
        ("a\\..\\b.png", "a%5C..%5Cb.png"),
        ("100%.png", "100%25.png"),
        ("..", "%2E%2E"),
    ],
)
def test_safe_relative_path_cannot_escape_the_output_folder(rel: str, expected: str) -> None:
    safe = safe_relative_path(rel)
    assert safe == expected
    joined = posixpath.normpath(posixpath.join("/out/maps", safe))
    assert joined.startswith("/out/maps/")
    assert ".." not in safe.split("/") and not safe.startswith("/")


def test_safe_relative_path_keeps_distinct_inputs_distinct() -> None:
    rels = ["a/b.png", "a//b.png", "a/./b.png", "a/%2E/b.png", "a%5Cb.png", "a\\b.png", "/a/b.png"]
    assert len({safe_relative_path(r) for r in rels}) == len(rels)


def test_relative_key_is_the_path_below_the_input_root() -> None:
    uris = ["s3://bkt/test/good/0.png", "s3://bkt/test/bad/1.png"]
    assert input_root("s3://bkt/test/", uris) == "s3://bkt/test"
    assert input_root("s3://bkt/test/*/*.png", uris) == "s3://bkt/test"
    assert input_root("s3://bkt/list.txt", uris) == "s3://bkt/test"  # manifest: common folder
    assert [relative_key(u, "s3://bkt/test") for u in uris] == ["good/0.png", "bad/1.png"]
    assert relative_key("s3://other/x.png", "s3://bkt/test") == "s3:/%/other/x.png"


def test_shards_are_consecutive_chunks_named_by_position() -> None:
    uris = [f"u{i:02d}" for i in range(10)]
    shards = make_shards(uris, 4)
    assert [s.name for s in shards] == ["part-00000", "part-00001", "part-00002"]
    assert [s.uris for s in shards] == [tuple(uris[0:4]), tuple(uris[4:8]), tuple(uris[8:10])]
    assert [s.start for s in shards] == [0, 4, 8]


def test_split_calibration_holds_out_every_kth_image() -> None:
    uris = [f"{i:02d}" for i in range(10)]
    assert fit.split_calibration(uris, 0.25, 200) == (
        [u for u in uris if u not in ("03", "07")], ["03", "07"])
    assert fit.split_calibration(uris, 0.5, 2) == (
        [u for u in uris if u not in ("01", "03")], ["01", "03"])
    assert fit.split_calibration(uris[:3], 0.1, 200) == (uris[:2], ["02"])  # at least one
    assert fit.split_calibration(uris, 0.0, 200) == (uris, [])


# --------------------------------------------------------------------------- distributed == single process


def test_fit_job_bank_equals_single_process_fit(local_bank: Path, dataset: Path) -> None:
    torch.set_num_threads(1)
    uris = storage.list_images(str(dataset / "train"))
    train, held_out = fit.split_calibration(uris, 0.25, 200)
    reference = model.fit(model.load_images(train, SPEC), SPEC, ratio=0.1, seed=0,
                          calibration_images=model.load_images(held_out, SPEC),
                          target_fpr=0.01, image_ids=train).bank
    bank = storage.load_bank(str(local_bank), SPEC)
    assert bank.image_ids == reference.image_ids
    assert torch.equal(bank.ys, reference.ys) and torch.equal(bank.xs, reference.xs)
    torch.testing.assert_close(bank.features, reference.features, rtol=1e-5, atol=1e-5)
    assert bank.image_threshold == pytest.approx(reference.image_threshold, rel=1e-5)
    assert bank.pixel_threshold == pytest.approx(reference.pixel_threshold, rel=1e-5)
    assert bank.info["fit"]["calibration"]["images"] == 4 and bank.info["fit"]["train_images"] == 12
    # for `score --incremental`: the bank's name (no --bank-id: the folder's) and nominal scores
    assert bank.info["bank_id"] == local_bank.name
    np.testing.assert_allclose(bank.info["fit"]["calibration"]["scores"],
                               reference.info["calibration"]["scores"], rtol=1e-5)


def test_score_equals_single_process_predict(local_results: Path, local_bank: Path, dataset: Path) -> None:
    torch.set_num_threads(1)
    rows = read_scores(str(local_results))
    uris = [r["uri"] for r in rows]
    reference = model.predict(model.load(str(local_bank)), model.load_images(uris, SPEC))
    np.testing.assert_allclose([r["score"] for r in rows], reference.scores.numpy(), rtol=1e-5, atol=1e-5)
    manifest = storage.read_manifest(str(local_results), "results")
    bank = storage.load_bank(str(local_bank))
    assert [r["anomalous"] for r in rows] == [r["score"] > bank.image_threshold for r in rows]
    for row, ref_map in zip(rows, reference.maps):
        raw = np.load(map_uri(str(local_results), relative_key(row["uri"], manifest["input_root"]), "raw"))
        assert raw.dtype == np.float16 and raw.shape == (SPEC.crop, SPEC.crop)
        np.testing.assert_allclose(raw.astype(np.float32), ref_map.numpy(), rtol=1e-3, atol=1e-3)
        with Image.open(row["uri"]) as image:
            assert (row["width"], row["height"]) == image.size
        heat = np.asarray(Image.open(map_uri(str(local_results), relative_key(row["uri"], manifest["input_root"]), "png")))
        mask = np.asarray(Image.open(map_uri(str(local_results), relative_key(row["uri"], manifest["input_root"]), "mask")))
        assert heat.shape == mask.shape == (row["height"], row["width"]) and heat.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        # fixed range: the pixel threshold sits at 127.5, so mask pixels are exactly those >= 128
        np.testing.assert_array_equal(mask == 255, heat >= 128)
        assert heat[row["max_y"], row["max_x"]] >= int(heat.max()) - 2  # maximum, in input pixels
    assert Path(local_results, "maps", "good", "000.png.png").is_file()


def test_start_up_and_steady_state_are_reported_apart(local_results: Path, local_bank: Path) -> None:
    timing = storage.read_manifest(str(local_results), "results")["timing"]
    inputs = storage.read_manifest(str(local_results), "results")["counts"]["inputs"]
    assert 0 < timing["startup_s"] and timing["startup_s"] + timing["steady_s"] <= timing["wall_s"]
    assert 0 < timing["steady_images"] < inputs  # every row but the first batch's
    assert timing["steady_images_per_s"] == pytest.approx(timing["steady_images"] / timing["steady_s"])
    # the steady window starts when the actors' first batch came out, not when a later stage
    # handed its rows back
    assert timing["last_rows_unix"] - timing["first_rows_unix"] == pytest.approx(timing["steady_s"])
    calibration = storage.read_manifest(str(local_bank), "bank")["info"]["fit"]["calibration"]
    assert calibration["timing"]["startup_s"] > 0


def test_inputs_equal_scored_plus_errors(local_results: Path, dataset: Path) -> None:
    inputs = storage.list_images(str(dataset / "test"))
    scored = [r["uri"] for r in read_scores(str(local_results))]
    errors = pq.read_table(local_results / "errors" / "part-00001.parquet").to_pylist()
    assert sorted(scored + [e["uri"] for e in errors]) == inputs  # each input exactly once
    assert {Path(e["uri"]).name for e in errors} == {"corrupt.png", "empty.png"}
    assert all(e["error"] for e in errors)
    counts = storage.read_manifest(str(local_results), "results")["counts"]
    assert counts == {"inputs": 10, "scored": 8, "errors": 2}


def test_cli_exit_status_follows_max_failures(local_results: Path, local_bank: Path, dataset: Path) -> None:
    argv = ["--bank", str(local_bank), "--images", str(dataset / "test"), "--out", str(local_results),
            "--raw-maps", *PIPELINE_FLAGS]
    with pytest.raises(SystemExit) as exit_info:
        score.main(argv)  # committed: a no-op that still reports the 2 failures
    assert exit_info.value.code == 2
    score.main([*argv, "--max-failures", "2"])  # tolerated: returns normally


def test_extract_cli_writes_features_of_readable_images_and_records_errors(
    ray_local: None, dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "features"
    with pytest.raises(SystemExit) as exit_info:  # 2 unreadable inputs > --max-failures 0
        extract.main(["--train", str(dataset / "test"), "--out", str(out), *MODEL_FLAGS,
                      *PIPELINE_FLAGS])
    assert exit_info.value.code == 2
    manifest = storage.read_manifest(str(out), "features")
    assert manifest["counts"] == {"inputs": 10, "extracted": 8, "errors": 2, "patches": 8 * 64}
    assert [s["rows"] for s in manifest["shards"]] == [4 * 64, 2 * 64, 2 * 64]
    assert manifest["errors"] == ["errors/part-00001.parquet"] and manifest["embed_dim"] == 32
    uris = storage.list_images(str(dataset / "test"))
    readable = [u for u in uris if not u.endswith(("corrupt.png", "empty.png"))]
    torch.set_num_threads(1)
    expected = model.embed_images(backbone.load_backbone(SPEC), model.load_images(readable, SPEC), SPEC)
    rows = [storage.read_feature_shard(str(out / s["file"])) for s in manifest["shards"]]
    features = torch.cat([r["feature"] for r in rows])  # float16 in the store
    torch.testing.assert_close(features, expected.reshape(-1, 32).half().float(), rtol=2e-3, atol=2e-3)
    assert [i for r in rows for i in r["image_id"]] == [u for u in readable for _ in range(64)]


@pytest.mark.parametrize("command", ["extract", "score"])
def test_cli_refuses_model_actors_that_leave_no_cpu_for_decoding(
    command: str, local_bank: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Ray in tests has 2 CPUs: two 1-CPU actors leave nothing for the decode tasks.
    inputs = {"extract": ["--train", str(dataset / "train"), *MODEL_FLAGS],
              "score": ["--bank", str(local_bank), "--images", str(dataset / "test")]}[command]
    argv = [command, *inputs, "--out", str(tmp_path / "out"), "--workers", "2", "--cpus-per-worker", "1",
            "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"patchcore {command}: error: --workers 2 x --cpus-per-worker 1 reserve 2 of")
    assert "wait forever" in error and "--workers 1 or --cpus-per-worker 0.875 with --workers 2" in error


@pytest.mark.parametrize(
    ("nodes", "cpus_per_worker", "expected"),
    [([2.0], 1.0, (2, 0.875)), ([2.0], 2.0, (1, 1.75)), ([16.0] * 3, 1.0, (48, 0.9843)),
     ([4.0, 16.0], 1.0, (20, 0.9375)), ([8.0, 6.0], 2.0, (7, 1.9166))],
)
def test_automatic_cpu_actors_leave_every_node_room_for_a_decode_task(
    nodes: list[float], cpus_per_worker: float, expected: tuple[int, float]
) -> None:
    workers, share = _shards._auto_cpu_actors(nodes, cpus_per_worker)
    assert (workers, share) == expected
    # packed per node as planned, each node keeps DECODE_CPUS; whatever Ray's placement, the
    # total spare is then >= nodes x DECODE_CPUS, so some node can always start a decode task
    per_node = [max(1, int((c - _shards.DECODE_CPUS) // share)) for c in nodes]
    assert sum(per_node) == workers
    assert all(c - k * share >= _shards.DECODE_CPUS for c, k in zip(nodes, per_node))


@pytest.mark.timeout(300)  # a hang fails here instead of stalling the suite
@pytest.mark.parametrize(
    "flags",
    [["--workers", "2"], ["--cpus-per-worker", "2"], ["--workers", "2", "--cpus-per-worker", "0.875"]],
)
def test_extract_with_all_cpus_for_actors_runs_or_is_refused_never_hangs(
    ray_local: None, dataset: Path, tmp_path: Path, flags: list[str]
) -> None:
    out = tmp_path / "features"
    argv = ["--train", str(dataset / "train"), "--out", str(out), *MODEL_FLAGS, "--batch-size", "4",
            "--shard-size", "4", "--device", "cpu", *flags]
    try:
        status = extract.run(_cli.parse_config(extract.ExtractConfig, argv))
    except ValueError as err:
        assert "--workers" in str(err) and "--cpus-per-worker" in str(err)
        return
    assert status == 0
    assert storage.read_manifest(str(out), "features")["counts"]["extracted"] == NUM_TRAIN


_REFAULTS = """
import resource, sys
import numpy as np
from jobs.cluster import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
np.ones(8 << 20)  # 64 MiB written, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(8 << 20)  # the same size again: fresh pages, or the freed ones
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_reuses_freed_pages_instead_of_faulting_in_new_ones() -> None:
    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _REFAULTS, mode], cwd=Path(__file__).parents[1],
                             capture_output=True, text=True, check=True, timeout=120).stdout.split()
        return out[0], int(out[1])

    # 64 MiB of fresh pages is >= 32 faults even with 2 MiB transparent huge pages.
    assert run("default")[1] > 16
    kept, faults = run("keep")
    assert kept == "True" and faults <= 16


def test_score_refuses_png_maps_without_a_pixel_threshold(dataset: Path, tmp_path: Path) -> None:
    coords = torch.zeros(2, dtype=torch.int64)
    bank = Bank(spec=SPEC, features=torch.zeros(2, 32), image_ids=("a", "b"), ys=coords, xs=coords,
                projection_seed=0, coverage_radius=0.0)  # uncalibrated: no thresholds
    storage.save_bank(str(tmp_path / "bank"), bank)
    with pytest.raises(ValueError, match="--no-maps"):
        run_score(str(tmp_path / "bank"), str(dataset / "test"), str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_score_ivf_flat_records_engine_and_recall_in_the_manifest(
    local_results: Path, local_bank: Path, dataset: Path, tmp_path: Path
) -> None:
    exact = storage.read_manifest(str(local_results), "results")["knn"]
    assert exact["engine"] == "faiss-cpu-exact" and exact["recall"] is None
    out = tmp_path / "ivf"
    status = run_score(str(local_bank), str(dataset / "test"), str(out), "--no-maps",
                       "--knn", "ivf-flat", "--knn-nlist", "2", "--knn-nprobe", "1")
    assert status == 2  # the two unreadable inputs
    summary = storage.read_manifest(str(out), "results")["knn"]
    assert summary["method"] == "ivf-flat" and summary["engine"] == "faiss-cpu-ivf-flat"
    assert summary["params"]["nlist"] == 2 and summary["params"]["nprobe"] == 1
    recall = summary["recall"]
    # one actor, whose first batch holds readable images: up to RECALL_IMAGES x 8 x 8 patches
    assert recall["measurements"] == 1 and 0 < recall["num_queries"] <= score.RECALL_IMAGES * 64
    assert recall["recall_at_1"] == recall["hits"] / recall["num_queries"]
    assert 0.0 <= recall["recall_at_1"] <= 1.0 and recall["distance_ratio_mean"] >= 1.0
    assert len(recall["images"]) >= 1
    # scores are those of the same index in the single-process model
    rows = read_scores(str(out))
    patchcore = model.load(str(local_bank))
    patchcore.index = knn.build_index(patchcore.bank.features, "cpu",
                                      knn.KnnOptions(method="ivf-flat", nlist=2, nprobe=1))
    reference = model.predict(patchcore, model.load_images([r["uri"] for r in rows], SPEC))
    np.testing.assert_allclose([r["score"] for r in rows], reference.scores.numpy(), rtol=1e-5, atol=1e-5)


def test_score_refuses_knn_parameters_that_do_not_fit_the_bank(local_bank: Path, dataset: Path,
                                                               tmp_path: Path) -> None:
    entries = storage.read_manifest(str(local_bank), "bank")["counts"]["num_entries"]
    with pytest.raises(ValueError, match=rf"nlist must be <= the bank's {entries} entries"):
        run_score(str(local_bank), str(dataset / "test"), str(tmp_path / "r"), "--knn", "ivf-flat",
                  "--knn-nlist", str(entries + 1))
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- commit, resume, no-op


def test_rerun_into_committed_folder_is_a_noop(local_results: Path, local_bank: Path, dataset: Path) -> None:
    before = mtimes(local_results)
    assert run_score(str(local_bank), str(dataset / "test"), str(local_results)) == 2
    assert mtimes(local_results) == before
    with pytest.raises(ValueError, match="--overwrite"):
        run_score(str(local_bank), str(dataset / "test"), str(local_results), "--no-maps")


def test_dry_run_writes_nothing(local_bank: Path, dataset: Path, tmp_path: Path) -> None:
    assert run_score(str(local_bank), str(dataset / "test"), str(tmp_path / "r"), "--dry-run") == 0
    assert not (tmp_path / "r").exists()


def test_rerun_redoes_only_the_uncommitted_shard(
    local_results: Path, local_bank: Path, dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    shutil.copytree(local_results, out)  # copy2 keeps the mtimes
    first = read_scores(str(out))
    # simulate a crash while shard 0 (bad/000..003) was being written: no manifest, no commit record
    manifest = storage.read_manifest(str(out), "results")
    (out / "manifest.json").unlink()
    (out / "_shards" / "part-00000.json").unlink()
    (out / "scores" / "part-00000.parquet").unlink()
    shard0 = [r["uri"] for r in first[:4]]
    for uri in shard0[:2]:
        Path(map_uri(str(out), relative_key(uri, manifest["input_root"]), "png")).unlink()
    (out / "_job.json").write_text(json.dumps(manifest["identity"], sort_keys=True))
    before = mtimes(out)
    assert run_score(str(local_bank), str(dataset / "test"), str(out)) == 2
    after = mtimes(out)
    redone = {k for k in after if k not in before or after[k] != before[k]}
    shard0_files = {f"{sub}/{Path(u).parent.name}/{Path(u).name}{ext}" for u in shard0
                    for sub, ext in (("maps", ".png"), ("masks", ".png"), ("maps_raw", ".npy"))}
    assert redone == shard0_files | {"scores/part-00000.parquet", "_shards/part-00000.json",
                                     "manifest.json"}
    assert "_job.json" not in after
    again = read_scores(str(out))
    assert [r["uri"] for r in again] == [r["uri"] for r in first]
    np.testing.assert_allclose([r["score"] for r in again], [r["score"] for r in first], rtol=1e-6)


# --------------------------------------------------------------------------- object storage


def test_fit_and_score_on_s3_match_local(
    s3_server: str, ray_local: None, local_results: Path, local_bank: Path
) -> None:
    root = f"s3://{s3_server}/e2e"
    make_dataset(root)
    assert run_fit(f"{root}/train", f"{root}/bank") == 0
    assert run_score(f"{root}/bank", f"{root}/test", f"{root}/results") == 2
    bank, local = storage.load_bank(f"{root}/bank"), storage.load_bank(str(local_bank))
    torch.testing.assert_close(bank.features, local.features)
    assert bank.image_threshold == pytest.approx(local.image_threshold, rel=1e-6)
    assert storage.read_manifest(f"{root}/bank/_features", "features")["counts"]["extracted"] == 12
    manifest = storage.read_manifest(f"{root}/results", "results")
    assert manifest["counts"] == {"inputs": 10, "scored": 8, "errors": 2}
    rows, local_rows = read_scores(f"{root}/results"), read_scores(str(local_results))
    assert [r["rel"] for r in rows] == [r["rel"] for r in local_rows]
    np.testing.assert_allclose([r["score"] for r in rows], [r["score"] for r in local_rows], rtol=1e-5)
    for row in rows:
        assert row["uri"].startswith(f"{root}/test/")
        for kind in ("png", "mask", "raw"):
            assert storage.exists(map_uri(f"{root}/results", relative_key(row["uri"], manifest["input_root"]), kind))
    text = json.dumps(manifest)
    assert "testing" not in text  # the moto credentials never reach an artifact


def test_full_frame_fit_and_score_cover_every_input_pixel(
    ray_local: None, dataset: Path, tmp_path: Path
) -> None:
    bank, out = tmp_path / "bank", tmp_path / "results"
    argv = ["--train", str(dataset / "train"), "--out", str(bank), *MODEL_FLAGS, *PIPELINE_FLAGS,
            *FIT_FLAGS, "--frame", "full", "--aggregation", "authors"]
    assert fit.run(_cli.parse_config(fit.FitConfig, argv)) == 0
    spec = storage.load_bank(str(bank)).spec
    assert (spec.frame, spec.aggregation) == ("full", "authors")  # recorded in the bank
    assert run_score(str(bank), str(dataset / "test" / "bad"), str(out)) == 0
    rows = read_scores(str(out))
    manifest = storage.read_manifest(str(out), "results")
    reference = model.predict(model.load(str(bank)), model.load_images([r["uri"] for r in rows], spec))
    np.testing.assert_allclose([r["score"] for r in rows], reference.scores.numpy(), rtol=1e-5, atol=1e-5)
    for row, ref_map in zip(rows, reference.maps):
        raw = np.load(map_uri(str(out), relative_key(row["uri"], manifest["input_root"]), "raw")).astype(np.float32)
        np.testing.assert_allclose(raw, ref_map.numpy(), rtol=1e-3, atol=1e-3)
        heat = np.asarray(Image.open(map_uri(str(out), relative_key(row["uri"], manifest["input_root"]), "png")))
        expected = preprocess.uncrop_map(ref_map, row["width"], row["height"], spec.resize, spec.crop,
                                         frame="full")
        # every input pixel, the outermost rows and columns included, carries the map
        assert (expected > 0).all()
        np.testing.assert_allclose(heat.astype(np.float32),
                                   score.heatmap_pixels(expected, storage.load_bank(str(bank)).pixel_threshold),
                                   atol=1)


def test_low_rank_fit_and_score_match_single_process_and_store_the_rank(
    ray_local: None, dataset: Path, tmp_path: Path
) -> None:
    # --embed-dim 256 with 40 + 112 channels: extract stores 152-wide features, the coreset
    # actors project them with basis^T ψ, score searches 152-wide; all as model.py does.
    torch.set_num_threads(1)
    spec = dataclasses.replace(SPEC, embed_dim=256)
    bank_uri, out = tmp_path / "bank", tmp_path / "results"
    argv = ["--train", str(dataset / "train"), "--out", str(bank_uri), *MODEL_FLAGS,
            *PIPELINE_FLAGS, *FIT_FLAGS, "--embed-dim", "256"]
    assert fit.run(_cli.parse_config(fit.FitConfig, argv)) == 0
    store = storage.read_manifest(str(bank_uri / fit.FEATURES_DIR), "features")
    assert (store["embed_dim"], store["feature_width"]) == (256, 152)
    bank = storage.load_bank(str(bank_uri), spec)
    assert bank.features.shape[1] == 152
    uris = storage.list_images(str(dataset / "train"))
    train, held_out = fit.split_calibration(uris, 0.25, 200)
    reference = model.fit(model.load_images(train, spec), spec, ratio=0.1, seed=0,
                          calibration_images=model.load_images(held_out, spec),
                          target_fpr=0.01, image_ids=train).bank
    assert bank.image_ids == reference.image_ids
    torch.testing.assert_close(bank.features, reference.features, rtol=1e-5, atol=1e-5)
    assert run_score(str(bank_uri), str(dataset / "test" / "bad"), str(out)) == 0
    rows = read_scores(str(out))
    expected = model.predict(model.load(str(bank_uri)), model.load_images([r["uri"] for r in rows], spec))
    np.testing.assert_allclose([r["score"] for r in rows], expected.scores.numpy(), rtol=1e-5, atol=1e-5)
