"""ensemble: backbone ensembles (paper Table S5) against hand computations and the plain model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from patchcore_core import ensemble, model, scoring, storage
from patchcore_core.model import Prediction
from patchcore_core.spec import ModelSpec

SIZE = 64
LITE = ModelSpec(backbone="efficientnet_lite0", weights="default", layers=("blocks.2", "blocks.4"),
                 resize=SIZE, crop=SIZE, embed_dim=64)
RESNET = ModelSpec(backbone="resnet18", weights="none", layers=("layer2", "layer3"), resize=SIZE,
                   crop=SIZE, embed_dim=48)
FIT = {"size": 40, "seed": 0, "projection_dim": 16}


def _images(seed: int, count: int, defect: bool = False) -> torch.Tensor:
    """Striped textures with noise (N, 3, S, S); `defect` paints a bright square in each."""
    gen = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    out = []
    for _ in range(count):
        phase = gen.uniform(0, 2 * np.pi)
        base = 0.5 * np.sin(2 * np.pi * xx / 6 + phase) + gen.normal(0, 0.1, (SIZE, SIZE))
        image = np.repeat(base[None], 3, axis=0)
        if defect:
            y, x = gen.integers(8, SIZE - 16, 2)
            image[:, y : y + 8, x : x + 8] = 2.5
        out.append(image)
    return torch.tensor(np.stack(out), dtype=torch.float32)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return {"train": _images(0, 6), "calibration": _images(1, 5), "good": _images(2, 4),
            "bad": _images(3, 4, defect=True)}


@pytest.fixture(scope="module")
def pair(data: dict[str, torch.Tensor]) -> ensemble.Ensemble:
    return ensemble.fit(data["train"], [LITE, RESNET], calibration_images=data["calibration"],
                        target_fpr=0.2, **FIT)


def _prediction(scores: list[float], maps: np.ndarray, grid: int) -> Prediction:
    maps_t = torch.tensor(maps, dtype=torch.float32)
    return Prediction(scores=torch.tensor(scores, dtype=torch.float64), maps=maps_t,
                      patch_scores=torch.zeros(len(scores), grid, grid),
                      max_yx=torch.zeros(len(scores), 2, dtype=torch.int64))


def test_combination_is_the_mean_of_standardised_member_scores_by_hand() -> None:
    maps_a = np.zeros((2, 4, 4))
    maps_a[0, 1, 2] = 8.0  # member A's peak
    maps_b = np.full((2, 4, 4), 3.0)
    maps_b[1, 3, 0] = 9.0
    stats = [ensemble.MemberStats(10.0, 2.0, 1.0, 4.0), ensemble.MemberStats(0.5, 0.25, 3.0, 2.0)]
    out = ensemble.combine_predictions([_prediction([14.0, 9.0], maps_a, 2),
                                        _prediction([0.5, 1.0], maps_b, 3)], stats)
    # image 0: ((14 - 10) / 2 + (0.5 - 0.5) / 0.25) / 2 = 1.0; image 1: (-0.5 + 2.0) / 2 = 0.75
    assert out.scores.tolist() == [1.0, 0.75]
    # pixel (0, 1, 2): ((8 - 1) / 4 + 0) / 2 = 0.875; elsewhere in image 0: (-1 / 4 + 0) / 2
    assert out.maps[0, 1, 2].item() == pytest.approx(0.875)
    assert out.maps[0, 0, 0].item() == pytest.approx(-0.125)
    assert out.maps[1, 3, 0].item() == pytest.approx((-0.25 + 3.0) / 2)
    assert out.max_yx.tolist() == [[1, 2], [3, 0]]
    assert tuple(out.patch_scores.shape) == (2, 2, 2)  # the first member's grid


def test_member_statistics_are_numpy_mean_and_population_std() -> None:
    scores = np.array([1.0, 2.0, 4.0])
    maps = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    stats = ensemble.MemberStats.from_calibration(scores, maps)
    assert (stats.image_mean, stats.image_std) == pytest.approx((7 / 3, np.std(scores)))
    assert (stats.pixel_mean, stats.pixel_std) == pytest.approx((5.5, np.std(np.arange(12))))
    with pytest.raises(ValueError, match=">= 2 nominal calibration images"):
        ensemble.MemberStats.from_calibration(scores[:1], maps[:1])
    with pytest.raises(ValueError, match="image_std must be a positive number"):
        ensemble.MemberStats.from_calibration(np.array([3.0, 3.0]), maps[:2])


def test_members_must_share_the_preprocessing() -> None:
    other = ModelSpec(backbone="resnet18", weights="none", resize=80, crop=SIZE, embed_dim=48)
    with pytest.raises(ValueError, match="must share --resize"):
        ensemble.check_specs([LITE, other])
    assert ensemble.member_names([LITE, RESNET, LITE]) == [
        "0-efficientnet_lite0", "1-resnet18", "2-efficientnet_lite0"]


def test_one_member_ensemble_equals_the_plain_model(data: dict[str, torch.Tensor]) -> None:
    plain = model.fit(data["train"], LITE, calibration_images=data["calibration"], target_fpr=0.2,
                      **FIT)
    single = ensemble.fit(data["train"], [LITE], calibration_images=data["calibration"],
                          target_fpr=0.2, **FIT)
    assert torch.equal(single.members[0].bank.features, plain.bank.features)
    stats = single.stats[0]
    test = torch.cat([data["good"], data["bad"]])
    want, got = model.predict(plain, test), ensemble.predict(single, test)
    # the same numbers in standard units, so the same ranking and decisions
    torch.testing.assert_close(got.scores * stats.image_std + stats.image_mean, want.scores,
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.maps.double() * stats.pixel_std + stats.pixel_mean,
                               want.maps.double(), rtol=1e-5, atol=1e-4)
    assert torch.equal(got.max_yx, want.max_yx)
    assert single.image_threshold == pytest.approx(
        (plain.bank.image_threshold - stats.image_mean) / stats.image_std)
    assert single.pixel_threshold == pytest.approx(
        (plain.bank.pixel_threshold - stats.pixel_mean) / stats.pixel_std, rel=1e-5)
    assert torch.equal(got.scores > single.image_threshold, want.scores > plain.bank.image_threshold)
    assert torch.equal(got.maps > single.pixel_threshold, want.maps > plain.bank.pixel_threshold)
    labels = [0] * len(data["good"]) + [1] * len(data["bad"])
    assert roc_auc_score(labels, got.scores) == roc_auc_score(labels, want.scores)


def test_two_member_scores_and_maps_equal_a_hand_combination_of_the_members(
    pair: ensemble.Ensemble, data: dict[str, torch.Tensor]
) -> None:
    # the statistics are those of the members' own calibration predictions
    for member, stats in zip(pair.members, pair.stats):
        calib = model.predict(member, data["calibration"])
        assert stats.image_mean == pytest.approx(float(calib.scores.double().mean()))
        assert stats.image_std == pytest.approx(float(np.std(calib.scores.numpy())))
        assert stats.pixel_mean == pytest.approx(float(calib.maps.double().mean()), rel=1e-6)
    test = torch.cat([data["good"], data["bad"]])
    parts = [model.predict(m, test) for m in pair.members]
    want_scores = sum((p.scores.numpy() - s.image_mean) / s.image_std
                      for p, s in zip(parts, pair.stats)) / 2
    want_maps = sum((p.maps.numpy().astype(np.float64) - s.pixel_mean) / s.pixel_std
                    for p, s in zip(parts, pair.stats)) / 2
    got = ensemble.predict(pair, test)
    np.testing.assert_allclose(got.scores.numpy(), want_scores, rtol=1e-12)
    np.testing.assert_allclose(got.maps.numpy(), want_maps, rtol=1e-5, atol=1e-5)
    # thresholds are the order statistics of the combined nominal scores
    calib = ensemble.predict(pair, data["calibration"])
    assert pair.image_threshold == scoring.threshold_for_fpr(calib.scores, 0.2)
    assert pair.info["calibration"]["scores"] == sorted(calib.scores.tolist())


def test_ensemble_folder_round_trips_and_members_stand_alone(
    pair: ensemble.Ensemble, data: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    uri = str(tmp_path / "bank")
    ensemble.save(pair, uri)
    manifest = storage.read_manifest(uri, "bank")
    entries = ensemble.member_entries(manifest)
    assert [e["name"] for e in entries] == ["0-efficientnet_lite0", "1-resnet18"]
    assert manifest["counts"] == {"members": 2, "num_entries": 80}
    loaded = ensemble.load(uri)
    assert isinstance(loaded, ensemble.Ensemble) and loaded.stats == pair.stats
    test = data["bad"]
    torch.testing.assert_close(ensemble.predict(loaded, test).scores,
                               ensemble.predict(pair, test).scores, rtol=1e-6, atol=1e-6)
    # each member folder is a complete plain bank
    alone = ensemble.load(ensemble.member_uri(uri, "1-resnet18"))
    assert isinstance(alone, model.PatchCore) and alone.spec == RESNET
    with pytest.raises(ValueError, match="ensemble"):
        storage.load_bank(uri)
