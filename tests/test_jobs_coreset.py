"""jobs.coreset on a local Ray: K actors select exactly the single-process greedy coreset (§3.2)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from jobs import coreset as coreset_job
from patchcore_core import coreset, storage
from patchcore_core.features import coreset_projection, feature_width, stored_factors
from patchcore_core.spec import ModelSpec

SPEC = ModelSpec(
    backbone="efficientnet_lite0", weights="none", layers=("blocks.2", "blocks.4"),
    resize=64, crop=64, embed_dim=32,
)
# embed_dim 256 with 40 + 112 channels: features stored as 152 low-rank coordinates
LOW_RANK_SPEC = dataclasses.replace(SPEC, embed_dim=256)
SHARD_ROWS = (500, 700, 0, 300, 500)  # an empty shard too; 2000 patches
PROJECTION_DIM = 8
RATIO = 0.05  # 100 greedy steps
# actors in tests take at most half a CPU: the session's Ray has 2 CPUs shared by every test
CPUS = "0.5"


def _provenance(row: int) -> tuple[str, int, int]:
    """Unique (image_id, y, x) of global row `row`: 64 patches (8 x 8) per image."""
    return f"img-{row // 64:04d}.png", (row % 64) // 8, row % 8


def make_feature_store(uri: str, seed: int = 0, spec: ModelSpec = SPEC) -> torch.Tensor:
    """Write a clustered float16 feature store; returns its (N, W) rows as float32, shard order
    (W = feature_width(spec)).

    The last shard repeats rows of the first one, so exact ties cross actor boundaries.
    """
    rng = np.random.default_rng(seed)
    num_rows, dim = sum(SHARD_ROWS), feature_width(spec)
    centres = rng.standard_normal((16, dim)) * 4
    rows = centres[rng.integers(0, 16, num_rows)] + rng.standard_normal((num_rows, dim))
    rows[-200:] = rows[:200]  # duplicates in shard 4 of rows in shard 0
    features = torch.from_numpy(rows.astype(np.float16).astype(np.float32))
    shards, lo = [], 0
    for number, count in enumerate(SHARD_ROWS):
        name = f"part-{number:05d}.parquet"
        prov = [_provenance(r) for r in range(lo, lo + count)]
        storage.write_feature_shard(
            storage.join_uri(uri, name), [p[0] for p in prov],
            torch.tensor([p[1] for p in prov], dtype=torch.int64),
            torch.tensor([p[2] for p in prov], dtype=torch.int64),
            features[lo : lo + count], dtype="float16",
        )
        shards.append({"file": name, "rows": count})
        lo += count
    manifest = {"spec": spec.to_json(), "embed_dim": spec.embed_dim, "feature_width": dim,
                "dtype": "float16", "shards": shards}
    storage.write_manifest(uri, manifest, kind="features")
    return features


def reference(features: torch.Tensor, seed: int = 0, spec: ModelSpec = SPEC) -> coreset.CoresetResult:
    """Single-process greedy on the whole projected matrix (the contract of the job)."""
    projected = features @ coreset_projection(spec, PROJECTION_DIM, seed)
    num_samples = coreset.coreset_size(len(features), RATIO, None)
    return coreset.greedy_coreset(projected, num_samples, start=coreset.first_index(len(features), seed))


def bank_rows(uri: str, spec: ModelSpec = SPEC) -> tuple[list[int], storage.Bank]:
    """Global rows of a bank's entries, recovered from their provenance."""
    bank = storage.load_bank(uri, expected_spec=spec)
    where = {_provenance(r): r for r in range(sum(SHARD_ROWS))}
    rows = [where[(i, int(y), int(x))] for i, y, x in zip(bank.image_ids, bank.ys, bank.xs)]
    return rows, bank


def job_args(features: str, out: str, workers: int, *extra: str) -> list[str]:
    return [
        "--features", features, "--out", out, "--ratio", str(RATIO),
        "--projection-dim", str(PROJECTION_DIM), "--workers", str(workers),
        "--cpus-per-worker", CPUS, "--device", "cpu", *extra,
    ]


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.Tensor]:
    uri = str(tmp_path_factory.mktemp("features"))
    return uri, make_feature_store(uri)


