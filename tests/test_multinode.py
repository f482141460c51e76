"""The jobs on a 3-node Ray (head without CPUs + two 1-CPU workers, `ray.cluster_utils.Cluster`):
model and coreset actors land on both workers and the results equal the single-process reference
(DESIGN.md §6-§7), also after losing a node: mid-coreset, mid-score (killed; SIGTERM as a spot
preemption) and mid-extract, each time replaced. One cluster for the module (~15 s to start);
~2 min on an idle 2-core machine without the mid-job node-loss tests; the whole module took 5 min
on a loaded one (load ~5), 3.4 min of it the node-loss tests and their reference score."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from test_jobs_coreset import SPEC as SPEC_CORESET
from test_jobs_coreset import bank_rows, job_args, make_feature_store, reference
import test_jobs_extract_score
from test_jobs_extract_score import MODEL_FLAGS, SPEC, read_scores

from jobs import coreset as coreset_job
from jobs import extract, fit, score
from jobs.config import parse_config
from jobs.folders import RESULT_MAPS, map_uri
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


@pytest.mark.parametrize(
    "nodes, workers, actor_cpus, decode, remote, slots",
    [([2.0], 2, 0.875, 0.25, False, 1),  # this machine: the actors leave one 0.25-CPU task
     ([16.0, 16.0], 2, 1.0, 1.0, False, 30), ([1.0, 1.0], 2, 0.75, 0.25, False, 2),
     ([16.0], 1, 1.0, 1.0, True, None)],  # a remote cluster may grow: Ray Data's own limit
)
def test_task_stages_run_at_most_the_tasks_the_spare_cpus_hold(
    monkeypatch: pytest.MonkeyPatch, nodes: list[float], workers: int, actor_cpus: float,
    decode: float, remote: bool, slots: int | None,
) -> None:
    # Without the cap, CPUs freed by the actors at the end of a run started a burst of new task
    # workers, each importing torch for milliseconds of work.
    from jobs import cluster

    monkeypatch.setattr(cluster, "node_cpus", lambda: nodes)
    monkeypatch.setattr(cluster, "on_remote_cluster", lambda: remote)
    assert cluster.task_slots(workers, actor_cpus, decode) == slots


def test_cpu_actors_run_forwards_of_a_few_images_and_gpus_the_whole_batch() -> None:
    from jobs import cluster

    assert cluster.forward_batch("cpu", 32) == cluster.CPU_FORWARD_BATCH == 4
    assert cluster.forward_batch("cpu", 3) == 3 and cluster.forward_batch("cpu", 0) == 1
    assert cluster.forward_batch("cuda", 32) == 32 and cluster.forward_batch("cuda:1", 64) == 64


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



# --------------------------------------------------------------------------- node loss mid-job
# A worker node is lost while score or extract streams: right after the driver committed its
# first shard, while a held batch of another shard sits in one model actor, the node under that
# actor is killed (a crashed VM) or sent SIGTERM (a spot preemption), and a 1-CPU node replaces
# it (an autoscaler's). The run must end with every input once, the committed shard untouched,
# and the outputs of an uninterrupted run.
# Deterministic by construction: exactly one batch is held (the first batch at position >= 4 to
# start in an actor), and each actor gets one batch at a time (Ray 2.60 queues 2 per actor by
# default), so no other batch waits behind the held one: the other actor scores every other
# batch, the decode tasks end, score's write_files tasks get their CPU budget (Ray Data gives
# them none while the actors and decode tasks hold the 2 CPUs), a shard without the held batch
# is committed, and only then is the node lost. (The first version held every batch at position
# >= 4 with 2 queued per actor: all 4 slots could hold, and the run hung.)
# Without a replacement node the dead actor's batch waits until the surviving actor is released
# at the end of the stream (150-650 s measured on a loaded 2-core machine): not a CI test.

NODE_LOSS_TIMEOUT = pytest.mark.timeout(600)
HOLD_FROM = 4  # the held batch is the first one starting at input position >= 4 (after shard 0)
HOLD_S = 180  # a bound on the hold: never a deadlock if the driver never says "go"


def held(base: type, go: str, record_dir: str) -> type:
    """`base` (a model actor) whose first batch starting at position >= HOLD_FROM (whichever actor
    starts one first: it takes record_dir/held, written with its node id) waits for the file
    `go` (at most HOLD_S), so it is in flight when the node goes; every batch it starts and
    finishes is a line `start|done <node id> <positions>` in record_dir/<pid>.txt."""

    def call(self: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        positions = " ".join(str(int(p)) for p in batch["position"])
        node = ray.get_runtime_context().get_node_id()
        note = Path(record_dir) / f"{os.getpid()}.txt"
        with note.open("a") as f:
            f.write(f"start {node} {positions}\n")
        if int(np.min(batch["position"])) >= HOLD_FROM and not os.path.exists(go):
            mine = Path(record_dir) / f"held-{os.getpid()}"
            mine.write_text(f"{node} {positions}")
            try:  # the one held batch of the run: the first to link the token (atomic, whole)
                os.link(mine, Path(record_dir) / "held")
                holding = True
            except FileExistsError:
                holding = False
            if holding:
                deadline = time.monotonic() + HOLD_S
                while not os.path.exists(go) and time.monotonic() < deadline:
                    time.sleep(0.02)
        out = base.__call__(self, batch)
        with note.open("a") as f:
            f.write(f"done {node} {positions}\n")
        return out

    # same name: Ray Data names the stage and its actors after the class
    return type(base.__name__, (base,), {"__call__": call, "__doc__": base.__doc__})


@contextlib.contextmanager
def one_batch_per_actor() -> Iterator[None]:
    """Ray Data hands each pool actor one batch at a time (its global override of the actor
    pool's tasks in flight per actor): none waits in an actor's queue behind the held batch."""
    context = ray.data.DataContext.get_current()
    saved, context.max_tasks_in_flight_per_actor = context.max_tasks_in_flight_per_actor, 1
    try:
        yield
    finally:
        context.max_tasks_in_flight_per_actor = saved


def batch_records(record_dir: Path) -> list[tuple[str, str, list[int]]]:
    """(start|done, node id, positions) of every batch the held actors saw."""
    out = []
    for note in sorted(record_dir.glob("*.txt")):
        for line in note.read_text().splitlines():
            what, node, *positions = line.split()
            out.append((what, node, [int(p) for p in positions]))
    return out


def lost_work(records: list[tuple[str, str, list[int]]], lost: str) -> dict[str, int]:
    """What the loss of node `lost` cost, in images, from the actors' batch records: started
    there and never finished (killed in flight), finished there (before the loss), and embedded
    more than once anywhere (work redone: in flight on the lost node, or its output lost)."""
    done = [p for what, _, ps in records if what == "done" for p in ps]
    started = {p for what, n, ps in records if what == "start" and n == lost for p in ps}
    finished = {p for what, n, ps in records if what == "done" and n == lost for p in ps}
    redone = {p for p in started - finished if p in done} | {p for p in finished if done.count(p) > 1}
    return {"embedded": len(done), "embedded_twice": len(done) - len(set(done)),
            "killed_in_flight_on_lost_node": len(started - finished),
            "finished_on_lost_node": len(finished), "redone": len(redone)}


def folder_files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Relative path -> (bytes, mtime ns) of every file below `folder` but the run lock and the
    run record (both change on every run) and files being written (storage's `.<name>.tmp-*`)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name not in ("_lock.json", "_job.json") and not p.name.startswith(".")}


def committed_files(folder: Path, columns: dict[str, np.ndarray]) -> dict[str, tuple[bytes, int]]:
    """`folder_files` right after the first shard's commit, less the map files of other shards'
    inputs (write_files tasks write those before their shard is committed, and may write them
    again: only a committed shard's files must never change). columns: the committed shard's."""
    mine = {str(Path(map_uri(str(folder), str(key), kind)).relative_to(folder))
            for key in columns.get("key", []) for kind in RESULT_MAPS}
    return {name: value for name, value in folder_files(folder).items()
            if name in mine or not any(name.startswith(f"{sub}/") for sub, _ in RESULT_MAPS.values())}


def _descendants(pids: list[int]) -> list[int]:
    """Every process below `pids` (Ray's workers are the raylet's children), from /proc."""
    parent = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.name.isdigit():
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], list(pids)
    while frontier:
        here = frontier.pop()
        children = [pid for pid, ppid in parent.items() if ppid == here]
        found += children
        frontier += children
    return found


def _running(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def preempt(cluster: Any, node: Any) -> dict[str, Any]:
    """SIGTERM at once to every process of `node` (raylet, agents and the raylet's workers, the
    model actor among them), as a spot VM's shutdown sends it, then SIGKILL (remove_node) to
    what is left once the raylet exits or after 30 s, as the VM goes away."""
    own = [p for _, p in node.live_processes()]
    raylet = node.all_processes["raylet"][0].process
    workers = _descendants([p.pid for p in own])
    start = time.monotonic()
    for pid in [p.pid for p in own] + workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        code: int | None = raylet.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
    exit_s = round(time.monotonic() - start, 1)
    time.sleep(1)  # the other processes' own exits
    left = sum(p.poll() is None for p in own) + sum(_running(pid) for pid in workers)
    cluster.remove_node(node, allow_graceful=False)
    return {"raylet_exit": code, "raylet_exit_s": exit_s, "processes_signalled": len(own) + len(workers),
            "alive_1s_after_raylet_exit": left}


def lose_node_after_first_commit(
    monkeypatch: pytest.MonkeyPatch, job: Any, cluster: Any, out: Path, record_dir: Path, go: Path,
    *, how: str,
) -> dict[str, Any]:
    """Patch `job._write_shard` (the driver's write + commit of one shard) so that right after
    the first commit the worker node whose actor holds the held batch is lost: `how` "kill"
    (SIGKILL of all its processes) or "sigterm" (`preempt`), and a 1-CPU node is added right after
    (an autoscaler's replacement). Then the held batch goes on (its actor is gone: Ray restarts
    it where there is room and retries the batch). Returns the lost node id, the files of `out` at
    that moment, and what `preempt` saw."""
    original = job._write_shard
    event: dict[str, Any] = {"commits": []}

    def write(folder: Any, shard: Any, columns: dict[str, np.ndarray], *args: Any) -> Any:
        record = original(folder, shard, columns, *args)
        event["commits"].append(shard.index)
        if "lost" in event:
            return record
        token, deadline = record_dir / "held", time.monotonic() + 120
        while not token.exists() and time.monotonic() < deadline:  # the held batch started
            time.sleep(0.05)
        assert token.exists(), "no held batch reached a model actor"
        lost = token.read_text().split()[0]
        (node,) = [n for n in cluster.worker_nodes if n.node_id == lost]
        event.update(lost=lost, held=[int(p) for p in token.read_text().split()[1:]],
                     committed=committed_files(out, columns), first_commit=shard.index)
        if how == "kill":
            cluster.remove_node(node, allow_graceful=False)
        else:
            event.update(preempt(cluster, node))
        cluster.add_node(num_cpus=1)
        go.touch()
        return record

    monkeypatch.setattr(job, "_write_shard", write)
    return event


@pytest.fixture
def two_workers(ray_cluster: Any) -> Iterator[Any]:
    """The cluster, given back with two alive 1-CPU workers whatever the test removed."""
    yield ray_cluster
    deadline = time.monotonic() + 60
    while len(ray_cluster.worker_nodes) < 2 or (len(worker_nodes()) < 2 and time.monotonic() < deadline):
        if len(ray_cluster.worker_nodes) < 2:
            ray_cluster.add_node(num_cpus=1)
        ray_cluster.wait_for_nodes()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def score_reference(fit_run: tuple[Path, str], dataset: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> Path:
    """An uninterrupted score of the whole dataset (26 inputs, 2 unreadable; 7 shards of 4) on
    the cluster."""
    out = tmp_path_factory.mktemp("score-ref") / "results"
    argv = ["--bank", str(fit_run[0]), "--images", str(dataset), "--out", str(out), *MULTI_FLAGS]
    with whole_pool_first():
        assert score.run(parse_config(score.ScoreConfig, argv)) == 2  # 2 unreadable, --max-failures 0
    return out


def assert_same_results(out: Path, reference: Path) -> None:
    """`out` holds what the uninterrupted `reference` run wrote: each input once in scores or
    errors, equal scores (1e-5), maps within one 8-bit level, masks equal."""
    rows, expected = read_scores(str(out)), read_scores(str(reference))
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)) == 24  # no input twice
    assert uris == [r["uri"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in rows], [r["score"] for r in expected],
                               rtol=1e-5, atol=1e-5)
    assert [(r["max_y"], r["max_x"]) for r in rows] == [(r["max_y"], r["max_x"]) for r in expected]
    errors = [e for p in sorted((out / "errors").glob("*.parquet")) for e in storage.read_table(str(p)).to_pylist()]
    assert sorted(e["uri"] for e in errors) == sorted(
        e["uri"] for p in sorted((reference / "errors").glob("*.parquet"))
        for e in storage.read_table(str(p)).to_pylist())
    for sub in ("maps", "masks"):
        names = sorted(str(p.relative_to(out / sub)) for p in (out / sub).rglob("*.png"))
        assert names == sorted(str(p.relative_to(reference / sub)) for p in (reference / sub).rglob("*.png"))
        assert len(names) == 24
        for name in names:
            got = np.asarray(Image.open(out / sub / name), dtype=np.int16)
            want = np.asarray(Image.open(reference / sub / name), dtype=np.int16)
            assert np.abs(got - want).max() <= (1 if sub == "maps" else 0), (sub, name)
    counts = storage.read_manifest(str(out), "results")["counts"]
    assert counts == {"inputs": 26, "scored": 24, "errors": 2}


def assert_committed_untouched(event: dict[str, Any], out: Path) -> None:
    """The files of the first committed shard (whichever it is: rows arrive in any order) when
    the node went are there unchanged: same bytes, same mtime (never rewritten)."""
    committed = event["committed"]
    assert f"_shards/part-{event['first_commit']:05d}.json" in committed
    now = folder_files(out)
    assert {k: now.get(k) for k in committed} == committed


def run_score_losing_a_node(fit_run: tuple[Path, str], dataset: Path, cluster: Any, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch, how: str) -> tuple[Path, dict, dict]:
    """score of the whole dataset (26 inputs: 7 shards of 4, 13 batches of 2) while a node is
    lost `how` after the first commit; returns the results folder, the loss event, the figures."""
    out, records, go = tmp_path / "results", tmp_path / "batches", tmp_path / "go"
    records.mkdir()
    monkeypatch.setattr(score, "ScoreActor", held(score.ScoreActor, str(go), str(records)))
    event = lose_node_after_first_commit(monkeypatch, score, cluster, out, records, go, how=how)
    argv = ["--bank", str(fit_run[0]), "--images", str(dataset), "--out", str(out), *MULTI_FLAGS]
    start = time.monotonic()
    with whole_pool_first(), one_batch_per_actor():
        assert score.run(parse_config(score.ScoreConfig, argv)) == 2  # the 2 unreadable inputs
    figures = {"test": f"score-{how}-replaced", "run_s": round(time.monotonic() - start, 1),
               "held": event["held"], "first_commit": event["first_commit"],
               "shards_committed_at_loss": sum(k.startswith("_shards/") for k in event["committed"]),
               "committed_files_at_loss": len(event["committed"]),
               **{k: event[k] for k in ("raylet_exit", "raylet_exit_s", "processes_signalled",
                                        "alive_1s_after_raylet_exit") if k in event},
               **lost_work(batch_records(records), event["lost"])}
    figures.update(shard_commits=len(event["commits"]),
                   shards_redone=len(event["commits"]) - len(set(event["commits"])))
    print("FIGURES", json.dumps(figures))
    return out, event, figures


@NODE_LOSS_TIMEOUT
def test_score_losing_a_worker_node_after_a_commit_scores_every_input_once_as_uninterrupted(
    fit_run: tuple[Path, str], dataset: Path, score_reference: Path, two_workers: Any,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="jobs")
    out, event, figures = run_score_losing_a_node(fit_run, dataset, two_workers, tmp_path,
                                                  monkeypatch, "kill")
    assert event["held"][0] >= HOLD_FROM and figures["shards_committed_at_loss"] == 1
    assert_committed_untouched(event, out)
    assert_same_results(out, score_reference)
    assert figures["killed_in_flight_on_lost_node"] >= 2  # the held batch, at least
    assert figures["redone"] >= 2  # and it was embedded again, on the replacement
    nodes = images_per_node(caplog.text, "score")  # the driver kept each input once
    assert sum(nodes.values()) == 26 and event["lost"] not in worker_nodes()


@NODE_LOSS_TIMEOUT
def test_score_on_a_preempted_worker_node_sigterm_scores_every_input_once_as_uninterrupted(
    fit_run: tuple[Path, str], dataset: Path, score_reference: Path, two_workers: Any,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, event, figures = run_score_losing_a_node(fit_run, dataset, two_workers, tmp_path,
                                                  monkeypatch, "sigterm")
    assert event["raylet_exit"] is not None  # the raylet ended on SIGTERM, within 30 s
    assert event["lost"] not in worker_nodes()
    assert_committed_untouched(event, out)
    assert_same_results(out, score_reference)
    assert figures["redone"] >= 2  # the held batch, embedded again on the replacement


@NODE_LOSS_TIMEOUT
def test_fit_losing_a_worker_node_mid_extract_writes_the_uninterrupted_store_and_bank(
    fit_run: tuple[Path, str], dataset: Path, two_workers: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # fit = extract (12 images, 3 shards of 4; the node is lost after the first commit and
    # replaced) -> coreset -> calibration; fit_run is the same fit, uninterrupted
    bank, records, go = tmp_path / "bank", tmp_path / "batches", tmp_path / "go"
    records.mkdir()
    monkeypatch.setattr(extract, "FeatureActor", held(extract.FeatureActor, str(go), str(records)))
    store = bank / fit.FEATURES_DIR
    event = lose_node_after_first_commit(monkeypatch, extract, two_workers, store, records, go,
                                         how="kill")
    argv = ["--train", str(dataset / "train"), "--out", str(bank), *MODEL_FLAGS, *MULTI_FLAGS,
            "--calibration-fraction", "0.25", "--ratio", "0.1", "--feature-dtype", "float32"]
    start = time.monotonic()
    with whole_pool_first(), one_batch_per_actor():
        assert fit.run(parse_config(fit.FitConfig, argv)) == 0
    figures = {"test": "fit-extract-kill-replaced", "run_s": round(time.monotonic() - start, 1),
               "held": event["held"], "first_commit": event["first_commit"],
               "shard_commits": len(event["commits"]),
               "shards_redone": len(event["commits"]) - len(set(event["commits"])),
               "shards_committed_at_loss": sum(k.startswith("_shards/") for k in event["committed"]),
               "committed_files_at_loss": len(event["committed"]),
               **lost_work(batch_records(records), event["lost"])}
    print("FIGURES", json.dumps(figures))
    assert figures["redone"] >= 1
    assert_committed_untouched(event, store)
    # the feature store: same shards, every image once, equal arrays (float32 store)
    reference_store = str(fit_run[0] / fit.FEATURES_DIR)
    manifest = storage.read_manifest(str(store), "features")
    expected_manifest = storage.read_manifest(reference_store, "features")
    assert manifest["shards"] == expected_manifest["shards"] and manifest["counts"]["extracted"] == 12
    for part in manifest["shards"]:
        got = storage.read_feature_shard(str(store / part["file"]))
        want = storage.read_feature_shard(f"{reference_store}/{part['file']}")
        assert list(got["image_id"]) == list(want["image_id"])
        for name in ("y", "x", "feature"):
            assert torch.equal(torch.as_tensor(got[name]), torch.as_tensor(want[name])), name
    same_bytes = all((store / p["file"]).read_bytes() == (fit_run[0] / fit.FEATURES_DIR / p["file"]).read_bytes()
                     for p in manifest["shards"])
    print("FIGURES", json.dumps({"store_shards_byte_identical": same_bytes}))
    ids = [i for part in manifest["shards"]
           for i in storage.read_feature_shard(str(store / part["file"]))["image_id"]]
    assert len(dict.fromkeys(ids)) == 12  # each image once (its patches consecutive)
    # the bank: the uninterrupted fit's
    got, want = storage.load_bank(str(bank), SPEC), storage.load_bank(str(fit_run[0]), SPEC)
    assert got.image_ids == want.image_ids
    assert torch.equal(got.ys, want.ys) and torch.equal(got.xs, want.xs)
    assert torch.equal(got.features, want.features)
    assert got.image_threshold == want.image_threshold and got.pixel_threshold == want.pixel_threshold
