"""`patchcore fit --backbone a,b` and `patchcore score` of the ensemble bank on a local Ray: the
same members, statistics, thresholds and scores as the single-process patchcore_core.ensemble."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import config, extract, fit
from jobs.folders import map_uri, relative_key
from patchcore_core import ensemble, model, storage
from patchcore_core.spec import ModelSpec
import test_jobs_extract_score
from test_jobs_extract_score import FIT_FLAGS, PIPELINE_FLAGS, read_scores, run_score

BACKBONES = "efficientnet_lite0,resnet18"
FLAGS = ["--backbone", BACKBONES, "--weights", "none", "--resize", "72", "--crop", "64",
         "--embed-dim", "32"]
SPECS = [ModelSpec(backbone="efficientnet_lite0", weights="none", layers=("blocks.2", "blocks.4"),
                   resize=72, crop=64, embed_dim=32),
         ModelSpec(backbone="resnet18", weights="none", layers=("layer2", "layer3"), resize=72,
                   crop=64, embed_dim=32)]


dataset = test_jobs_extract_score.dataset  # the same module-scoped fixture: tiny MVTec-style data


def run_fit(train: str, bank: str, *extra: str) -> int:
    argv = ["--train", train, "--out", bank, *FLAGS, *PIPELINE_FLAGS, *FIT_FLAGS, *extra]
    return fit.run(config.parse_config(fit.FitConfig, argv))


@pytest.fixture(scope="module")
def bank(ray_local: None, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "bank"
    assert run_fit(str(dataset / "train"), str(out)) == 0
    return out


@pytest.fixture(scope="module")
def results(bank: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensemble-score") / "results"
    assert run_score(str(bank), str(dataset / "test"), str(out)) == 2  # the 2 unreadable inputs
    return out


@pytest.fixture(scope="module")
def reference(dataset: Path) -> ensemble.Ensemble:
    torch.set_num_threads(1)
    uris = storage.list_images(str(dataset / "train"))
    train, held_out = fit.split_calibration(uris, 0.25, 200)
    return ensemble.fit(model.load_images(train, SPECS[0]), SPECS,
                        calibration_images=model.load_images(held_out, SPECS[0]), ratio=0.1,
                        seed=0, target_fpr=0.01, image_ids=train)


def test_ensemble_fit_job_equals_single_process_ensemble(bank: Path,
                                                         reference: ensemble.Ensemble) -> None:
    loaded = ensemble.load(str(bank))
    assert isinstance(loaded, ensemble.Ensemble)
    assert loaded.names == ["0-efficientnet_lite0", "1-resnet18"]
    for got, want in zip(loaded.members, reference.members):
        assert got.spec == want.spec and got.bank.image_ids == want.bank.image_ids
        torch.testing.assert_close(got.bank.features, want.bank.features, rtol=1e-5, atol=1e-5)
    for got_stats, want_stats in zip(loaded.stats, reference.stats):
        np.testing.assert_allclose(list(got_stats.to_json().values()),
                                   list(want_stats.to_json().values()), rtol=1e-5)
    assert loaded.image_threshold == pytest.approx(reference.image_threshold, rel=1e-5, abs=1e-6)
    assert loaded.pixel_threshold == pytest.approx(reference.pixel_threshold, rel=1e-5, abs=1e-6)
    manifest = storage.read_manifest(str(bank), "bank")
    np.testing.assert_allclose(manifest["info"]["fit"]["calibration"]["scores"],
                               reference.info["calibration"]["scores"], rtol=1e-5, atol=1e-6)
    assert manifest["info"]["bank_id"] == "bank"
    # each member is a plain, calibrated bank of its own
    member = storage.read_manifest(ensemble.member_uri(str(bank), "1-resnet18"), "bank")
    assert member["spec"]["backbone"] == "resnet18" and member["image_threshold"] is not None


def test_ensemble_score_job_equals_single_process_predict(results: Path, bank: Path) -> None:
    torch.set_num_threads(1)
    rows = read_scores(str(results))
    loaded = ensemble.load(str(bank))
    want = ensemble.predict(loaded, model.load_images([r["uri"] for r in rows], SPECS[0]))
    np.testing.assert_allclose([r["score"] for r in rows], want.scores.numpy(), rtol=1e-5,
                               atol=1e-5)
    assert [r["anomalous"] for r in rows] == [r["score"] > loaded.image_threshold for r in rows]
    manifest = storage.read_manifest(str(results), "results")
    for row, ref_map in zip(rows, want.maps):
        raw = np.load(map_uri(str(results), relative_key(row["uri"], manifest["input_root"]), "raw"))
        np.testing.assert_allclose(raw.astype(np.float32), ref_map.numpy(), rtol=2e-3, atol=2e-3)
    assert manifest["knn"]["engine"] == "faiss-cpu-exact"
    # the defect images rank above the nominal ones
    bad = [r["score"] for r in rows if "/bad/" in r["uri"]]
    good = [r["score"] for r in rows if "/good/" in r["uri"]]
    assert min(bad) > max(good)


def test_ensemble_fit_rerun_is_a_noop_and_wrong_flags_are_refused(bank: Path, dataset: Path,
                                                                  tmp_path: Path) -> None:
    before = (bank / "manifest.json").read_bytes()
    assert run_fit(str(dataset / "train"), str(bank)) == 0
    assert (bank / "manifest.json").read_bytes() == before
    with pytest.raises(ValueError, match="calibration-fraction 0"):
        run_fit(str(dataset / "train"), str(tmp_path / "b"), "--calibration-fraction", "0")
    with pytest.raises(ValueError, match="only `patchcore fit` builds"):
        extract.ExtractConfig(train="x", out="y", backbone=BACKBONES, weights="none",
                              resize=72, crop=64).model_spec()
    with pytest.raises(ValueError, match="2 ';'-separated entries for 3 backbones"):
        fit.FitConfig(train="x", out="y", backbone="resnet18,resnet18,resnet50",
                      weights="none;none")
    specs = fit.FitConfig(train="x", out="y", backbone=BACKBONES, weights="none",
                          layers="blocks.1,blocks.2;layer1,layer2").model_specs()
    assert [s.layers for s in specs] == [("blocks.1", "blocks.2"), ("layer1", "layer2")]
