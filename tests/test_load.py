"""Load test (issue 6): `score` over 5,000 small images on a local Ray, inputs and outputs on a real
S3 server on loopback (moto), corrupt inputs injected and the model actor's process killed with
SIGKILL mid-run; at the end every input is accounted for exactly once (scores ∪ errors).

Kept to minutes on 2 cores: 32 px images and crop, efficientnet_lite0 with random weights, 16-dim
embeddings, batches of 250 and shards of 500, and `--no-maps` (one score row per image; maps are
per-image files whose exactly-once writing the smaller tests in test_reliability.py check).
"""

from __future__ import annotations

import io
import os
import posixpath
import signal
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import score
from jobs import config as _cli
from patchcore_core import model, preprocess, storage
from patchcore_core.spec import ModelSpec

NUM_IMAGES = 5_000
SPEC = ModelSpec(backbone="efficientnet_lite0", weights="none", layers=("blocks.2", "blocks.4"),
                 resize=32, crop=32, embed_dim=16, sigma=1.0)
SHARD_SIZE = 500


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _images(rng: np.random.Generator) -> dict[str, bytes]:
    """NUM_IMAGES 32 x 32 PNGs named img/NNNNN.png: a few base textures plus per-image noise."""
    x = np.arange(32)
    bases = [np.tile(128 + 60 * np.sin((x + 3 * k) / (2.0 + k)), (32, 1)) for k in range(8)]
    out = {}
    for i in range(NUM_IMAGES):
        gray = bases[i % 8] + rng.normal(0, 12, (32, 32))
        rgb = np.clip(np.stack([gray, gray * 0.9, gray * 0.7], -1), 0, 255).astype(np.uint8)
        out[f"img/{i:05d}.png"] = _png(rgb)
    return out


def _corrupt(data: bytes, kind: int, rng: np.random.Generator) -> bytes:
    """Three kinds of broken file, each under an image name."""
    if kind == 0:
        return data[: len(data) // 3]  # truncated upload
    if kind == 1:
        return b""  # zero bytes
    return rng.bytes(200)  # not an image at all


class ActorKiller(threading.Thread):
    """SIGKILLs the score actor's process once the first shard is committed (the job is mid-run)."""

    def __init__(self, record_uri: str, manifest_uri: str) -> None:
        super().__init__(daemon=True)
        self.record_uri, self.manifest_uri = record_uri, manifest_uri
        self.killed: dict | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        import ray._private.state as ray_state  # GCS actor table: works without the dashboard

        while not self.stop.is_set():
            if storage.exists(self.record_uri):
                break
            time.sleep(0.05)
        while not self.stop.is_set() and self.killed is None:
            for actor_id, info in ray_state.actors().items():
                if "ScoreActor" in info["ActorClassName"] and info["State"] == "ALIVE" and info["Pid"]:
                    committed = storage.exists(self.manifest_uri)
                    os.kill(info["Pid"], signal.SIGKILL)
                    self.killed = {"actor_id": actor_id, "pid": info["Pid"],
                                   "manifest_before_kill": committed}
                    break
            time.sleep(0.05)


@pytest.mark.slow
def test_score_5000_images_on_s3_with_a_killed_actor_is_exactly_once(
    ray_local: None, s3_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray._private.state as ray_state

    rng = np.random.default_rng(0)
    base = f"s3://{s3_server}/load-{time.monotonic_ns()}"
    fs, base_path = storage.url_to_fs(base)

    # a bank fitted in one process from 8 nominal images
    torch.set_num_threads(1)
    train = _images(np.random.default_rng(1))
    tensors = torch.stack([preprocess.to_tensor(preprocess.decode_image(train[f"img/{i:05d}.png"]),
                                                SPEC.resize, SPEC.crop) for i in range(10)])
    fitted = model.fit(tensors[:8], SPEC, ratio=0.5, calibration_images=tensors[8:],
                       image_ids=[f"train/{i}.png" for i in range(8)])
    model.save(fitted, f"{base}/bank")

    # inputs: NUM_IMAGES PNGs, 30 of them deliberately broken, uploaded concurrently
    files = _images(rng)
    names = sorted(files)
    broken = set(rng.choice(names, size=30, replace=False).tolist())
    for k, name in enumerate(sorted(broken)):
        files[name] = _corrupt(files[name], k % 3, rng)
    start = time.monotonic()
    fs.pipe({posixpath.join(base_path, "archive", name): data for name, data in files.items()})
    upload_s = time.monotonic() - start

    out = f"{base}/results"
    killer = ActorKiller(f"{out}/_shards/part-00000.json", f"{out}/manifest.json")
    killer.start()
    argv = ["--bank", f"{base}/bank", "--images", f"{base}/archive", "--out", out, "--no-maps",
            "--workers", "1", "--cpus-per-worker", "0.5", "--batch-size", "250",
            "--shard-size", str(SHARD_SIZE), "--device", "cpu", "--max-failures", str(len(broken))]
    start = time.monotonic()
    status = score.run(_cli.parse_config(score.ScoreConfig, argv))
    wall_s = time.monotonic() - start
    killer.stop.set()
    killer.join()

    # the kill happened while the job ran, and Ray restarted the actor
    assert killer.killed is not None and not killer.killed["manifest_before_kill"]
    assert ray_state.actors(killer.killed["actor_id"])["NumRestarts"] >= 1

    # exactly once: every input uri in scores ∪ errors, once
    inputs = [fs.unstrip_protocol(posixpath.join(base_path, "archive", n)) for n in names]
    fs.invalidate_cache()
    scored, errors = [], []
    for sub, rows in (("scores", scored), ("errors", errors)):
        for part in sorted(fs.glob(posixpath.join(base_path, "results", sub, "part-*.parquet"))):
            rows += storage.read_table(fs.unstrip_protocol(part)).to_pylist()
    seen = [r["uri"] for r in scored] + [e["uri"] for e in errors]
    duplicates = len(seen) - len(set(seen))
    lost = len(set(inputs) - set(seen))
    assert duplicates == 0 and lost == 0 and set(seen) == set(inputs)
    assert {e["uri"].rsplit("/", 1)[1] for e in errors} == {n.rsplit("/", 1)[1] for n in broken}
    assert all(e["error"] for e in errors) and all(np.isfinite(r["score"]) for r in scored)
    counts = storage.read_manifest(out, "results")["counts"]
    assert counts == {"inputs": NUM_IMAGES, "scored": NUM_IMAGES - len(broken), "errors": len(broken)}
    assert status == 0  # 30 failures, --max-failures 30
    assert not storage.exists(f"{out}/_lock.json")

    # spot check against the single-process reference
    sample = scored[:: len(scored) // 20]
    reference = model.predict(fitted, model.load_images([r["uri"] for r in sample], SPEC)).scores
    np.testing.assert_allclose([r["score"] for r in sample], reference.numpy(), rtol=1e-5, atol=1e-5)

    with capsys.disabled():
        print(f"\nload test: {NUM_IMAGES} images on S3 (moto), {len(broken)} corrupt injected, actor "
              f"pid {killer.killed['pid']} SIGKILLed mid-run; rows written {len(seen)} "
              f"({len(scored)} scores + {len(errors)} errors), duplicates {duplicates}, lost {lost}; "
              f"score wall time {wall_s:.1f} s (upload {upload_s:.1f} s)")
