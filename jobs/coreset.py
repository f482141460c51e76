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
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from jobs import _cli, _ray
from patchcore_core import coreset, storage
from patchcore_core.bank import Bank
from patchcore_core.spec import ModelSpec

log = logging.getLogger("jobs.coreset")

CHECKPOINT = "_checkpoint/coreset.json"
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_RATIO = 0.1
# Elements of the (rows, d) temporary in one min-distance update: 16 MiB on CPU, 256 MiB on GPU.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class CoresetConfig:
    """Select a coreset memory bank from a feature store (PatchCore §3.2) on K Ray actors."""

    features: str = _cli.arg("feature store folder/URI written by `patchcore extract`")
    out: str = _cli.arg("bank folder/URI to write (manifest.json last)")
    ratio: float | None = _cli.arg(f"fraction of all patches to keep; {DEFAULT_RATIO} if no --size", None)
    size: int | None = _cli.arg("number of patches to keep, instead of --ratio", None)
    projection_dim: int = _cli.arg("width of the seeded Gaussian random projection", 128)
    seed: int = _cli.arg("seed of the projection and of the first selected patch", 0)
    workers: int = _cli.arg("actors sharing the features; 0 = one per GPU, or per CPU up to the shards", 0)
    cpus_per_worker: float = _cli.arg("CPUs Ray reserves for each actor", 1.0)
    device: str = _cli.arg("auto|cpu|cuda; auto = cuda when the Ray cluster has GPUs", "auto")
    checkpoint_every: int = _cli.arg("greedy steps between checkpoints; 0 = max(1000, size/100)", 0)
    retries: int = _cli.arg("restarts from the last checkpoint after an actor failure", 2)
    overwrite: bool = _cli.arg("replace a committed bank at --out", False)
    dry_run: bool = _cli.arg("read the feature manifest, log the plan, then stop", False)
    storage_options: str = _cli.arg("JSON object of fsspec options for every URI", "")

    def __post_init__(self) -> None:
        if not self.features or not self.out:
            raise ValueError("--features and --out must be non-empty paths or URIs")
        if self.ratio is not None and self.size is not None:
            raise ValueError(f"give --ratio or --size, not both (got {self.ratio} and {self.size})")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"--size must be >= 1, got {self.size}")
        if self.projection_dim < 1:
            raise ValueError(f"--projection-dim must be >= 1, got {self.projection_dim}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0 = automatic), got {self.workers}")
        if not 0.0 < self.cpus_per_worker <= 1024:
            raise ValueError(f"--cpus-per-worker must be in (0, 1024], got {self.cpus_per_worker}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 (0 = automatic), got {self.checkpoint_every}")
        if self.retries < 0:
            raise ValueError(f"--retries must be >= 0, got {self.retries}")
        _cli.parse_storage_options(self.storage_options)  # raises on bad JSON

    def num_samples(self, num_points: int) -> int:
        ratio = DEFAULT_RATIO if self.ratio is None and self.size is None else self.ratio
        return coreset.coreset_size(num_points, ratio, self.size)


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
    """Parse `uri/manifest.json` (kind "features": spec, embed_dim, shards [{file, rows}])."""
    manifest = storage.read_manifest(uri, "features", storage_options)
    missing = [key for key in ("spec", "embed_dim", "shards") if key not in manifest]
    if missing:
        raise ValueError(f"feature store {uri}: manifest lacks {missing}; rerun `patchcore extract`")
    spec = ModelSpec.from_json(manifest["spec"])
    shards = manifest["shards"]
    if not shards or not all(isinstance(s, dict) and {"file", "rows"} <= s.keys() for s in shards):
        raise ValueError(f"feature store {uri}: 'shards' must be a non-empty list of {{file, rows}}")
    dim = int(manifest["embed_dim"])
    if dim != spec.embed_dim:
        raise ValueError(f"feature store {uri}: embed_dim {dim} != spec.embed_dim {spec.embed_dim}")
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

    Holds (n, d) projected features plus (n,) squared min distances, never the D-wide features.
    All actors of a job run `run` together; every step ends in one all-gather.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        shard_uris: list[str],
        shard_rows: list[int],
        offset: int,
        dim: int,
        projection_dim: int,
        seed: int,
        device: str,
        storage_options: dict[str, Any],
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.shard_uris, self.shard_rows, self.offset, self.dim = shard_uris, shard_rows, offset, dim
        self.storage_options = storage_options
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.store: Any = None
        projection = coreset.projection_matrix(dim, projection_dim, seed).to(self.device)
        # (n, d); filled one shard at a time so only one shard's (rows, D) block is ever in memory
        self.projected = torch.empty(sum(shard_rows), projection_dim, device=self.device)
        lo = 0
        for uri, rows in zip(shard_uris, shard_rows):
            features = storage.read_feature_shard(uri, ["feature"], storage_options)["feature"]
            if features.shape != (rows, dim):
                raise ValueError(
                    f"feature shard {uri} holds {tuple(features.shape)} features but the manifest "
                    f"says ({rows}, {dim}); the feature store is corrupt, rerun `patchcore extract`"
                )
            # projected per shard: a row's bits depend on its shard only, whatever the partition
            self.projected[lo : lo + rows] = features.to(self.device) @ projection
            lo += rows
            del features
        # exact pruned min-distance state over these rows (same floats as the plain loop)
        self.state = coreset.MinDistances(self.projected)

    def num_rows(self) -> int:
        return int(self.projected.shape[0])

    def open_store(self) -> tuple[str, int]:
        """Rank 0: start the TCP rendezvous store on a free port of this node; (host, port)."""
        host = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT
        )
        return host, int(self.store.port)

    def join(self, host: str, port: int) -> None:
        """Join the process group of all actors of this job."""
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
            proposals = torch.stack(gathered).cpu()  # (K, d + 2)
            # largest value, then smallest global row (paper tie-break; split invariant)
            winner = min(range(self.world_size),
                         key=lambda k: (-float(proposals[k, 0]), float(proposals[k, 1])))
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
        """Full-D features and provenance of the chosen rows this actor owns (any order)."""
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


