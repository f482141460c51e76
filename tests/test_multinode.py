"""The jobs on a 3-node Ray (head without CPUs + two 1-CPU workers, `ray.cluster_utils.Cluster`):
model and coreset actors land on both workers and the results equal the single-process reference
(DESIGN.md §6-§7), also after losing a node. One cluster for the module (~15 s to start); the
module takes ~2 min on an idle 2-core machine."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from test_jobs_coreset import SPEC as SPEC_CORESET
from test_jobs_coreset import bank_rows, job_args, make_feature_store, reference
import test_jobs_extract_score
from test_jobs_extract_score import MODEL_FLAGS, SPEC, read_scores

from jobs import coreset as coreset_job
from jobs import fit, score
from jobs.config import parse_config
from patchcore_core import coreset, model, storage
from patchcore_core.features import coreset_projection

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]  # a hang fails, not stalls

# Two 0.75-CPU model actors cannot share a 1-CPU worker: one lands on each, and each worker keeps
# 0.25 CPU for decode tasks (cluster.DECODE_CPUS).
MULTI_FLAGS = ["--workers", "2", "--cpus-per-worker", "0.75", "--batch-size", "2",
               "--shard-size", "4", "--device", "cpu"]

dataset = test_jobs_extract_score.dataset  # the same module-scoped fixture: tiny MVTec-style data


def worker_nodes() -> set[str]:
    """Node ids of the alive nodes with CPUs (the two workers)."""
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}


def model_actor_nodes(stage_actor: str, exclude: frozenset[str] = frozenset()) -> set[str]:
    """Nodes that held the Ray Data actors of class `stage_actor` (alive or dead) of this cluster,
    from Ray's own actor table: where the actors were placed, whether or not a batch reached them
    (with tiny data Ray Data may hand every batch to the actor that becomes free first).
    `exclude`: actor ids to leave out (those of earlier jobs)."""
    table = ray._private.state.actors()  # GCS actor table; the public state API needs a dashboard
    return {a["Address"]["NodeID"] for actor_id, a in table.items()
            if a["ActorClassName"] == f"MapWorker(MapBatches({stage_actor}))" and actor_id not in exclude}


def images_per_node(log_text: str, label: str) -> dict[str, int]:
    """The per-node image counts stream_shards logged for the stage `label` (last run)."""
    found = re.findall(rf"{label}: \d+ images in [\d.]+ s; images per Ray node: (\{{.*\}})", log_text)
    assert found, log_text[-2000:]
    return json.loads(found[-1])


@contextlib.contextmanager
def whole_pool_first() -> Iterator[None]:
    """Ray Data starts batches as soon as one pool actor is ready; wait for the whole pool (both
    actors placed, models loaded) first, as a long job would, so that the stage's record shows
    both workers and no actor is still pending when the test reads where they are."""
    context = ray.data.DataContext.get_current()
    saved, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 120
    try:
        yield
    finally:
        context.wait_for_min_actors_s = saved


@pytest.fixture(scope="module")
def fit_run(ray_cluster: object, dataset: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, str]:
    """A bank fitted on the cluster (extract -> coreset -> calibration), and the job's log."""
    handler = _ListHandler()
    logging.getLogger("jobs").addHandler(handler)
    level = logging.getLogger("jobs").level
    logging.getLogger("jobs").setLevel(logging.INFO)
    try:
        bank = tmp_path_factory.mktemp("fit") / "bank"
        argv = ["--train", str(dataset / "train"), "--out", str(bank), *MODEL_FLAGS, *MULTI_FLAGS,
                "--calibration-fraction", "0.25", "--ratio", "0.1", "--feature-dtype", "float32"]
        with whole_pool_first():
            assert fit.run(parse_config(fit.FitConfig, argv)) == 0
    finally:
        logging.getLogger("jobs").removeHandler(handler)
        logging.getLogger("jobs").setLevel(level)
    return bank, "\n".join(handler.lines)


