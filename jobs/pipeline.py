"""The streaming stage of the image jobs: Ray Data read + decode tasks, an actor pool, optional
CPU tasks after it.

Owns: `decode_batch` (bytes -> preprocessed crops on CPU tasks; a bad input becomes an error row,
never an exception) and `stream_shards`, which feeds the inputs of some shards through decode and
a job's actor and hands each shard back once all its rows are in, exactly once, with retries.
Used by extract, score and fit's calibration. Must not: write outputs or decide what is committed
(jobs.folders does), or size the actors itself (jobs.cluster does).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import ray

from jobs import cluster, logs
from jobs.config import PipelineFlags
from jobs.folders import Shard
from patchcore_core import preprocess, storage
from patchcore_core.spec import ModelSpec

log = logging.getLogger("jobs.pipeline")


def decode_batch(
    batch: dict[str, np.ndarray], *, resize: int, crop: int, frame: str, max_pixels: int,
    storage_options: dict[str, Any],
) -> dict[str, np.ndarray]:
    """CPU stage: read and decode each `uri`, keep its size, preprocess to the crop (or full frame).

    Adds image (B, 3, crop, crop) float32 (zeros for failures), width, height (input pixels; 0 for
    failures) and error ("" when fine). An unreadable input becomes an error row, never an exception.
    """
    n = len(batch["uri"])
    images = np.zeros((n, 3, crop, crop), np.float32)
    widths, heights = np.zeros(n, np.int64), np.zeros(n, np.int64)
    errors = []
    for i, uri in enumerate(batch["uri"]):
        try:
            image = preprocess.decode_image(storage.read_bytes(str(uri), storage_options),
                                            max_pixels=max_pixels)
            images[i] = preprocess.to_tensor(image, resize, crop, frame=frame,
                                             max_pixels=max_pixels).numpy()
        # One input's failure must never stop the job: decode_image turns what Pillow raises on
        # bad data into ValueError and storage raises OSError, but a hostile file can reach
        # plugin code that raises anything else; every such input is recorded with its reason.
        except Exception as err:  # noqa: BLE001
            errors.append(f"{type(err).__name__}: {err}")
            continue
        widths[i], heights[i] = image.size
        errors.append("")
    return {**batch, "image": images, "width": widths, "height": heights,
            "error": np.asarray(errors, dtype=object)}


def on_node(actor: type) -> type:
    """`actor` whose output batches also carry `node`: the Ray node id of the actor that made each
    row, so the driver can record where the model actors ran (a placement check that costs one
    short string per row, not a state-API call that needs the dashboard), and `modelled_unix`:
    when the actor finished the batch (time.time()), so start-up ends at the first model output
    even when a later stage holds rows back."""

    def call(self: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = actor.__call__(self, batch)
        rows = len(next(iter(out.values())))
        return {**out, "node": np.full(rows, ray.get_runtime_context().get_node_id(), dtype=object),
                "modelled_unix": np.full(rows, time.time(), np.float64)}

    # same name: Ray Data names the stage and its actors after the class
    return type(actor.__name__, (actor,), {"__call__": call, "__doc__": actor.__doc__})


def stream_shards(
    shards: Sequence[Shard],
    actor: type,
    actor_kwargs: dict[str, Any],
    flags: PipelineFlags,
    *,
    device: str,
    spec: ModelSpec,
    label: str,
    extra: Mapping[str, Sequence[Any]] | None = None,
    done_images: int = 0,
    total_images: int | None = None,
    after: Callable[..., dict[str, np.ndarray]] | None = None,
    after_kwargs: Mapping[str, Any] | None = None,
    timing: dict[str, Any] | None = None,
) -> Iterator[tuple[Shard, dict[str, np.ndarray]]]:
    """Run decode -> `actor` (-> `after`) over the inputs of `shards`; yield each shard once all its
    rows are back.

    Images are decoded and preprocessed as `spec` says (resize, crop, frame) on CPU tasks.
    `actor` is built with `actor_kwargs` plus threads: the torch threads it should run, its
    reserved CPUs rounded (Ray's OMP_NUM_THREADS rounds a fractional reservation down).
    Rows carry shard, position (index in the full input list), uri, plus `extra[name][position]`.
    The yielded columns are sorted by position. Only the shards' own rows are buffered on the
    driver, and a shard leaves the buffer as soon as it is complete; rows arrive in any order.
    after: a function of (batch, **after_kwargs) run on CPU tasks sized as the decode tasks over
    the actor's output batches (score's map files: CPU work kept off the model actor); a shard is
    yielded only once `after` has returned for all its rows.
    The log's last line counts the images each Ray node's actors embedded.
    timing: filled in (and logged) at the end: startup_s, from the call to the first batch out of
    the model actors (Ray Data planning, actor start, model and index load, that batch); then
    steady_images, steady_s and steady_images_per_s: the rows after that batch over the time from
    it to the last row back from the last stage (None with a single batch); first_rows_unix and
    last_rows_unix, the wall-clock times of both (time.time(), to line up with other
    measurements; the first is the actor's clock).
    Fault tolerance: a dead actor is restarted (max_restarts=-1) and its batch retried up to
    `flags.retries` times, as is a decode or `after` task; a row delivered twice (a retried
    batch) is kept once, by position, so each input is yielded exactly once.
    """
    rows = [
        {"shard": s.index, "position": s.start + i, "uri": uri,
         **{name: values[s.start + i] for name, values in (extra or {}).items()}}
        for s in shards for i, uri in enumerate(s.uris)
    ]
    if not rows:
        return
    workers, actor_cpus, decode_cpus = cluster.resolve_resources(flags, device)
    threads = max(1, round(actor_cpus))
    slots = cluster.task_slots(workers, actor_cpus, decode_cpus)
    tasks = ray.data.TaskPoolStrategy(size=slots)
    if after is not None:  # the two task stages share the spare CPUs, so both can always run
        decode_cpus = math.floor(decode_cpus / 2 * 1e4) / 1e4
    log.info("%s: %d images in %d shards on %d %s actor(s) of %g CPUs (%d torch threads), batch size "
             "%d; %g CPUs per decode task, at most %s at once", label, len(rows), len(shards),
             workers, device, actor_cpus, threads, flags.batch_size, decode_cpus,
             "Ray Data's limit" if slots is None else slots)
    ds = ray.data.from_items(rows)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates remote options passed to map_batches (removal planned for 2.64) but
        # offers no named parameter for retries: keep them explicit here, and revisit on upgrade
        # (tests/test_reliability.py checks that --retries takes effect).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            decode_batch, batch_size=flags.batch_size, batch_format="numpy",
            fn_kwargs={"resize": spec.resize, "crop": spec.crop, "frame": spec.frame,
                       "max_pixels": flags.max_pixels, "storage_options": flags.options},
            num_cpus=decode_cpus, compute=tasks,
            max_retries=flags.retries,  # a decode worker that dies (OOM kill, node loss)
        )
        ds = ds.map_batches(
            on_node(actor), batch_size=flags.batch_size, batch_format="numpy",
            fn_constructor_kwargs={**actor_kwargs, "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=actor_cpus, num_gpus=1 if device == "cuda" else 0,
            # Explicit (Ray Data's defaults are -1/-1): restart dead actors always, but retry one
            # batch only `retries` times, so a batch that kills its actor every time fails the
            # job (its committed shards stay) instead of looping forever.
            max_restarts=-1, max_task_retries=flags.retries,
        )
        if after is not None:
            ds = ds.map_batches(after, batch_size=flags.batch_size, batch_format="numpy",
                                fn_kwargs=dict(after_kwargs or {}), num_cpus=decode_cpus,
                                compute=tasks, max_retries=flags.retries)
    by_index = {s.index: s for s in shards}
    pending: dict[int, dict[int, dict[str, Any]]] = {s.index: {} for s in shards}
    total = total_images if total_images is not None else len(rows)
    progress = logs.Progress(label, total, done=done_images)
    done, shards_done, duplicates, start = done_images, 0, 0, time.monotonic()
    per_node: dict[str, int] = {}
    timing = timing if timing is not None else {}
    start_unix = time.time()
    first_modelled, first_rows, received = math.inf, 0, 0  # the earliest model output's time, rows
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        received += len(batch["shard"])
        modelled = float(batch["modelled_unix"].min())
        if received == len(batch["shard"]):
            log.info("%s: first results after %.1f s (start-up: Ray Data, actors, model and index "
                     "load, first batch)", label, time.monotonic() - start)
        if modelled < first_modelled:  # later stages may hand an earlier model batch back later
            first_modelled = modelled
            first_rows = int((batch["modelled_unix"] == modelled).sum())
        names = [name for name in batch if name not in ("node", "modelled_unix")]
        for j in range(len(batch["shard"])):
            index, position = int(batch["shard"][j]), int(batch["position"][j])
            if index not in pending or position in pending[index]:
                duplicates += 1  # a retried batch delivered this row again
                continue
            node = str(batch["node"][j])
            per_node[node] = per_node.get(node, 0) + 1
            pending[index][position] = {name: batch[name][j] for name in names}
            if len(pending[index]) == len(by_index[index].uris):
                shard_rows = [row for _, row in sorted(pending.pop(index).items())]
                columns = {name: np.stack([r[name] for r in shard_rows]) for name in names}
                yield by_index[index], columns
                done += len(shard_rows)
                shards_done += 1
                progress.label = f"{label} ({shards_done}/{len(shards)} shards) images"
                progress.update(done, force=shards_done == len(shards))
    if received:
        last_unix = time.time()
        # clamped: on several nodes the actors' clocks may differ from the driver's a little
        first_modelled = min(max(first_modelled, start_unix), last_unix)
        steady_s = last_unix - first_modelled
        timing.update(startup_s=first_modelled - start_unix, steady_images=received - first_rows,
                      steady_s=steady_s, first_rows_unix=first_modelled, last_rows_unix=last_unix,
                      steady_images_per_s=((received - first_rows) / steady_s
                                           if received > first_rows and steady_s > 0 else None))
        log.info("%s: start-up %.1f s (Ray Data, actors, model and index load, the first model "
                 "batch); steady state %d images in %.1f s after it: %s images/s", label,
                 timing["startup_s"], timing["steady_images"], steady_s,
                 timing["steady_images_per_s"])
    if duplicates:
        log.warning("%s: %d rows arrived twice (retried batches) and were kept once", label, duplicates)
    if pending:
        raise RuntimeError(f"{label}: shards {sorted(pending)} did not receive all their rows; "
                           "rerun the same command to redo only those shards")
    log.info("%s: %d images in %.1f s; images per Ray node: %s", label, len(rows),
             time.monotonic() - start, json.dumps(per_node, sort_keys=True))