def test_partition_gives_contiguous_balanced_nonempty_groups() -> None:
    for rows, workers in [((5, 5, 5, 5), 2), ((1, 0, 100, 1, 1), 3), ((3,), 4), ((0, 9, 0, 9), 5)]:
        groups = coreset_job.partition(rows, workers)
        flat = [s for g in groups for s in g]
        assert flat == [i for i, r in enumerate(rows) if r > 0]  # every non-empty shard, in order
        assert 1 <= len(groups) <= workers and all(groups)
    assert coreset_job.partition((5, 5, 5, 5), 2) == [[0, 1], [2, 3]]


@pytest.fixture(scope="module")
def s3_store(s3_server: str) -> tuple[str, torch.Tensor]:
    uri = f"s3://{s3_server}/coreset/features"
    return uri, make_feature_store(uri, seed=1)


@pytest.fixture(scope="module")
def local_bank(
    local_store: tuple[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory, ray_local: None
) -> Path:
    """A bank committed by a 1-actor run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("bank1") / "bank"
    coreset_job.main(job_args(local_store[0], str(out), 1))
    return out


@pytest.mark.parametrize("workers, where", [(1, "local"), (2, "s3"), (3, "local")])
def test_job_selects_single_process_greedy_indices(
    workers: int, where: str, request: pytest.FixtureRequest, tmp_path: Path, ray_local: None
) -> None:
    if where == "local" and workers == 1:
        uri, features = request.getfixturevalue("local_store")
        out = str(request.getfixturevalue("local_bank"))
    else:
        uri, features = request.getfixturevalue(f"{where}_store")
        bucket = request.getfixturevalue("s3_server")
        out = f"s3://{bucket}/coreset/bank-{workers}" if where == "s3" else str(tmp_path / "bank")
        coreset_job.main(job_args(uri, out, workers))
    expected = reference(features, seed=0)
    rows, bank = bank_rows(out)
    assert rows == expected.indices.tolist()
    torch.testing.assert_close(bank.features, features[rows], rtol=0, atol=0)
    assert math.isclose(bank.coverage_radius, expected.radius, rel_tol=1e-6)
    assert bank.projection_seed == 0
    assert not storage.exists(storage.join_uri(out, coreset_job.CHECKPOINT))


def test_job_on_a_low_rank_store_selects_the_d_dim_coreset(tmp_path: Path, ray_local: None) -> None:
    # Each actor projects the 152 stored coordinates z with basis^T ψ, so the selection is the
    # one ψ gives the D-dim features basis @ z (the single-process fit does the same).
    uri = str(tmp_path / "features")
    stored = make_feature_store(uri, seed=2, spec=LOW_RANK_SPEC)
    assert stored.shape[1] == 152
    out = str(tmp_path / "bank")
    coreset_job.main(job_args(uri, out, 2))
    rows, bank = bank_rows(out, LOW_RANK_SPEC)
    assert rows == reference(stored, seed=0, spec=LOW_RANK_SPEC).indices.tolist()
    wide = (stored.double() @ stored_factors(LOW_RANK_SPEC).basis.T).float()  # (N, 256)
    wide_projected = wide @ coreset.projection_matrix(256, PROJECTION_DIM, 0)
    wide_selection = coreset.greedy_coreset(
        wide_projected, len(rows), start=coreset.first_index(len(stored), 0)
    )
    assert rows == wide_selection.indices.tolist()
    torch.testing.assert_close(bank.features, stored[rows], rtol=0, atol=0)


def test_feature_store_of_another_width_than_its_spec_is_refused(tmp_path: Path) -> None:
    uri = str(tmp_path / "features")
    make_feature_store(uri, spec=SPEC)  # 32 wide
    manifest = json.loads((tmp_path / "features" / "manifest.json").read_text())
    manifest["spec"] = LOW_RANK_SPEC.to_json()  # stores 152-wide features
    (tmp_path / "features" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="32 wide but its spec stores 152-wide.*patchcore extract"):
        coreset_job.read_feature_store(uri, {})


def test_rerun_without_overwrite_is_noop(local_bank: Path, local_store: tuple[str, torch.Tensor]) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in local_bank.iterdir()}
    coreset_job.main(job_args(local_store[0], str(local_bank), 2, "--seed", "5"))  # other config too
    assert {p.name: p.stat().st_mtime_ns for p in local_bank.iterdir()} == before


def test_overwrite_rebuilds_committed_bank(
    local_bank: Path, local_store: tuple[str, torch.Tensor], tmp_path: Path
) -> None:
    out = tmp_path / "bank"
    shutil.copytree(local_bank, out)
    before = (out / "features.npy").stat().st_mtime_ns
    coreset_job.main(job_args(local_store[0], str(out), 1, "--overwrite", "--seed", "4"))
    assert (out / "features.npy").stat().st_mtime_ns != before
    assert bank_rows(str(out))[0] == reference(local_store[1], seed=4).indices.tolist()


def test_resume_continues_greedy_from_checkpointed_centres(
    local_store: tuple[str, torch.Tensor], tmp_path: Path, ray_local: None
) -> None:
    uri, features = local_store
    num_points = len(features)
    start = coreset.first_index(num_points, 0)
    planted = [start, 7, 1900]  # not what greedy would pick: the result shows they were used
    cfg = coreset_job.CoresetConfig(features=uri, out=str(tmp_path / "bank"),
                                    projection_dim=PROJECTION_DIM)
    identity = coreset_job.checkpoint_identity(cfg, coreset_job.read_feature_store(uri, {}), start)
    checkpoint = tmp_path / "bank" / "_checkpoint" / "coreset.json"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text(json.dumps({**identity, "step": 3, "chosen": planted}))
    coreset_job.main(job_args(uri, str(tmp_path / "bank"), 2))

    # independent continuation: brute-force greedy from the planted centres
    projected = features @ coreset.projection_matrix(SPEC.embed_dim, PROJECTION_DIM, 0)
    min_sq = torch.full((num_points,), math.inf)
    chosen = list(planted)
    for index in chosen:
        min_sq = torch.minimum(min_sq, coreset.sq_distances_to(projected, projected[index]))
    while len(chosen) < coreset.coreset_size(num_points, RATIO, None):
        min_sq[chosen] = -1.0
        best = float(min_sq.max())
        index = int(torch.nonzero(min_sq == best)[0])  # smallest row among the largest distances
        chosen.append(index)
        min_sq = torch.minimum(min_sq, coreset.sq_distances_to(projected, projected[index]))
    assert bank_rows(str(tmp_path / "bank"))[0] == chosen


def test_checkpoint_of_another_run_is_refused(
    local_store: tuple[str, torch.Tensor], tmp_path: Path
) -> None:
    uri, _ = local_store
    checkpoint = tmp_path / "bank" / "_checkpoint" / "coreset.json"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text(json.dumps({"features": uri, "num_points": 5, "step": 1, "chosen": [0]}))
    with pytest.raises(ValueError, match="another run.*--overwrite"):
        coreset_job.main(job_args(uri, str(tmp_path / "bank"), 1))


def test_dry_run_reads_manifest_and_writes_nothing(
    local_store: tuple[str, torch.Tensor], tmp_path: Path
) -> None:
    uri, _ = local_store
    coreset_job.main(job_args(uri, str(tmp_path / "bank"), 1, "--dry-run"))
    assert not (tmp_path / "bank").exists()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        coreset_job.main(job_args(str(tmp_path / "nothing"), str(tmp_path / "bank"), 1, "--dry-run"))


def test_actor_killed_mid_run_is_restarted_to_identical_bank(
    local_store: tuple[str, torch.Tensor], tmp_path: Path, ray_local: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="jobs")
    uri, features = local_store
    out = tmp_path / "bank"
    checkpoint = out / "_checkpoint" / "coreset.json"
    # 100 steps with a checkpoint after each: the kill lands a few steps in
    argv = job_args(uri, str(out), 2, "--checkpoint-every", "1", "--retries", "1")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(coreset_job.main, argv)
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and not job.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        run_id = re.search(r"coreset run (\w+) on 2 cpu actor", caplog.text)
        assert run_id, caplog.text
        ray.kill(ray.get_actor(f"coreset-{run_id[1]}-0-1"))  # attempt 0, rank 1
        job.result(timeout=120)  # re-raises the job's error, if any
    assert re.search(r"restart 1/1 from step [1-9]", caplog.text)
    assert bank_rows(str(out))[0] == reference(features).indices.tolist()