class _ListHandler(logging.Handler):
    """Keeps formatted records (caplog is function-scoped; the fit runs once per module)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_fit_places_extract_coreset_and_calibration_actors_on_both_workers(
    fit_run: tuple[Path, str]
) -> None:
    bank_uri, log_text = fit_run
    workers = worker_nodes()
    # extract's and calibration's (ScoreActor) 0.75-CPU actors: one on each 1-CPU worker
    assert model_actor_nodes("FeatureActor") == workers
    assert model_actor_nodes("ScoreActor") == workers
    # the log's record of where each image was embedded: every image once, on those nodes
    extract_nodes = images_per_node(log_text, "extract")
    assert set(extract_nodes) <= workers and sum(extract_nodes.values()) == 12  # 4 held out
    calibrate_nodes = images_per_node(log_text, "calibrate")
    assert set(calibrate_nodes) <= workers and sum(calibrate_nodes.values()) == 4
    coreset_info = storage.load_bank(str(bank_uri), SPEC).info["coreset"]
    assert coreset_info["workers"] == 2 and set(coreset_info["nodes"]) == workers


def test_fit_on_three_nodes_equals_single_process_fit(fit_run: tuple[Path, str], dataset: Path) -> None:
    torch.set_num_threads(1)
    uris = storage.list_images(str(dataset / "train"))
    train, held_out = fit.split_calibration(uris, 0.25, 200)
    expected = model.fit(model.load_images(train, SPEC), SPEC, ratio=0.1, seed=0,
                         calibration_images=model.load_images(held_out, SPEC),
                         target_fpr=0.01, image_ids=train).bank
    bank = storage.load_bank(str(fit_run[0]), SPEC)
    assert bank.image_ids == expected.image_ids
    assert torch.equal(bank.ys, expected.ys) and torch.equal(bank.xs, expected.xs)
    torch.testing.assert_close(bank.features, expected.features, rtol=1e-5, atol=1e-5)
    assert bank.image_threshold == pytest.approx(expected.image_threshold, rel=1e-5)
    assert bank.pixel_threshold == pytest.approx(expected.pixel_threshold, rel=1e-5)


def test_score_on_both_workers_equals_single_process_predict_once_per_input(
    fit_run: tuple[Path, str], dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="jobs")
    earlier = frozenset(ray._private.state.actors())  # fit's calibration ran ScoreActors too
    out = tmp_path / "results"
    argv = ["--bank", str(fit_run[0]), "--images", str(dataset / "test"), "--out", str(out),
            *MULTI_FLAGS]
    with whole_pool_first():
        assert score.run(parse_config(score.ScoreConfig, argv)) == 2  # 2 unreadable, --max-failures 0
    assert model_actor_nodes("ScoreActor", exclude=earlier) == worker_nodes()
    nodes = images_per_node(caplog.text, "score")
    assert set(nodes) <= worker_nodes() and sum(nodes.values()) == 10
    rows = read_scores(str(out))
    errors = [e["uri"] for e in storage.read_table(str(out / "errors" / "part-00001.parquet")).to_pylist()]
    assert sorted([r["uri"] for r in rows] + errors) == storage.list_images(str(dataset / "test"))
    torch.set_num_threads(1)
    expected = model.predict(model.load(str(fit_run[0])), model.load_images([r["uri"] for r in rows], SPEC))
    np.testing.assert_allclose([r["score"] for r in rows], expected.scores.numpy(), rtol=1e-5, atol=1e-5)


def test_coreset_ranks_spread_over_both_workers_meet_on_the_given_port_and_select_single_process_indices(
    ray_cluster: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobs")
    uri = str(tmp_path / "features")
    features = make_feature_store(uri)
    out = str(tmp_path / "bank")
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    interface = socket.if_nameindex()[0][1]  # one this machine (all three nodes) has
    # 3 ranks of 0.5 CPU on two 1-CPU workers: spread puts them on both (at most 2 fit on one)
    coreset_job.main(job_args(uri, out, 3, "--placement", "spread", "--rendezvous-port", str(port),
                              "--network-interface", interface))
    assert re.search(rf"rendezvous at [\d.]+:{port};", caplog.text)
    expected = reference(features)
    rows, bank = bank_rows(out)
    assert rows == expected.indices.tolist()
    torch.testing.assert_close(bank.features, features[rows], rtol=0, atol=0)
    assert math.isclose(bank.coverage_radius, expected.radius, rel_tol=1e-6)
    layout = bank.info["coreset"]
    assert layout["workers"] == 3 and set(layout["nodes"]) == worker_nodes()


def test_coreset_rank_without_the_network_interface_fails_naming_the_ones_it_has_without_restarts(
    ray_cluster: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobs")
    uri = str(tmp_path / "features")
    make_feature_store(uri)
    interface = socket.if_nameindex()[0][1]
    with pytest.raises(ValueError, match=r"--network-interface 'nosuch0': node [\d.]+ has no "
                                         rf"such interface, only \[.*'{interface}'"):
        coreset_job.main(job_args(uri, str(tmp_path / "bank"), 2, "--network-interface", "nosuch0"))
    assert "restart" not in caplog.text  # a bad flag: restarting cannot help


def test_coreset_ranks_that_cannot_all_be_placed_fail_naming_the_fix(
    ray_cluster: object, tmp_path: Path
) -> None:
    uri = str(tmp_path / "features")
    make_feature_store(uri)
    # 3 ranks of 1 CPU on 2 CPUs: never all at once; no rank may start and wait on the others
    argv = job_args(uri, str(tmp_path / "bank"), 3, "--placement-timeout-s", "2")
    argv[argv.index("--cpus-per-worker") + 1] = "1"
    with pytest.raises(TimeoutError, match=r"3 actors of \{'CPU': 1.0\}.*room for 2 such actors. "
                                           r"Use --workers 2 or a smaller --cpus-per-worker"):
        coreset_job.main(argv)
    assert ray.available_resources().get("CPU") == 2.0  # the placement group was removed


@pytest.mark.parametrize(
    "nodes, workers, cpus_per_worker, decode",
    [([1.0, 1.0], 2, 0.75, 0.25),  # 0.5 spare in all, but 0.25 on each node
     ([2.0], 1, 0.5, 1.0), ([4.0, 4.0], 3, 1.0, 1.0), ([1.0, 2.0], 2, 0.5, 1.0)],
)
def test_decode_tasks_of_explicit_actors_fit_on_one_node(
    monkeypatch: pytest.MonkeyPatch, nodes: list[float], workers: int, cpus_per_worker: float,
    decode: float,
) -> None:
    # Found on the 3-node cluster: 0.5-CPU decode tasks waited forever next to 0.75-CPU actors.
    from jobs import cluster
    from jobs.config import ActorFlags

    monkeypatch.setattr(cluster, "node_cpus", lambda: nodes)
    flags = ActorFlags(workers=workers, cpus_per_worker=cpus_per_worker, device="cpu")
    assert cluster.resolve_resources(flags, "cpu") == (workers, cpus_per_worker, decode)


def _step(checkpoint: Path) -> int:
    """Greedy steps saved in a coreset checkpoint (0 while none, or while it is being written)."""
    try:
        return int(json.loads(checkpoint.read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_coreset_resumes_to_identical_bank_after_losing_a_worker_node(
    ray_cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Last in the module: one worker node is killed (SIGKILL, as a crashed VM) and replaced after.
    caplog.set_level(logging.INFO, logger="jobs")
    uri = str(tmp_path / "features")
    features = make_feature_store(uri)
    out = tmp_path / "bank"
    checkpoint = out / "_checkpoint" / "coreset.json"
    # 2 ranks of 0.5 CPU spread over both workers; 400 steps, a checkpoint after each; after the
    # loss the placement group re-reserves the lost rank's bundle on the surviving node
    argv = ["--features", uri, "--out", str(out), "--size", "400", "--projection-dim", "8",
            "--workers", "2", "--cpus-per-worker", "0.5", "--device", "cpu", "--placement",
            "spread", "--checkpoint-every", "1", "--retries", "3", "--placement-timeout-s", "120"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(coreset_job.main, argv)
        deadline = time.monotonic() + 120
        while _step(checkpoint) < 5 and not job.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        run_id = re.search(r"coreset run (\w+) on 2 cpu actor", caplog.text)
        assert run_id and not job.done(), caplog.text
        lost = ray.get(ray.get_actor(f"coreset-{run_id[1]}-0-1").node.remote())
        (node,) = [n for n in ray_cluster.worker_nodes if n.node_id == lost]
        ray_cluster.remove_node(node, allow_graceful=False)
        job.result(timeout=240)  # re-raises the job's error, if any
    ray_cluster.add_node(num_cpus=1)  # the replacement an autoscaler would start
    ray_cluster.wait_for_nodes()
    # one restart: the survivors' failure waits for Ray to settle that the node is gone
    assert re.findall(r"restart (\d)/3 from step (\d+)", caplog.text)[0][0] == "1"
    assert re.search(rf"node\(s\) \['{lost[:8]}'\] lost", caplog.text), caplog.text
    num_points = len(features)
    projected = features @ coreset_projection(SPEC_CORESET, 8, 0)
    expected = coreset.greedy_coreset(projected, 400, start=coreset.first_index(num_points, 0))
    rows, bank = bank_rows(str(out))
    assert rows == expected.indices.tolist()
    layout = bank.info["coreset"]
    assert layout["restarts"] == 1 and lost not in layout["nodes"]
