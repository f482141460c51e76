"""Shared test fixtures: one local Ray per session (or a 3-node one for a module), a real S3 server
(moto) on loopback, seeded RNG."""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; AWS_* variables point every process (Ray workers too) at it.

    Set before Ray starts (`ray_local` depends on this), so Ray's workers inherit them.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server(s3_endpoint: str) -> str:
    """Name of a fresh bucket on the moto server (s3://<name>/...)."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


def _start_local_ray() -> None:
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # never attach tests to a real cluster
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    """One local Ray (2 CPUs, no dashboard) for the whole session; workers see the S3 variables."""
    import ray

    _start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A 3-node Ray on this machine (`ray.cluster_utils.Cluster`: one raylet per node) for a module.

    Head: 0 CPUs, as a KubeRay head, so all work lands on the two 1-CPU workers. Node deaths are
    noticed after ~1 s (health checks every 0.5 s, 2 misses) instead of Ray's ~15 s.
    The session's local Ray, if started, is shut down for the module and restarted after it, as
    `ray_local` made it (one driver connects to one Ray at a time). RAY_TMPDIR points at a
    private short folder meanwhile: the cluster writes its address to RAY_TMPDIR's
    `ray_current_cluster`, which a plain `ray.init()` of any other process on this machine (other
    test sessions) would otherwise join.
    """
    import ray
    from ray.cluster_utils import Cluster

    restart = ray.is_initialized()
    ray.shutdown()
    saved_tmp = os.environ.get("RAY_TMPDIR")
    tmp = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")  # short: raylet socket paths <= 107 chars
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.pop("RAY_ADDRESS", None)
    fast_failure = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": fast_failure})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmp
        shutil.rmtree(tmp, ignore_errors=True)
        if restart:
            _start_local_ray()


def striped_png(rng: np.random.Generator, width: int, height: int,
                defect: tuple[slice, slice] | None = None) -> bytes:
    """Seeded striped RGB texture with noise as PNG bytes; `defect` (rows, cols) is painted bright
    red, an anomaly that scores high."""
    x = np.arange(width)[None, :]
    gray = 128 + 60 * np.sin(x / 3.0) + 20 * rng.standard_normal((height, width))
    pixels = np.clip(np.stack([gray, gray * 0.8, gray * 0.6], -1), 0, 255).astype(np.uint8)
    if defect is not None:
        pixels[defect] = (250, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
