"""The Ray cluster a job runs on: session, devices, and how many actors of what size fit.

Owns: connecting to `RAY_ADDRESS` or starting a local Ray (`ray_session`), the device of the
model actors (`resolve_device`), CPU/GPU arithmetic that packs model actors and decode tasks onto
nodes (`resolve_resources`), coreset ranks (`coreset_actors`, reserved all at once by
`place_gang`, nodes lost under them found by `lost_nodes`), and process settings of an actor
(`keep_freed_memory`). Must not: read or write storage, or know what an actor computes.

`RAY_ADDRESS` set: connect to that cluster. Unset: start a local Ray for the run. A Ray that is
already initialised (tests, notebooks) is reused and left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

if TYPE_CHECKING:
    from jobs.config import ActorFlags

log = logging.getLogger("jobs.cluster")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
# Least CPUs a read+decode task reserves (it reserves one when the model actors leave one).
# Decoding is a few ms of an image's work against tens for the model, so a fraction of a CPU keeps
# up on a small machine whose actors hold the rest; with none left no decode task could start.
DECODE_CPUS = 0.25
# How long an idle task worker is kept (Ray's default: 1 s once a node has more workers than CPUs,
# which the model actors alone reach). Decode and map-writing tasks come every few hundred ms per
# stream, but with gaps above 1 s on slow backbones, so Ray kept killing their workers and starting
# new ones, each importing torch again: wide_resnet50_2 `score` spent 519 against 412 CPU ms an
# image and ran at 0.59 of an in-process loop instead of 0.83 (benchmarks/results/throughput.txt).
# Set for a local Ray here and for clusters in infra/Dockerfile (RAY_idle_worker_killing_time_threshold_ms).
IDLE_WORKER_KEEP_MS = 60_000


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Connect to `RAY_ADDRESS` or start a local Ray; shut down on exit only what was started here."""
    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        # Token-auth clusters read ~/.ray/auth_token (or RAY_AUTH_TOKEN) themselves.
        ray.init(address=address)
        log.info("connected to Ray cluster at %s", address)
    else:
        ray.init(include_dashboard=False,
                 _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS})
        log.info("no RAY_ADDRESS: started a local Ray with %s", ray.cluster_resources())
    try:
        yield
    finally:
        ray.shutdown()


def on_remote_cluster() -> bool:
    """Whether jobs run on the cluster at `RAY_ADDRESS`, whose autoscaler may add nodes, rather
    than on a local Ray whose resources are fixed for the run."""
    return bool(os.environ.get("RAY_ADDRESS", "").strip())


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let this process reuse the memory it frees, up to `limit_bytes` (glibc); True if set.

    glibc serves allocations above a threshold (128 KiB, rising to at most 32 MiB) with fresh
    pages from the kernel and unmaps them when freed, so a model actor that allocates the same
    activations for every batch page-faults them all in again: on CPU up to 40% of a
    wide_resnet50_2 forward at batch 32. With the threshold and the heap-trim limit raised, freed
    activations stay in the heap for the next batch; the process keeps its peak memory, which
    every batch needs anyway. Not glibc (macOS, musl): nothing changes, False.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes)
                and libc.mallopt(_M_TRIM_THRESHOLD, limit_bytes))


def cluster_gpus() -> int:
    """Number of GPUs the connected Ray cluster advertises."""
    return int(ray.cluster_resources().get("GPU", 0))


def get_all(refs: Sequence[ray.ObjectRef]) -> list[Any]:
    """`ray.get` of every ref, raising the first failure as soon as it happens.

    Plain `ray.get(refs)` waits on refs in order, so a task stuck in a collective whose peer
    died would hide the peer's error until a timeout.
    """
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)  # raises the task's or actor's error now
    return ray.get(list(refs))


def resolve_device(flag: str) -> str:
    """'cpu' or 'cuda' for the model actors, from --device and the connected cluster."""
    gpus = cluster_gpus()
    if flag == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if flag == "cuda" and gpus < 1:
        raise ValueError("--device cuda but the Ray cluster has no GPUs; use --device cpu or auto")
    return flag


def _floor_ray(cpus: float) -> float:
    """`cpus` rounded down to Ray's resource unit (1/10000)."""
    return math.floor(cpus * 1e4) / 1e4