def _resolve_resources(cfg: CoresetConfig, num_shards: int) -> tuple[str, int]:
    """(device, workers) from the config and the connected cluster."""
    gpus = _ray.cluster_gpus()
    device = ("cuda" if gpus > 0 else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and gpus < 1:
        raise ValueError("--device cuda but the Ray cluster has no GPUs; use --device cpu or auto")
    if cfg.workers:
        workers = cfg.workers
    elif device == "cuda":
        workers = gpus
    else:
        workers = int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_worker)
    return device, max(1, min(workers, num_shards))


def select(
    cfg: CoresetConfig,
    store: FeatureStore,
    chosen: list[int],
    num_samples: int,
    save_checkpoint: Callable[[list[int]], None],
    options: dict[str, Any],
) -> tuple[list[int], float, dict[str, Any], dict[str, Any]]:
    """Greedy selection on actors, continuing from `chosen`; (indices, radius, bank rows, layout)."""
    device, workers = _resolve_resources(cfg, sum(1 for r in store.shard_rows if r > 0))
    groups = partition(store.shard_rows, workers)
    starts = np.concatenate([[0], np.cumsum(store.shard_rows)]).tolist()
    every = cfg.checkpoint_every or max(1000, num_samples // 100)
    run_id = uuid.uuid4().hex[:8]
    log.info("coreset run %s on %d %s actor(s), shard groups %s, %d steps per chunk",
             run_id, len(groups), device, [[g[0], g[-1]] for g in groups], every)
    # all actors must run at once (collectives): say so if the cluster cannot hold them now
    cpus, have = len(groups) * cfg.cpus_per_worker, ray.cluster_resources().get("CPU", 0.0)
    if cpus > have:
        log.warning("%d actors need %.1f CPUs but the cluster has %.1f: waiting for more nodes; "
                    "lower --workers or --cpus-per-worker to start now", len(groups), cpus, have)
    remote = ray.remote(CoresetWorker)
    attempt = 0
    while True:
        actors = [
            remote.options(  # named for `ray list actors`: coreset-<run>-<attempt>-<rank>
                name=f"coreset-{run_id}-{attempt}-{rank}", num_cpus=cfg.cpus_per_worker,
                num_gpus=1 if device == "cuda" else 0, max_restarts=0,
            ).remote(
                rank, len(groups), [store.shard_uris[i] for i in group],
                [store.shard_rows[i] for i in group], starts[group[0]], store.dim,
                cfg.projection_dim, cfg.seed, device, options,
            )
            for rank, group in enumerate(groups)
        ]
        try:
            _ray.get_all([a.num_rows.remote() for a in actors])  # all shards read and projected
            host, port = ray.get(actors[0].open_store.remote())
            _ray.get_all([a.join.remote(host, port) for a in actors])
            _ray.get_all([a.reset.remote(chosen) for a in actors])
            progress = _ray.Progress("coreset steps", num_samples, done=len(chosen), interval_s=5.0)
            while len(chosen) < num_samples:
                steps = min(every, num_samples - len(chosen))
                new = _ray.get_all([a.run.remote(steps) for a in actors])
                assert all(n == new[0] for n in new), "actors disagree on the winners"
                chosen = chosen + new[0]
                save_checkpoint(chosen)
                progress.update(len(chosen), force=len(chosen) == num_samples)
            radius = _ray.get_all([a.radius.remote() for a in actors])[0]
            parts = _ray.get_all([a.rows.remote(chosen) for a in actors])
            _ray.get_all([a.close.remote() for a in actors])
            layout = {"device": device, "workers": len(groups), "restarts": attempt}
            return chosen, radius, _merge_rows(parts, chosen), layout
        except ray.exceptions.RayError as err:
            attempt += 1
            if attempt > cfg.retries:
                raise
            log.warning("coreset actor failed (%s); restart %d/%d from step %d",
                        type(err).__name__, attempt, cfg.retries, len(chosen))
        finally:
            for actor in actors:
                ray.kill(actor)


def _merge_rows(parts: Sequence[dict[str, Any]], chosen: list[int]) -> dict[str, Any]:
    """Bank rows from the actors' parts, in selection order."""
    index = np.concatenate([p["index"] for p in parts])
    features = np.concatenate([p["feature"] for p in parts])
    image_ids = [i for p in parts for i in p["image_id"]]
    ys = np.concatenate([p["y"] for p in parts])
    xs = np.concatenate([p["x"] for p in parts])
    where = {int(g): j for j, g in enumerate(index)}
    assert len(where) == len(index) == len(chosen), (len(where), len(index), len(chosen))
    order = [where[g] for g in chosen]
    return {
        "feature": torch.from_numpy(features[order]),
        "image_id": tuple(image_ids[j] for j in order),
        "y": torch.from_numpy(ys[order]),
        "x": torch.from_numpy(xs[order]),
    }


def run(cfg: CoresetConfig) -> None:
    """The job: resolve, select (resuming from a checkpoint), publish the bank."""
    options = _cli.parse_storage_options(cfg.storage_options)
    log.info("config %s", _cli.config_json(cfg))
    store = read_feature_store(cfg.features, options)  # fail before touching the cluster
    num_points = store.num_rows
    num_samples = cfg.num_samples(num_points)
    start = coreset.first_index(num_points, cfg.seed)
    log.info("feature store %s: %d patches of D=%d in %d shards; keeping %d, starting at row %d",
             store.uri, num_points, store.dim, len(store.shard_uris), num_samples, start)
    if storage.is_committed(cfg.out, options) and not cfg.overwrite:
        storage.read_manifest(cfg.out, "bank", options)  # a folder of another kind is an error
        log.info("bank %s is already committed; nothing to do (pass --overwrite to rebuild)", cfg.out)
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

    with _ray.ray_session():
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
            "config": _cli.config_dict(cfg),
        },
    )
    storage.save_bank(cfg.out, bank, options)
    storage.remove(checkpoint_uri, options)
    log.info("bank %s committed: %d entries, coverage radius %.6g", cfg.out, num_samples, radius)


def main(argv: Sequence[str] | None = None) -> None:
    _ray.setup_logging()
    run(_cli.parse_config(CoresetConfig, argv, prog="patchcore coreset"))


if __name__ == "__main__":
    main()
