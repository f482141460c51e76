"""`patchcore fit`: extract -> coreset -> calibrate, one job (paper §3.1-3.3, DESIGN.md §3, §5).

The sorted training list is split deterministically: every round(1 / calibration_fraction)-th
image is held out for calibration (capped). The rest go through `extract_images` into a feature
store, `jobs.coreset` selects the bank, and the held-out nominal images are scored with the new
bank by the score job's stage (`score.score_shards`); image and pixel thresholds are the
`scoring.threshold_for_fpr` quantiles of their scores and map pixels, as
`model.fit(..., calibration_images=...)` computes them. Only the bank's manifest is rewritten
with the thresholds; its features stay as the coreset step wrote them.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jobs import cluster, extract, logs, score
from jobs import coreset as coreset_job
from jobs.config import (
    ActorFlags,
    CoresetFlags,
    ModelFlags,
    PipelineFlags,
    RunFlags,
    arg,
    config_dict,
    config_json,
    fields_of,
    parse_config,
)
from jobs.folders import OutputFolder, failed, inputs_digest, make_shards, reuse_committed
from patchcore_core import ensemble, scoring, storage
from patchcore_core.spec import ModelSpec

log = logging.getLogger("jobs.fit")

FEATURES_DIR = "_features"
ENSEMBLE_MIN_CALIBRATION = 2  # a member's nominal mean and std need two images at least
# the flags besides specs and inputs that make two ensemble fits the same fit
ENSEMBLE_IDENTITY = ("features_out", "feature_dtype", "ratio", "size", "projection_dim", "seed",
                     "calibration_fraction", "max_calibration_images", "target_fpr")


@dataclass(frozen=True, kw_only=True)
class FitConfig(PipelineFlags, ModelFlags, CoresetFlags):
    """Fit a PatchCore bank from nominal images: extract features, select a coreset, calibrate."""

    train: str = arg("nominal images: folder/prefix, glob, or .txt/.csv/.parquet manifest")
    out: str = arg("bank folder/URI to write (manifest.json last)")
    features_out: str = arg("feature store folder/URI; '' = <out>/_features", "")
    calibration_fraction: float = arg(
        "share of the training images held out to calibrate thresholds (every round(1/f)-th); "
        "0 = no thresholds", 0.1)
    max_calibration_images: int = arg("cap on held-out calibration images", 200)
    target_fpr: float = arg("false-positive rate of the thresholds on nominal images", 0.01)
    bank_id: str = arg("name of the bank in its manifest (info.bank_id) and in the rows of "
                       "`score --incremental`; '' = the --out folder's name", "")

    def __post_init__(self) -> None:
        if not self.train or not self.out:
            raise ValueError("--train and --out must be non-empty paths or URIs")
        if not 0.0 <= self.calibration_fraction <= 0.5:
            raise ValueError(f"--calibration-fraction must be in [0, 0.5], got {self.calibration_fraction}")
        if self.max_calibration_images < 1:
            raise ValueError(f"--max-calibration-images must be >= 1, got {self.max_calibration_images}")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"--target-fpr must be in [0, 1), got {self.target_fpr}")
        super().__post_init__()  # the model, pipeline and coreset flag checks

    @property
    def features_uri(self) -> str:
        return self.features_out or storage.join_uri(self.out, FEATURES_DIR)

    def coreset_config(self) -> coreset_job.CoresetConfig:
        """The coreset step's config: this fit's actor, run and coreset flags."""
        return coreset_job.CoresetConfig(
            **fields_of(self, ActorFlags, RunFlags, CoresetFlags), features=self.features_uri,
            out=self.out, retries=self.retries,
        )


def split_calibration(uris: Sequence[str], fraction: float, cap: int, minimum: int = 1
                      ) -> tuple[list[str], list[str]]:
    """(train, calibration) of a sorted list: every round(1/fraction)-th image (positions step-1,
    2*step-1, ...) is held out, at most `cap`; when that is fewer than `minimum` (1; an
    ensemble's statistics need 2), the last images not yet held out are added."""
    if fraction <= 0:
        return list(uris), []
    if len(uris) <= minimum:
        raise ValueError(f"need >= {minimum + 1} training images to hold {minimum} out for "
                         f"calibration, got {len(uris)}; add images or pass "
                         "--calibration-fraction 0 (a bank without thresholds; not for ensembles)")
    step = max(2, round(1 / fraction))
    held_set = set(list(range(step - 1, len(uris), step))[:cap])
    for position in range(len(uris) - 1, -1, -1):
        if len(held_set) >= min(minimum, cap) and held_set:
            break
        held_set.add(position)
    held = sorted(held_set)
    return [u for i, u in enumerate(uris) if i not in held_set], [uris[i] for i in held]


def calibrate(cfg: FitConfig, spec: ModelSpec, uris: Sequence[str], device: str,
              timing: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores (n,) and maps (n, crop, crop) of the readable calibration images, and the error count.

    The score job's stage (`score.score_shards`) with the new bank, writing no files, so it runs
    at score's rate; timing: its start-up and steady-state figures (`pipeline.stream_shards`).
    """
    scores, maps, errors = [], [], 0
    for _, columns in sorted(
        score.score_shards(cfg.out, spec, make_shards(uris, cfg.shard_size), cfg, device,
                           return_maps=True, label="calibrate", timing=timing),
        key=lambda item: item[0].index,
    ):
        ok = columns["error"] == ""
        for uri, error in zip(columns["uri"][~ok], columns["error"][~ok]):
            log.warning("calibration image %s skipped: %s", uri, error)
        errors += int((~ok).sum())
        scores.append(columns["score"][ok])
        maps.append(columns["map"][ok])
    return np.concatenate(scores), np.concatenate(maps), errors


def run(cfg: FitConfig, *, min_calibration: int = 1) -> int:
    """The job; returns the exit status (2 when more inputs failed than --max-failures).
    min_calibration: images held out at least (an ensemble's members hold out 2)."""
    log.info("config %s", config_json(cfg))
    if cfg.is_ensemble:
        return run_ensemble(cfg)
    options = cfg.options
    spec = cfg.model_spec()
    uris = storage.list_images(cfg.train, options)
    train, held_out = split_calibration(uris, cfg.calibration_fraction, cfg.max_calibration_images,
                                        min_calibration)
    identity = {"spec": spec.to_json(), "inputs": inputs_digest(uris), "num_inputs": len(uris),
                "features": cfg.features_uri, "feature_dtype": cfg.feature_dtype,
                "ratio": cfg.ratio, "size": cfg.size, "projection_dim": cfg.projection_dim,
                "seed": cfg.seed, "calibration_fraction": cfg.calibration_fraction,
                "max_calibration_images": cfg.max_calibration_images, "target_fpr": cfg.target_fpr}
    # a bank committed by the coreset step of an interrupted fit has no fit record: calibrate it
    done = reuse_committed(cfg.out, "bank", options, overwrite=cfg.overwrite, identity=identity,
                           saved_identity=lambda m: (m["info"].get("fit") or {}).get("identity"))
    if done is not None:
        return done["info"]["fit"]["status"]
    log.info("fit: %d images, %d to build the bank, %d held out for calibration",
             len(uris), len(train), len(held_out))
    if cfg.dry_run:
        extract.extract_images(train, cfg.features_uri, spec, cfg, feature_dtype=cfg.feature_dtype,
                               inputs=cfg.train, config=config_dict(cfg))  # logs the plan only
        return 0
    bank_id = cfg.bank_id or posixpath.basename(storage.normalise_uri(cfg.out))
    # One fit per --out at a time; the feature store has its own lock (extract_images).
    with OutputFolder(cfg.out, options).locked() as folder:
        with cluster.ray_session():
            store = extract.extract_images(train, cfg.features_uri, spec, cfg,
                                           feature_dtype=cfg.feature_dtype, inputs=cfg.train,
                                           config=config_dict(cfg))
            assert store is not None
            if failed(store["counts"], cfg.max_failures, "extracted"):
                log.error("no bank built; raise --max-failures to build it without those images")
                return 2
            coreset_job.run(cfg.coreset_config())
            bank = storage.read_manifest(cfg.out, "bank", options)
            if ModelSpec.from_json(bank["spec"]) != spec:
                raise ValueError(f"bank {cfg.out} holds another model spec than this fit's; pass "
                                 "--overwrite to refit it, or choose another --out")
            calibration: dict[str, Any] = {"images": len(held_out), "errors": 0,
                                           "target_fpr": cfg.target_fpr}
            thresholds: dict[str, float | None] = {"image_threshold": None, "pixel_threshold": None}
            if held_out:
                timing: dict[str, Any] = {}
                scores, maps, errors = calibrate(cfg, spec, held_out,
                                                 cluster.resolve_device(cfg.device), timing)
                calibration["errors"] = errors
                calibration["timing"] = timing
                if len(scores) == 0:
                    raise ValueError(f"none of the {len(held_out)} calibration images could be read; "
                                     "see the warnings above")
                # kept for the nightly report's drift check (jobs.nightly_report)
                calibration["scores"] = sorted(float(s) for s in scores)
                image_scores, pixels = torch.from_numpy(scores), torch.from_numpy(maps).reshape(-1)
                thresholds = {
                    "image_threshold": scoring.threshold_for_fpr(image_scores, cfg.target_fpr),
                    "pixel_threshold": scoring.threshold_for_fpr(pixels, cfg.target_fpr),
                }
        errors = store["counts"]["errors"] + calibration["errors"]
        status = 2 if failed({"errors": errors, "inputs": len(uris)}, cfg.max_failures, "used") else 0
        fit_info = {"identity": identity, "status": status, "config": config_dict(cfg),
                    "train_images": len(train), "extract_errors": store["counts"]["errors"],
                    "calibration": calibration}
        folder.verify_lock()  # only the run holding --out commits it
        # the coreset step wrote features and provenance; only the manifest gains the thresholds
        bank = storage.update_bank_manifest(
            cfg.out, {**thresholds, "info": {**bank["info"], "fit": fit_info, "bank_id": bank_id}},
            options)
        log.info("bank %s committed: %d entries, image threshold %s, pixel threshold %s",
                 cfg.out, bank["counts"]["num_entries"], thresholds["image_threshold"],
                 thresholds["pixel_threshold"])
        return status


def member_config(cfg: FitConfig, spec: ModelSpec, name: str, bank_id: str) -> FitConfig:
    """The plain fit of one ensemble member: its backbone, weights and layers, into
    <out>/members/<name> (features under <features-out>/<name> when given)."""
    return dataclasses.replace(
        cfg, backbone=spec.backbone, weights=spec.weights, layers=",".join(spec.layers),
        out=ensemble.member_uri(cfg.out, name),
        features_out=storage.join_uri(cfg.features_out, name) if cfg.features_out else "",
        bank_id=f"{bank_id}/{name}")


def run_ensemble(cfg: FitConfig) -> int:
    """An ensemble (paper Table S5): one plain, resumable fit per backbone into
    <out>/members/<i>-<backbone>, then each member scores the same held-out nominal images
    again (the statistics need its maps, which a member's fit does not keep) and the ensemble's
    statistics, combined calibration scores and thresholds go into <out>/manifest.json, written
    last (patchcore_core.ensemble)."""
    options = cfg.options
    specs = cfg.model_specs()
    ensemble.check_specs(specs)
    if cfg.calibration_fraction <= 0:
        raise ValueError("--calibration-fraction 0: an ensemble standardises each member by its "
                         "scores on held-out nominal images; pass a fraction > 0 (default 0.1)")
    names = ensemble.member_names(specs)
    uris = storage.list_images(cfg.train, options)
    _, held_out = split_calibration(uris, cfg.calibration_fraction, cfg.max_calibration_images,
                                    ENSEMBLE_MIN_CALIBRATION)
    if cfg.max_calibration_images < 2:
        raise ValueError(f"--max-calibration-images {cfg.max_calibration_images}: an ensemble's "
                         "statistics need >= 2 calibration images")
    identity = {"specs": [s.to_json() for s in specs], "members": names,
                "inputs": inputs_digest(uris), "num_inputs": len(uris),
                **{k: getattr(cfg, k) for k in ENSEMBLE_IDENTITY}}
    done = reuse_committed(cfg.out, "bank", options, overwrite=cfg.overwrite, identity=identity,
                           saved_identity=lambda m: (m["info"].get("fit") or {}).get("identity"))
    if done is not None:
        return done["info"]["fit"]["status"]
    bank_id = cfg.bank_id or posixpath.basename(storage.normalise_uri(cfg.out))
    log.info("ensemble fit: %d members %s, %d images, %d held out for calibration",
             len(specs), names, len(uris), len(held_out))
    members = [member_config(cfg, spec, name, bank_id) for spec, name in zip(specs, names)]
    with OutputFolder(cfg.out, options).locked() as folder, cluster.ray_session():
        if cfg.overwrite and not cfg.dry_run:  # no old manifest may name half-refitted members
            storage.remove(storage.join_uri(cfg.out, storage.MANIFEST_NAME), options)
        statuses = []
        for name, member in zip(names, members):
            log.info("ensemble member %s: fitting into %s", name, member.out)
            statuses.append(run(member, min_calibration=ENSEMBLE_MIN_CALIBRATION))
            if cfg.dry_run:
                continue
            if not storage.is_committed(member.out, options):
                log.error("member %s built no bank; no ensemble written", name)
                return 2
        if cfg.dry_run:
            return 0
        device = cluster.resolve_device(cfg.device)
        stats, scores, maps, counts = [], [], [], []
        for name, member, spec in zip(names, members, specs):
            log.info("ensemble member %s: scoring %d calibration images", name, len(held_out))
            member_scores, member_maps, _ = calibrate(member, spec, held_out, device)
            stats.append(ensemble.MemberStats.from_calibration(member_scores, member_maps))
            scores.append(torch.from_numpy(member_scores))
            maps.append(torch.from_numpy(member_maps))
            counts.append(storage.read_manifest(member.out, "bank", options)["counts"])
        if len({len(s) for s in scores}) != 1:
            raise ValueError(f"members read different numbers of calibration images "
                             f"{[len(s) for s in scores]}; rerun the fit")
        combined = ensemble.combine(scores, [s.image_mean for s in stats],
                                    [s.image_std for s in stats])
        pixels = ensemble.combine(maps, [s.pixel_mean for s in stats], [s.pixel_std for s in stats])
        status = max(statuses)
        calibration = {"images": len(held_out), "readable": len(combined),
                       "target_fpr": cfg.target_fpr,
                       "scores": sorted(float(s) for s in combined)}
        info = {"bank_id": bank_id, "fit": {"identity": identity, "status": status,
                                            "config": config_dict(cfg), "calibration": calibration,
                                            "member_status": dict(zip(names, statuses))}}
        body = ensemble.manifest_body(
            names, specs, stats, counts,
            scoring.threshold_for_fpr(combined, cfg.target_fpr),
            scoring.threshold_for_fpr(pixels.reshape(-1), cfg.target_fpr), info)
        folder.verify_lock()  # only the run holding --out commits it
        storage.write_manifest(cfg.out, body, kind="bank", storage_options=options)
        log.info("ensemble bank %s committed: members %s, image threshold %s, pixel threshold %s",
                 cfg.out, names, body["image_threshold"], body["pixel_threshold"])
        return status


def main(argv: Sequence[str] | None = None) -> None:
    logs.setup_logging()
    status = run(parse_config(FitConfig, argv, prog="patchcore fit"))
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
