"""`patchcore coreset`: greedy coreset (paper §3.2, Alg. 1) over a feature store on K Ray actors.

The projected features (N, d) are split by shard over K actors. Each greedy step every actor
updates its min-distance vector with the newest centre and proposes its local argmax; the global
winner (largest value, then smallest global row) is agreed with a torch.distributed all-gather
(gloo on CPU, NCCL on GPU) inside the actors, so the result equals `coreset.greedy_coreset` on
the whole (N, d) matrix. No process holds the N x D features. DESIGN.md §4-§6.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from jobs import cluster, logs
from jobs.config import ActorFlags, CoresetFlags, arg, config_dict, config_json, parse_config
from jobs.folders import reuse_committed
from patchcore_core import coreset, features, storage
from patchcore_core.bank import Bank
from patchcore_core.spec import ModelSpec

log = logging.getLogger("jobs.coreset")

CHECKPOINT = "_checkpoint/coreset.json"
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True, kw_only=True)
class CoresetConfig(ActorFlags, CoresetFlags):
    """Select a coreset memory bank from a feature store (PatchCore §3.2) on K Ray actors."""

    features: str = arg("feature store folder/URI written by `patchcore extract`")
    out: str = arg("bank folder/URI to write (manifest.json last)")
    workers: int = arg("ranks (actors) sharing the features; 0 = automatic, sized by the "
                       "all-gather's cost: one per GPU (or per --cpus-per-worker CPUs), at most 8, "
                       "at least 50k rows per rank on CPU (2M on GPU), at most the shards", 0)
    checkpoint_every: int = arg("greedy steps between checkpoints; 0 = max(1000, size/100)", 0)
    retries: int = arg("restarts from the last checkpoint after an actor failure", 2)
    placement: str = arg("pack|spread: how the ranks, reserved all at once as one placement group, "
                         "go on nodes; pack = as few nodes as possible (all-gathers stay on the "
                         "host), spread = one per node where possible (spreads memory and CPU)",
                         "pack")
    placement_timeout_s: float = arg("seconds to wait until every rank's CPUs/GPU are free at once "
                                     "(an autoscaler may be adding nodes); then fail naming what "
                                     "is missing", 600.0)
    network_interface: str = arg("network interface of the collective on every node, e.g. eth0 "
                                 "(sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME) for clusters "
                                 "with several networks; '' = gloo/NCCL choose. The rendezvous is "
                                 "at rank 0's Ray node address", "")
    rendezvous_port: int = arg("TCP port of the rendezvous store on rank 0's node, for clusters "
                               "whose firewall opens only known ports; 0 = a free port rank 0 "
                               "picks. gloo/NCCL then connect the ranks on ephemeral ports: allow "
                               "TCP between the nodes on the --network-interface", 0)

    def __post_init__(self) -> None:
        if not self.features or not self.out:
            raise ValueError("--features and --out must be non-empty paths or URIs")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 (0 = automatic), got {self.checkpoint_every}")
        if self.retries < 0:
            raise ValueError(f"--retries must be >= 0, got {self.retries}")
        if self.placement not in cluster.PLACEMENT_STRATEGIES:
            raise ValueError(f"--placement must be one of {', '.join(cluster.PLACEMENT_STRATEGIES)}, "
                             f"got {self.placement!r}")
        if not self.placement_timeout_s > 0:
            raise ValueError(f"--placement-timeout-s must be > 0 seconds, got {self.placement_timeout_s}")
        if not 0 <= self.rendezvous_port <= 65535:
            raise ValueError(f"--rendezvous-port must be in [0, 65535] (0 = a free port), got "
                             f"{self.rendezvous_port}")
        if any(c.isspace() for c in self.network_interface):
            raise ValueError(f"--network-interface must be an interface name such as eth0, got "
                             f"{self.network_interface!r}")
        super().__post_init__()  # the actor and coreset flag checks


@dataclass(frozen=True)
class FeatureStore:
    """What the coreset needs from a feature-store manifest; rows are numbered in shard order."""

    uri: str
    spec: ModelSpec
    shard_uris: tuple[str, ...]
    shard_rows: tuple[int, ...]
    dim: int
    digest: str  # sha256 of the manifest: a re-extracted store never resumes an old checkpoint

    @property
    def num_rows(self) -> int:
        return sum(self.shard_rows)


def read_feature_store(uri: str, storage_options: dict[str, Any]) -> FeatureStore:
    """Parse `uri/manifest.json` (kind "features": spec, embed_dim, feature_width, shards
    [{file, rows}]); stores written before low-rank features lack feature_width (= embed_dim)."""
    manifest = storage.read_manifest(uri, "features", storage_options)
    missing = [key for key in ("spec", "embed_dim", "shards") if key not in manifest]
    if missing:
        raise ValueError(f"feature store {uri}: manifest lacks {missing}; rerun `patchcore extract`")
    spec = ModelSpec.from_json(manifest["spec"])
    shards = manifest["shards"]
    if not shards or not all(isinstance(s, dict) and {"file", "rows"} <= s.keys() for s in shards):
        raise ValueError(f"feature store {uri}: 'shards' must be a non-empty list of {{file, rows}}")
    dim = int(manifest.get("feature_width", manifest["embed_dim"]))
    if dim != features.feature_width(spec):
        raise ValueError(
            f"feature store {uri}: features are {dim} wide but its spec stores "
            f"{features.feature_width(spec)}-wide ones (embed_dim {spec.embed_dim}, low_rank "
            f"{spec.low_rank}); rerun `patchcore extract`"
        )
    store = FeatureStore(
        uri=uri,
        spec=spec,
        shard_uris=tuple(storage.join_uri(uri, s["file"]) for s in shards),
        shard_rows=tuple(int(s["rows"]) for s in shards),
        dim=dim,
        digest=hashlib.sha256(json.dumps(manifest, sort_keys=True).encode("utf-8")).hexdigest(),
    )
    if store.num_rows < 1:
        raise ValueError(f"feature store {uri} holds no patches; check the extract job's inputs")
    return store


def partition(shard_rows: Sequence[int], workers: int) -> list[list[int]]:
    """Split shard numbers into <= `workers` contiguous non-empty groups of similar row counts.

    Contiguous groups make each actor's rows one global range [offset, offset + n_k).
    Shards without rows are dropped; no group is empty.
    """
    shards = [i for i, rows in enumerate(shard_rows) if rows > 0]
    workers = max(1, min(workers, len(shards)))
    total = sum(shard_rows)
    groups: list[list[int]] = [[] for _ in range(workers)]
    done, g = 0, 0
    for position, shard in enumerate(shards):
        # move to the next group once this one reached its share, keeping enough shards for the rest
        remaining_groups = workers - g - 1
        if groups[g] and remaining_groups > 0 and (
            done >= total * (g + 1) / workers or len(shards) - position <= remaining_groups
        ):
            g += 1
        groups[g].append(shard)
        done += shard_rows[shard]
    return groups


class CoresetWorker:
    """Ray actor: one contiguous range of projected rows [offset, offset + n) and its min distances.

    Holds (n, d) projected features plus (n,) squared min distances, never the W-wide stored
    features (W = dim: embed_dim, or r for low-rank specs; `spec` is ModelSpec.to_json()).
    All actors of a job run `run` together; every step ends in one all-gather.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        shard_uris: list[str],
        shard_rows: list[int],
        offset: int,
        spec: dict[str, Any],
        dim: int,
        projection_dim: int,
        seed: int,
        device: str,
        storage_options: dict[str, Any],
        network_interface: str,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.interface = network_interface
        self.shard_uris, self.shard_rows, self.offset, self.dim = shard_uris, shard_rows, offset, dim
        self.storage_options = storage_options
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.store: Any = None
        # ψ for the stored width: low-rank features select the same coreset as D-dim ones
        projection = features.coreset_projection(ModelSpec.from_json(spec), projection_dim, seed)
        assert projection.shape == (dim, projection_dim), (projection.shape, dim)
        projection = projection.to(self.device)
        # (n, d); filled one shard at a time so only one shard's (rows, D) block is ever in memory
        self.projected = torch.empty(sum(shard_rows), projection_dim, device=self.device)
        lo = 0
        for uri, rows in zip(shard_uris, shard_rows):
            stored = storage.read_feature_shard(uri, ["feature"], storage_options)["feature"]
            if stored.shape != (rows, dim):
                raise ValueError(
                    f"feature shard {uri} holds {tuple(stored.shape)} features but the manifest "
                    f"says ({rows}, {dim}); the feature store is corrupt, rerun `patchcore extract`"
                )
            # projected per shard: a row's bits depend on its shard only, whatever the partition
            self.projected[lo : lo + rows] = stored.to(self.device) @ projection
            lo += rows
            del stored
        # exact pruned min-distance state over these rows (same floats as the plain loop)
        self.state = coreset.MinDistances(self.projected)

    def num_rows(self) -> int:
        return int(self.projected.shape[0])

    def node(self) -> str:
        """Ray node id of this actor (recorded in the bank manifest: where each rank ran)."""
        return ray.get_runtime_context().get_node_id()

    def open_store(self, port: int) -> tuple[str, int]:
        """Rank 0: start the TCP rendezvous store on this node; (host, port) for the other ranks.

        host: Ray's address of this node, which every node reaches as Ray itself does (the store
        listens on all of the node's addresses). port: `port`, or when 0 a free one the kernel
        picks, so that jobs sharing a node never collide.
        """
        host = ray.util.get_node_ip_address()
        try:
            self.store = dist.TCPStore(
                host, port, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT
            )
        except RuntimeError as err:  # torch's DistNetworkError: address in use, cannot bind
            raise ValueError(
                f"rendezvous store cannot listen on {host}:{port} ({err}); pass another "
                "--rendezvous-port, or 0 for a free port"
            ) from err
        return host, int(self.store.port)

    def join(self, host: str, port: int) -> None:
        """Join the process group of all actors of this job (on --network-interface if given)."""
        if self.interface:  # read by gloo at init_process_group, by NCCL at its first collective
            check_interface(self.interface)
            os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = self.interface
        if self.store is None:
            self.store = dist.TCPStore(host, port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
        dist.init_process_group(
            self.backend, store=self.store, rank=self.rank, world_size=self.world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )

    def _add_centre(self, centre: torch.Tensor, index: int) -> None:
        """min_sq <- min(min_sq, |x - centre|^2) row-wise; row `index` (global) marked SELECTED."""
        local = index - self.offset
        self.state.add_centre(centre, local if 0 <= local < self.num_rows() else None)

    def reset(self, chosen: list[int]) -> None:
        """Min distances to the centres `chosen` (global rows), recomputed exactly (for resuming)."""
        self.state.reset()
        width = self.projected.shape[1]
        for lo in range(0, len(chosen), 4096):
            batch = chosen[lo : lo + 4096]
            # every centre row is filled by its owner and zero elsewhere: the sum is exact
            centres = torch.zeros(len(batch), width, device=self.device)
            for j, index in enumerate(batch):
                if 0 <= index - self.offset < self.num_rows():
                    centres[j] = self.projected[index - self.offset]
            dist.all_reduce(centres, op=dist.ReduceOp.SUM)
            for j, index in enumerate(batch):
                self._add_centre(centres[j], index)

    def run(self, num_steps: int) -> list[int]:
        """`num_steps` greedy steps; returns the global rows chosen, identical on every actor."""
        width = self.projected.shape[1]
        mine = torch.empty(width + 2, dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        chosen = []
        for _ in range(num_steps):
            value, index = self.state.argmax(self.offset)
            # proposal = (value, global row, projected vector); float32 -> float64 is exact
            mine[0], mine[1] = value, index
            mine[2:] = self.projected[index - self.offset]
            dist.all_gather(gathered, mine)
            proposals = torch.stack(gathered).cpu()  # (K, d + 2), ranks in global row order
            # largest value, then smallest global row (paper tie-break; split invariant): rank k
            # owns rows below rank k + 1's, so the first rank holding the largest value wins
            _, winner = coreset.local_argmax(proposals[:, 0], 0)
            index = int(proposals[winner, 1])
            self._add_centre(proposals[winner, 2:].to(self.device, torch.float32), index)
            chosen.append(index)
        return chosen

    def radius(self) -> float:
        """Coverage radius: max over all N rows of the distance to the nearest centre."""
        local = torch.tensor([max(0.0, self.state.max_sq())], dtype=torch.float64, device=self.device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return math.sqrt(float(local))

    def rows(self, chosen: list[int]) -> dict[str, Any]:
        """Stored (W-wide) features and provenance of the chosen rows this actor owns (any order)."""
        out: dict[str, Any] = {"index": [], "feature": [], "image_id": [], "y": [], "x": []}
        lo = self.offset
        wanted = np.asarray(sorted(chosen), dtype=np.int64)
        for uri, rows in zip(self.shard_uris, self.shard_rows):
            here = wanted[(wanted >= lo) & (wanted < lo + rows)]
            if len(here):  # read only shards that hold winners
                shard = storage.read_feature_shard(uri, None, self.storage_options)
                local = torch.from_numpy(here - lo)
                out["index"].append(here)
                out["feature"].append(shard["feature"][local].numpy())
                out["image_id"] += [shard["image_id"][i] for i in local.tolist()]
                out["y"].append(shard["y"][local].numpy())
                out["x"].append(shard["x"][local].numpy())
            lo += rows
        if not out["index"]:
            empty = np.zeros(0, np.int64)
            return {"index": empty, "feature": np.zeros((0, self.dim), np.float32),
                    "image_id": [], "y": empty, "x": empty}
        return {k: v if k == "image_id" else np.concatenate(v) for k, v in out.items()}

    def close(self) -> None:
        dist.destroy_process_group()


def check_interface(name: str) -> None:
    """ValueError unless this node has network interface `name`, naming the ones it has."""
    have = sorted(n for _, n in socket.if_nameindex())
    if name not in have:
        raise ValueError(
            f"--network-interface {name!r}: node {ray.util.get_node_ip_address()} has no such "
            f"interface, only {have}; pass one that every node has, or '' to let gloo/NCCL choose"
        )


def checkpoint_identity(cfg: CoresetConfig, store: FeatureStore, start: int) -> dict[str, Any]:
    """The run identity a checkpoint must match to be resumed."""
    return {
        "features": store.uri,
        "features_digest": store.digest,
        "num_points": store.num_rows,
        "dim": store.dim,
        "projection_dim": cfg.projection_dim,
        "seed": cfg.seed,
        "start": start,
    }


def load_checkpoint(uri: str, identity: dict[str, Any], options: dict[str, Any]) -> list[int]:
    """Chosen rows saved by an interrupted run with the same identity ([] when none)."""
    if not storage.exists(uri, options):
        return []
    saved = json.loads(storage.read_bytes(uri, options).decode("utf-8"))
    mismatch = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
    if mismatch:
        raise ValueError(
            f"checkpoint {uri} belongs to another run (saved, now): {mismatch}; "
            "pass --overwrite to start afresh, or use another --out"
        )
    chosen = [int(i) for i in saved["chosen"]]
    if len(chosen) != saved["step"] or not chosen or chosen[0] != identity["start"]:
        raise ValueError(f"checkpoint {uri} is inconsistent; pass --overwrite to start afresh")
    return chosen


def select(
    cfg: CoresetConfig,
    store: FeatureStore,
    chosen: list[int],
    num_samples: int,
    save_checkpoint: Callable[[list[int]], None],
    options: dict[str, Any],
) -> tuple[list[int], float, dict[str, Any], dict[str, Any]]:
    """Greedy selection on actors, continuing from `chosen`; (indices, radius, bank rows, layout).

    The ranks are reserved together as one placement group (`cluster.place_gang`): all start or
    none, within --placement-timeout-s. After an actor or node failure the group keeps (or Ray
    re-reserves) its bundles, fresh actors take them and resume from the last checkpoint.
    """
    device, workers = cluster.coreset_actors(
        cfg, sum(1 for r in store.shard_rows if r > 0), store.num_rows)
    groups = partition(store.shard_rows, workers)
    starts = np.concatenate([[0], np.cumsum(store.shard_rows)]).tolist()
    every = cfg.checkpoint_every or max(1000, num_samples // 100)
    run_id = uuid.uuid4().hex[:8]
    log.info("coreset run %s on %d %s actor(s), shard groups %s, %d steps per chunk",
             run_id, len(groups), device, [[g[0], g[-1]] for g in groups], every)
    bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if device == "cuda" else {})}
    group = cluster.place_gang(len(groups), bundle, cfg.placement, cfg.placement_timeout_s,
                               label=f"coreset run {run_id}")
    remote = ray.remote(CoresetWorker)
    attempt, nodes = 0, []
    try:
        while True:
            if attempt:  # new ranks must not go to a node of the failed attempt that is gone
                lost = cluster.lost_nodes(nodes, cfg.placement_timeout_s)
                if lost:
                    log.warning("coreset run %s: node(s) %s lost; their ranks' resources are "
                                "reserved again elsewhere", run_id, sorted(n[:8] for n in lost))
            if not group.wait(timeout_seconds=cfg.placement_timeout_s):  # re-reserved after a node loss
                raise TimeoutError(
                    f"coreset run {run_id}: the ranks' placement group lost bundles with a node "
                    f"and got none back within --placement-timeout-s {cfg.placement_timeout_s:g}; "
                    f"the cluster has {ray.available_resources()} free. Add nodes, or rerun with "
                    "a --workers that fits: it resumes from the checkpoint"
                )
            actors = [
                remote.options(  # named for `ray list actors`: coreset-<run>-<attempt>-<rank>
                    name=f"coreset-{run_id}-{attempt}-{rank}", num_cpus=cfg.cpus_per_worker,
                    num_gpus=1 if device == "cuda" else 0, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=group, placement_group_bundle_index=rank),
                ).remote(
                    rank, len(groups), [store.shard_uris[i] for i in shard_group],
                    [store.shard_rows[i] for i in shard_group], starts[shard_group[0]],
                    store.spec.to_json(), store.dim, cfg.projection_dim, cfg.seed, device, options,
                    cfg.network_interface,
                )
                for rank, shard_group in enumerate(groups)
            ]
            try:
                nodes = cluster.get_all([a.node.remote() for a in actors])
                cluster.get_all([a.num_rows.remote() for a in actors])  # all shards read and projected
                host, port = ray.get(actors[0].open_store.remote(cfg.rendezvous_port))
                log.info("coreset run %s attempt %d: rendezvous at %s:%d; ranks on %d node(s): %s",
                         run_id, attempt, host, port, len(set(nodes)), [n[:8] for n in nodes])
                cluster.get_all([a.join.remote(host, port) for a in actors])
                cluster.get_all([a.reset.remote(chosen) for a in actors])
                progress = logs.Progress("coreset steps", num_samples, done=len(chosen), interval_s=5.0)
                while len(chosen) < num_samples:
                    steps = min(every, num_samples - len(chosen))
                    new = cluster.get_all([a.run.remote(steps) for a in actors])
                    assert all(n == new[0] for n in new), "actors disagree on the winners"
                    chosen = chosen + new[0]
                    save_checkpoint(chosen)
                    progress.update(len(chosen), force=len(chosen) == num_samples)
                radius = cluster.get_all([a.radius.remote() for a in actors])[0]
                parts = cluster.get_all([a.rows.remote(chosen) for a in actors])
                cluster.get_all([a.close.remote() for a in actors])
                layout = {"device": device, "workers": len(groups), "restarts": attempt,
                          "nodes": nodes}  # Ray node id of each rank (last attempt)
                return chosen, radius, _merge_rows(parts, chosen), layout
            except ray.exceptions.RayError as err:
                attempt += 1
                # a ValueError in a rank (RayTaskError subclasses its cause) is a bad flag such
                # as --network-interface or --rendezvous-port: restarting cannot help
                if attempt > cfg.retries or isinstance(err, ValueError):
                    raise
                log.warning("coreset actor failed (%s); restart %d/%d from step %d",
                            type(err).__name__, attempt, cfg.retries, len(chosen))
            finally:
                for actor in actors:
                    ray.kill(actor)
    finally:
        remove_placement_group(group)


def _merge_rows(parts: Sequence[dict[str, Any]], chosen: list[int]) -> dict[str, Any]:
    """Bank rows from the actors' parts, in selection order."""
    index = np.concatenate([p["index"] for p in parts])
    stored = np.concatenate([p["feature"] for p in parts])
    image_ids = [i for p in parts for i in p["image_id"]]
    ys = np.concatenate([p["y"] for p in parts])
    xs = np.concatenate([p["x"] for p in parts])
    where = {int(g): j for j, g in enumerate(index)}
    assert len(where) == len(index) == len(chosen), (len(where), len(index), len(chosen))
    order = [where[g] for g in chosen]
    return {
        "feature": torch.from_numpy(stored[order]),
        "image_id": tuple(image_ids[j] for j in order),
        "y": torch.from_numpy(ys[order]),
        "x": torch.from_numpy(xs[order]),
    }


def run(cfg: CoresetConfig) -> None:
    """The job: resolve, select (resuming from a checkpoint), publish the bank."""
    options = cfg.options
    log.info("config %s", config_json(cfg))
    store = read_feature_store(cfg.features, options)  # fail before touching the cluster
    num_points = store.num_rows
    num_samples = cfg.num_samples(num_points)
    start = coreset.first_index(num_points, cfg.seed)
    log.info("feature store %s: %d patches of D=%d in %d shards; keeping %d, starting at row %d",
             store.uri, num_points, store.dim, len(store.shard_uris), num_samples, start)
    if reuse_committed(cfg.out, "bank", options, overwrite=cfg.overwrite) is not None:
        return
    if cfg.dry_run:
        log.info("dry run: stopping before any work")
        return
    checkpoint_uri = storage.join_uri(cfg.out, CHECKPOINT)
    identity = checkpoint_identity(cfg, store, start)
    if cfg.overwrite:
        storage.remove(storage.join_uri(cfg.out, storage.MANIFEST_NAME), options)  # un-commit
        storage.remove(checkpoint_uri, options)
    chosen = load_checkpoint(checkpoint_uri, identity, options) or [start]
    if len(chosen) > 1:
        log.info("resuming from checkpoint at step %d", len(chosen))
    chosen = chosen[:num_samples]  # greedy is prefix-consistent: a longer run's prefix is exact

    def save_checkpoint(indices: list[int]) -> None:
        body = {**identity, "step": len(indices), "chosen": indices}
        storage.write_bytes(checkpoint_uri, json.dumps(body).encode("utf-8"), options)

    with cluster.ray_session():
        chosen, radius, rows, layout = select(
            cfg, store, chosen, num_samples, save_checkpoint, options
        )
    bank = Bank(
        spec=store.spec,
        features=rows["feature"],
        image_ids=rows["image_id"],
        ys=rows["y"],
        xs=rows["x"],
        projection_seed=cfg.seed,
        coverage_radius=radius,
        info={
            "counts": {"num_patches": num_points, "num_shards": len(store.shard_uris),
                       "num_entries": num_samples},
            "coreset": {"method": "greedy", "start": start, "projection_dim": cfg.projection_dim,
                        **layout},
            "features": store.uri,
            "features_digest": store.digest,
            "config": config_dict(cfg),
        },
    )
    storage.save_bank(cfg.out, bank, options)
    storage.remove(checkpoint_uri, options)
    log.info("bank %s committed: %d entries, coverage radius %.6g", cfg.out, num_samples, radius)


def main(argv: Sequence[str] | None = None) -> None:
    logs.setup_logging()
    run(parse_config(CoresetConfig, argv, prog="patchcore coreset"))


if __name__ == "__main__":
    main()