def node_cpus() -> list[float]:
    """CPUs of each alive node of the connected Ray that has any (a KubeRay head has none)."""
    counts = [float(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    return [c for c in counts if c > 0]


def _actors_on(node_cpus: float, share: float) -> int:
    """Automatic CPU actors of `share` CPUs on a node: as many as leave DECODE_CPUS, at least one."""
    return max(1, int((node_cpus - DECODE_CPUS) // share))


def _auto_cpu_actors(nodes: list[float], cpus_per_worker: float) -> tuple[int, float]:
    """(actors, CPUs each) filling every node with CPU actors but DECODE_CPUS.

    Each node takes floor(its CPUs / --cpus-per-worker) actors (at least one); one reservation
    for all actors, trimmed so that the smallest node's actors leave DECODE_CPUS (2 CPUs: two
    actors of 0.875). Per node, because a decode task must fit on one node.
    """
    smallest = min(nodes)
    per_smallest = max(1, int(smallest // cpus_per_worker))
    share = min(cpus_per_worker, _floor_ray((smallest - DECODE_CPUS) / per_smallest))
    if share <= 0:  # a node with at most DECODE_CPUS CPUs: nothing fits; the caller explains
        return len(nodes), cpus_per_worker
    return sum(_actors_on(c, share) for c in nodes), share


def resolve_resources(flags: ActorFlags, device: str) -> tuple[int, float, float]:
    """(model actors, CPUs each actor reserves, CPUs each decode task reserves) on the Ray now
    connected.

    Actors: --workers of --cpus-per-worker CPUs; or one per GPU; or on CPU as many as fill every
    node but DECODE_CPUS (`_auto_cpu_actors`). A decode task reserves one CPU if the actors
    leave one on some node, else what they leave there (at least DECODE_CPUS): one decode task
    per spare CPU keeps up, and every concurrent task is a worker process that imports torch.
    ValueError when the actors leave less than DECODE_CPUS of a local Ray: no decode task could
    ever start and the job would wait forever. A remote cluster may grow (its autoscaler adds
    nodes for the waiting decode tasks), so there it is only logged.
    """
    nodes = node_cpus() or [0.0]
    cpus = sum(nodes)
    actor_cpus = flags.cpus_per_worker
    if flags.workers:
        workers = flags.workers
    elif device == "cuda":
        workers = max(1, cluster_gpus())
    else:
        workers, actor_cpus = _auto_cpu_actors(nodes, actor_cpus)
    reserved = workers * actor_cpus
    spare = cpus - reserved
    if not flags.workers and device != "cuda":  # actors packed per node: what one node keeps
        spare = min(c - _actors_on(c, actor_cpus) * actor_cpus for c in nodes)
    # A decode task must fit on one node wherever Ray puts the actors: a node of c CPUs holding
    # k of them keeps c - k * actor_cpus, at least `room` on the best node. Sized by the whole
    # cluster's spare alone, two nodes keeping 0.25 each would get 0.5-CPU tasks that never start.
    room = max(c - min(int(c // actor_cpus), workers) * actor_cpus for c in nodes)
    decode_cpus = min(1.0, max(DECODE_CPUS, _floor_ray(min(spare, room))))
    if spare >= DECODE_CPUS:
        return workers, actor_cpus, decode_cpus
    if on_remote_cluster():
        log.info("the model actors reserve %g of the cluster's %g CPUs: reading and decoding "
                 "waits until the autoscaler adds CPUs", reserved, cpus)
        return workers, actor_cpus, decode_cpus
    fit = int((cpus - DECODE_CPUS) // actor_cpus)
    hints = [f"--workers {fit}"] if fit >= 1 else []
    if cpus > DECODE_CPUS:
        hints.append(f"--cpus-per-worker {_floor_ray((cpus - DECODE_CPUS) / workers):g} "
                     f"with --workers {workers}")
    raise ValueError(
        f"--workers {flags.workers or f'0 (automatic: {workers})'} x --cpus-per-worker "
        f"{actor_cpus:g} reserve {reserved:g} of the local Ray's {cpus:g} CPUs for model actors, "
        f"leaving {max(0.0, spare):g} for reading and decoding images, which needs "
        f"{DECODE_CPUS:g}: the job would wait forever. Use {' or '.join(hints) or 'a Ray with more CPUs'}"
    )


# Images per backbone forward on CPU, whatever --batch-size hands an actor: larger forwards spill the
# CPU caches. `python -m benchmarks.forward_batch_bench` (1 thread, CPU ms an image at 4 / 8 / 16 /
# 32 images a forward) on this project's 2-core machine: efficientnet_lite0 17.9 / 22.2 / 33.6 /
# 48.4, wide_resnet50_2 183.5 / 183.1 / 201.3 / 235.5. GPUs take the whole batch. Scores do not
# depend on it (the same per-image computation).
CPU_FORWARD_BATCH = 4


def forward_batch(device: str, batch_size: int) -> int:
    """Images per backbone forward in an actor given batches of `batch_size` on `device`."""
    return max(1, batch_size if device.startswith("cuda") else min(batch_size, CPU_FORWARD_BATCH))


def task_slots(workers: int, actor_cpus: float, decode_cpus: float) -> int | None:
    """Most decode (or map-writing) tasks a stage may run at once: as many as the CPUs the model
    actors leave hold, at least one; None (Ray Data's own limit) on a remote cluster, whose
    autoscaler may add CPUs for waiting tasks.

    Without a cap, CPUs that the actors free at the end of a run (or between batches) let Ray
    Data start a burst of tasks, each in a new worker process that imports torch first (seconds
    of CPU each) to do milliseconds of work.
    """
    if on_remote_cluster():
        return None
    spare = sum(node_cpus()) - workers * actor_cpus
    return max(1, int(spare / decode_cpus + 1e-9))


# Automatic coreset ranks (--workers 0) are sized by the collective's cost, not by the CPU count.
# Each greedy step every rank scans its n_k rows (a d = 128 wide distance update: ~25 ns a row on
# a CPU core, ~0.3 ns on a GPU, which is bound by reading the 512 B row), then waits for one
# all-gather of K proposals: across hosts K - 1 ring hops of ~50 us (gloo over TCP; NCCL is
# similar for messages this small). Once a rank's scan is as short as that latency, one more rank
# only adds latency. So a rank gets at least ROWS_PER_RANK rows (50k CPU rows ~ 1.3 ms a step,
# 2M GPU rows ~ 0.6 ms, against ~0.35 ms for 8 ranks) and at most MAX_AUTO_RANKS start (past 8
# the ring's latency grows faster than the scan shrinks). --workers overrides both, e.g. when the
# projected rows (512 B each at d = 128) do not fit in 8 actors' memory.
MAX_AUTO_RANKS = 8
ROWS_PER_RANK = {"cpu": 50_000, "cuda": 2_000_000}


def coreset_actors(flags: ActorFlags, num_shards: int, num_rows: int) -> tuple[str, int]:
    """(device, ranks) of a coreset job over `num_rows` rows in `num_shards` non-empty shards.

    --workers when given; otherwise min(GPUs, or CPUs // --cpus-per-worker; MAX_AUTO_RANKS;
    ceil(num_rows / ROWS_PER_RANK[device])), at least 1. Never more than the shards (each rank
    owns whole shards).
    """
    device = resolve_device(flags.device)
    if flags.workers:
        workers = flags.workers
    else:
        slots = cluster_gpus() if device == "cuda" else int(
            ray.cluster_resources().get("CPU", 1) // flags.cpus_per_worker)
        workers = min(slots, MAX_AUTO_RANKS, math.ceil(num_rows / ROWS_PER_RANK[device]))
    return device, max(1, min(workers, num_shards))


PLACEMENT_STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}


@ray.remote(num_cpus=0)
def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def lost_nodes(node_ids: Sequence[str], timeout_s: float) -> set[str]:
    """Those of `node_ids` that are gone, once Ray has decided (at most `timeout_s` seconds).

    After a collective fails, a peer's node may be dead while Ray still lists it as alive (its
    health checks take seconds to give up on a node); new actors placed there now would die too
    and use up a restart. A zero-CPU task pinned to each node returns once the node answers, or
    fails once Ray declares it dead; a node that answers neither within `timeout_s` counts as lost.
    """
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    probes = {
        node: _node_id.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        for node in set(node_ids) & alive
    }
    lost = set(node_ids) - alive
    if probes:
        ray.wait(list(probes.values()), num_returns=len(probes), timeout=timeout_s)
    for node, ref in probes.items():
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayError:  # unschedulable (node dead), crashed, or no answer yet
            lost.add(node)
            ray.cancel(ref, force=True)
    return lost


def _bundles_that_fit(bundle: dict[str, float]) -> int:
    """How many `bundle`s the alive nodes could hold at most (by their total resources)."""
    total = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        total += min(int(have.get(k, 0.0) // v) for k, v in bundle.items() if v > 0)
    return total


def place_gang(num_bundles: int, bundle: dict[str, float], placement: str, timeout_s: float,
               label: str) -> PlacementGroup:
    """A placement group of `num_bundles` x `bundle`, ready: all of them at once or none.

    Actors that meet in a collective must all run at the same time; created one by one, the first
    ones would hold their CPUs while the last wait, possibly forever. The group reserves every
    bundle atomically (`placement` pack: as few nodes as possible; spread: one per node where
    possible). TimeoutError after `timeout_s` seconds (an autoscaler may still be adding nodes)
    names what is missing and the flags to change; the group is removed then.
    """
    group = placement_group([dict(bundle)] * num_bundles, strategy=PLACEMENT_STRATEGIES[placement])
    if group.wait(timeout_seconds=timeout_s):
        return group
    remove_placement_group(group)
    fit = _bundles_that_fit(bundle)
    need = {k: v * num_bundles for k, v in bundle.items()}
    hints = [f"--workers {fit}"] if 1 <= fit < num_bundles else []
    if "CPU" in bundle and "GPU" not in bundle:
        hints.append("a smaller --cpus-per-worker")
    hints.append(f"a larger --placement-timeout-s (now {timeout_s:g}) if nodes are being added")
    raise TimeoutError(
        f"{label}: {num_bundles} actors of {bundle} (together {need}, --placement {placement}) "
        f"could not all be placed within {timeout_s:g} s; the cluster has "
        f"{ray.cluster_resources()} in all and {ray.available_resources()} free, room for "
        f"{fit} such actors. Use {' or '.join(hints)}"
    )
