"""`patchcore submit` against a real Ray cluster started here (a head on loopback, token auth)
and the moto S3 server: fit then a nightly score go through Ray's job submission API and write
their outputs to s3://; a second trigger of the same night is refused; checks happen before
anything is sent; credentials never travel with the job."""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import striped_png

from jobs import cli, submit
from patchcore_core import storage

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
MODEL_FLAGS = ["--backbone", "efficientnet_lite0", "--weights", "none", "--resize", "64",
               "--crop", "64", "--embed-dim", "32"]
PIPELINE_FLAGS = ["--workers", "1", "--cpus-per-worker", "0.5", "--batch-size", "4",
                  "--shard-size", "4", "--device", "cpu"]
NUM_TRAIN, NUM_TEST = 8, 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- checks before submitting


def run_submit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `patchcore submit *argv` in this process."""
    with pytest.raises(SystemExit) as exited:
        submit.main(argv)
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def test_patchcore_cli_dispatches_submit_to_this_module() -> None:
    assert cli.COMMANDS["submit"][0] == "jobs.submit"


def test_bad_flag_of_the_job_command_fails_here_with_that_commands_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # port 9 on loopback: nothing listens, so reaching the network would be a different error
    argv = ["--address", "http://127.0.0.1:9", "--", "fit", "--train", "s3://b/t", "--out",
            "s3://b/o", "--ratio", "ten"]
    status, out, err = run_submit(argv, capsys)
    assert status == 2 and out == ""
    assert err.startswith("usage: patchcore fit") and "invalid float value: 'ten'" in err


def test_unknown_command_and_missing_command_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_submit(["--address", "http://127.0.0.1:9", "--", "fitt"], capsys)
    assert status == 2 and "cannot submit 'fitt'" in err and "score" in err
    status, _, err = run_submit(["--address", "http://127.0.0.1:9"], capsys)
    assert status == 2 and "give the job's command after `--`" in err
    status, _, err = run_submit(["--no-such-flag", "1", "--", "fit"], capsys)
    assert status == 2 and "unrecognized arguments: --no-such-flag" in err


def test_credentials_in_storage_options_are_refused_without_echoing_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = '{"client_kwargs": {"aws_secret_access_key": "S3CRET-VALUE"}, "anon": false}'
    argv = ["--address", "http://127.0.0.1:9", "--", "score", "--bank", "s3://b/bank", "--images",
            "s3://b/in", "--out", "s3://b/out", "--storage-options", options]
    status, out, err = run_submit(argv, capsys)
    assert status == 2 and out == ""
    assert "--storage-options holds credentials (aws_secret_access_key)" in err
    assert "S3CRET-VALUE" not in err


def test_unreachable_job_server_exits_4(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--address", f"http://127.0.0.1:{_free_port()}", "--working-dir", "", "--", "score",
            "--bank", "s3://b/bank", "--images", "s3://b/in", "--out", "s3://b/out"]
    status, out, err = run_submit(argv, capsys)
    assert status == submit.EXIT_UNREACHABLE and out == ""
    assert "no job server at http://127.0.0.1:" in err


def test_nightly_id_is_the_name_and_the_run_date() -> None:
    assert submit.nightly_submission_id("screws-line3", dt.date(2026, 1, 2)) == "patchcore-screws-line3-20260102"
    for bad in ("Screws", "-screws", "screws_3", "", "x" * 43):
        with pytest.raises(ValueError, match="--nightly-id must be"):
            submit.nightly_submission_id(bad, dt.date(2026, 1, 2))


def test_runtime_env_ships_the_project_and_the_endpoint_but_never_credentials(tmp_path: Path) -> None:
    environ = {
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIA-ID", "AWS_SECRET_ACCESS_KEY": "S3CRET", "AWS_SESSION_TOKEN": "T0KEN",
        "RAY_AUTH_TOKEN": "RAYT0KEN",
    }
    env = submit.runtime_env(str(ROOT), environ)
    assert env["working_dir"] == str(ROOT.resolve())
    assert {".git", ".venv", "outputs"} <= set(env["excludes"])
    assert env["env_vars"] == {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    assert submit.runtime_env("", {}) == {}  # run the image's package, pass nothing
    with pytest.raises(ValueError, match="is not the patchcore project folder"):
        submit.runtime_env(str(tmp_path), environ)


def test_token_is_sent_only_when_asked_for_and_read_where_ray_keeps_it(tmp_path: Path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    assert submit.auth_headers({}, tmp_path) == {}  # a local ray.init() token is not sent unasked
    assert submit.auth_headers({"RAY_AUTH_MODE": "token"}, tmp_path) == bearer("from-file")
    assert submit.auth_headers({"RAY_AUTH_TOKEN": "env"}, tmp_path) == bearer("env")
    assert submit.auth_headers({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "env"}, tmp_path) == {}
    with pytest.raises(FileNotFoundError, match="no token"):
        submit.auth_headers({"RAY_AUTH_MODE": "token"}, tmp_path / "elsewhere")


# --------------------------------------------------------------------------- a real cluster


@dataclass(frozen=True)
class Cluster:
    address: str  # job server (dashboard) URL
    token: str
    env: dict[str, str]  # environment of a client on this machine
    head: subprocess.Popen
    temp_dir: Path

    def diagnose(self) -> str:
        """Head status and log tails, for failure messages."""
        logs = [self.temp_dir / "head.log", self.temp_dir / "session_latest" / "logs" / "dashboard.log"]
        tails = "\n".join(f"--- {p}:\n{p.read_text()[-1500:]}" for p in logs if p.exists())
        return f"head exit status: {self.head.poll()}\n{tails}"


def _start_node(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`ray start --block ...` in its own process group, so that teardown ends exactly its
    processes (`ray stop` would end every Ray on the machine, the session's local Ray included)."""
    with open(log_path, "w") as log_file:
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Ray workers start their own process groups)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _stop_node(proc: subprocess.Popen) -> None:
    """SIGKILL the node's process group and its workers (Ray workers start their own groups)."""
    started = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in started:  # seconds-old ids of our own processes: no reuse to fear
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held together while picked, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# Ports Ray picks itself when given 0 (its gRPC/HTTP servers bind port 0): no clash with the other
# Rays on this machine, whose defaults (52365, 8265, ...) are taken.
RANDOM_PORTS = [a for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                               "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
                for a in (flag, "0")]


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint: str) -> Iterator[Cluster]:
    """A Ray head with 2 CPUs, its job server and token auth on, all on loopback, in a private temp
    dir. It gets the (fake) storage credentials from its own environment, as a cluster node gets
    them from its instance role; the S3 endpoint comes with each job from `patchcore submit`.

    One node: Ray replaces 127.0.0.1 by the machine's routable address unless
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and under that setting it refuses to add worker nodes.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rsub", dir="/tmp"))  # short: Unix socket paths
    token = secrets.token_hex(16)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "AWS_")) and k != "PYTHONPATH"}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"  # `python` = this venv on the node
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    node_env = {**base, **auth, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}
    gcs_port, dashboard_port, client_port = _free_ports(3)
    address = f"http://127.0.0.1:{dashboard_port}"
    log_path = temp_dir / "head.log"
    head = _start_node(
        ["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port), "--num-cpus", "2",
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port),
         "--temp-dir", str(temp_dir), "--disable-usage-stats", "--log-style", "record", *RANDOM_PORTS],
        node_env, log_path,
    )
    try:
        def answers() -> bool:
            try:
                reply = requests.get(f"{address}/api/jobs/", timeout=2,
                                     headers={"Authorization": f"Bearer {token}"})
            except requests.RequestException:  # not listening yet, or too slow under load
                return False
            return reply.ok

        deadline = time.monotonic() + 180
        while not answers():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Ray head not up (exit status {head.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        client_env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **auth}
        yield Cluster(address=address, token=token, env=client_env, head=head, temp_dir=temp_dir)
    finally:
        _stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _png(rng: np.random.Generator, defect: bool) -> bytes:
    return striped_png(rng, 64, 64, (slice(20, 34), slice(24, 40)) if defect else None)


def _submit_cli(cluster: Cluster, argv: list[str]) -> subprocess.CompletedProcess:
    """`patchcore submit *argv` as a user runs it, from the repository root."""
    return subprocess.run([sys.executable, "-m", "jobs.submit", "--address", cluster.address, *argv],
                          cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=400,
                          check=False)


def test_submitted_fit_and_nightly_score_write_bank_and_scores_to_s3_and_a_second_trigger_is_refused(
    ray_cluster: Cluster, s3_server: str,
) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    root = f"s3://{s3_server}/submit"
    rng = np.random.default_rng(0)
    for i in range(NUM_TRAIN):
        storage.write_bytes(f"{root}/train/{i:03d}.png", _png(rng, defect=False))
    tests = [f"{root}/test/{i:03d}.png" for i in range(NUM_TEST)]
    for i, uri in enumerate(tests):
        storage.write_bytes(uri, _png(rng, defect=i % 2 == 1))
    bank, results = f"{root}/bank", f"{root}/results"

    fit = _submit_cli(ray_cluster, ["--submission-id", "fit-test-1", "--poll-interval", "1", "--",
                                    "fit", "--train", f"{root}/train", "--out", bank, *MODEL_FLAGS,
                                    *PIPELINE_FLAGS, "--ratio", "0.1", "--calibration-fraction", "0.25"])
    assert fit.returncode == 0, fit.stderr[-4000:] + ray_cluster.diagnose()
    assert fit.stdout.strip() == "fit-test-1"  # stdout holds only the submission id
    assert storage.read_manifest(bank, "bank")["kind"] == "bank"

    score_argv = ["--nightly-id", "score-test", "--date", "2026-01-02", "--no-wait", "--",
                  "score", "--bank", bank, "--images", f"{root}/test", "--out", results, *PIPELINE_FLAGS]
    score = _submit_cli(ray_cluster, score_argv)
    assert score.returncode == 0, score.stderr[-4000:] + ray_cluster.diagnose()
    job_id = score.stdout.strip()
    assert job_id == "patchcore-score-test-20260102"

    again = _submit_cli(ray_cluster, score_argv)  # the same night triggered twice
    assert again.returncode == submit.EXIT_DUPLICATE and again.stdout == ""
    assert "patchcore-score-test-20260102" in again.stderr and "already used" in again.stderr

    client = JobSubmissionClient(ray_cluster.address, headers={"Authorization": f"Bearer {ray_cluster.token}"})
    deadline = time.monotonic() + 300
    while not (info := client.get_job_info(job_id)).status.is_terminal():
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-4000:]
        time.sleep(1)
    assert info.status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-4000:]

    # the job got the endpoint from the submitter, its credentials from the cluster, none from us
    env_vars = info.runtime_env.get("env_vars", {})
    assert env_vars.get("AWS_ENDPOINT_URL_S3") == os.environ["AWS_ENDPOINT_URL_S3"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"} & set(env_vars)
    assert info.runtime_env["working_dir"].startswith("gcs://")  # the project was shipped

    assert storage.read_manifest(results, "results")["kind"] == "results"
    fs, path = storage.url_to_fs(results)
    rows = []
    for part in sorted(fs.glob(posixpath.join(path, "scores", "part-*.parquet"))):
        rows += storage.read_table(fs.unstrip_protocol(part)).to_pylist()
    assert sorted(row["uri"] for row in rows) == tests  # every input scored exactly once
    assert all(np.isfinite(row["score"]) for row in rows)


def test_a_failed_job_streams_its_error_and_exits_nonzero(ray_cluster: Cluster, s3_server: str) -> None:
    missing = f"s3://{s3_server}/submit-missing/train/"
    run = _submit_cli(ray_cluster, ["--poll-interval", "1", "--", "fit", "--train", missing, "--out",
                                    f"s3://{s3_server}/submit-missing/bank", "--dry-run", *MODEL_FLAGS])
    assert run.returncode == 1, run.stderr[-4000:] + ray_cluster.diagnose()
    assert run.stdout.strip().startswith("raysubmit_")  # no id asked for: Ray's random one
    assert "submit-missing/train" in run.stderr  # the job's own error, streamed from its log
    assert "ended: FAILED" in run.stderr
