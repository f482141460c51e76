"""Demo data: deterministic files, MVTec layout, and masks that cover exactly the painted pixels."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from jobs import demo_data


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _small(out: Path, seed: int) -> None:
    demo_data.make_demo_dataset(
        str(out), categories=("gravel",), num_train=2, num_test_good=1, num_test_defect=1,
        size=64, seed=seed,
    )


def test_same_seed_writes_byte_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    _small(tmp_path / "a", seed=3)
    _small(tmp_path / "b", seed=3)
    _small(tmp_path / "c", seed=4)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if not k.startswith("gravel/ground_truth"))


def test_layout_is_mvtec_with_one_mask_per_defect_image(tmp_path: Path) -> None:
    _small(tmp_path, seed=0)
    names = set(_files(tmp_path))
    expected = {"gravel/train/good/000.png", "gravel/train/good/001.png", "gravel/test/good/000.png"}
    for defect in demo_data.DEFECT_TYPES:
        expected |= {f"gravel/test/{defect}/000.png", f"gravel/ground_truth/{defect}/000_mask.png"}
    assert names == expected
    for defect in demo_data.DEFECT_TYPES:
        image = Image.open(tmp_path / f"gravel/test/{defect}/000.png")
        mask = np.asarray(Image.open(tmp_path / f"gravel/ground_truth/{defect}/000_mask.png"))
        assert image.mode == "RGB" and image.size == (64, 64)
        assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}


@pytest.mark.parametrize("category", demo_data.ALL_CATEGORIES)
@pytest.mark.parametrize("defect", demo_data.DEFECT_TYPES)
def test_mask_covers_exactly_the_changed_pixels(category: str, defect: str) -> None:
    source = demo_data.source_texture(category)
    for index in range(3):
        sample = demo_data.demo_sample(category, "test", defect, index, size=80, seed=7, source=source)
        changed = (sample.image != sample.clean).any(axis=2)
        assert sample.mask.sum() >= 20  # a visible defect
        # outside the mask the defect image is the clean tile, byte for byte
        np.testing.assert_array_equal(sample.image[~sample.mask], sample.clean[~sample.mask])
        # inside the mask (almost) every pixel changed; a pasted pixel may equal the clean one
        assert changed[sample.mask].mean() >= 0.97


def test_written_files_equal_rebuilt_samples(tmp_path: Path) -> None:
    _small(tmp_path, seed=5)
    for split, defect in (("train", "good"), ("test", "good"), ("test", "scratch"), ("test", "misplaced")):
        sample = demo_data.demo_sample("gravel", split, defect, 0, size=64, seed=5)
        image = np.asarray(Image.open(tmp_path / f"gravel/{split}/{defect}/000.png"))
        np.testing.assert_array_equal(image, sample.image)
        if defect != "good":
            data = (tmp_path / f"gravel/ground_truth/{defect}/000_mask.png").read_bytes()
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))) > 0, sample.mask)
        else:
            np.testing.assert_array_equal(sample.image, sample.clean)


def test_nominal_tiles_vary() -> None:
    tiles = [demo_data.demo_sample("brick", "train", "good", i, size=64, seed=0).image for i in range(4)]
    for i in range(1, 4):
        assert np.abs(tiles[i].astype(int) - tiles[0].astype(int)).mean() > 5


# sha256 (first 16 hex) of image and mask bytes of index 1 of train/good, test/good and each
# defect at size 64, seed 0, recorded before grain/uniform were added. A Pillow or scipy upgrade
# that changes resampling or filtering also changes these; then re-record them on purpose.
PHOTO_PIXEL_HASHES = {"brick": "dab96dfde0d4699b", "grass": "0ae0a36829fbdb90",
                      "gravel": "12e02ee3bdc6df6c"}


@pytest.mark.parametrize("category", demo_data.CATEGORIES)
def test_photo_category_pixels_are_unchanged_by_the_surface_categories(category: str) -> None:
    digest = hashlib.sha256()
    pairs = [("train", "good"), ("test", "good")] + [("test", d) for d in demo_data.DEFECT_TYPES]
    for split, defect in pairs:
        sample = demo_data.demo_sample(category, split, defect, 1, size=64, seed=0)
        digest.update(sample.image.tobytes())
        digest.update(sample.mask.tobytes())
    assert digest.hexdigest()[:16] == PHOTO_PIXEL_HASHES[category]


def test_surface_categories_same_seed_writes_byte_identical_files_and_other_seed_differs(
    tmp_path: Path,
) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        demo_data.make_demo_dataset(str(tmp_path / name), categories=demo_data.SURFACE_CATEGORIES,
                                    num_train=2, num_test_good=1, num_test_defect=1, size=64,
                                    seed=seed)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and len(a) == 2 * (3 + 2 * len(demo_data.DEFECT_TYPES))
    assert all(a[k] != c[k] for k in a if "/ground_truth/" not in k)


def _grey_tile(category: str, index: int, size: int = 128) -> np.ndarray:
    """Nominal training tile `index` as (size, size) float64; asserts the channels are equal."""
    image = demo_data.demo_sample(category, "train", "good", index, size=size, seed=0).image
    assert (image == image[..., :1]).all()
    return image[..., 0].astype(np.float64)


def _max_circular_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Max over all (dy, dx) of the normalised correlation of a with b rolled by (dy, dx)."""
    a, b = a - a.mean(), b - b.mean()
    spectrum = np.fft.fft2(a) * np.conj(np.fft.fft2(b))
    return float(np.fft.ifft2(spectrum).real.max() / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_grain_tiles_are_not_translates_of_each_other() -> None:
    tiles = [_grey_tile("grain", i) for i in range(5)]
    # a translate would correlate ~1 at its offset (the check sees a shifted copy of a tile) ...
    assert _max_circular_correlation(tiles[0], np.roll(tiles[0], (17, -5), axis=(0, 1))) > 0.99
    # ... independent realisations stay at noise level (brick crops of one photo reach 0.3-0.5)
    for i in range(5):
        for j in range(i + 1, 5):
            assert _max_circular_correlation(tiles[i], tiles[j]) < 0.15


def test_grain_structure_is_one_to_three_pixels_across() -> None:
    tile = _grey_tile("grain", 0)
    centred = tile - tile.mean()
    for axis in (0, 1):
        corr = [float((centred * np.roll(centred, lag, axis=axis)).sum() / (centred**2).sum())
                for lag in range(11)]
        assert 0.2 < corr[1] < 0.7, corr  # neighbours correlate: not white noise
        assert max(abs(c) for c in corr[4:]) < 0.1, corr  # nothing left at 4 px and beyond
    assert 15 < tile.std() < 25  # strong grain, grey levels


def test_uniform_tiles_are_nearly_flat_with_sensor_noise() -> None:
    for index in range(4):
        tile = _grey_tile("uniform", index)
        shading = ndimage.uniform_filter(tile, 15, mode="reflect")
        assert np.ptp(shading) < 20  # gentle shading across the whole tile
        assert 1.5 < (tile - shading).std() < 2.5  # the std-2 sensor noise


def test_bad_arguments_raise_with_the_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="brick.*grain.*uniform"):
        demo_data.make_demo_dataset(str(tmp_path), categories=("wood",))
    with pytest.raises(ValueError, match="grain"):
        demo_data.source_texture("wood")
    with pytest.raises(ValueError, match="num_train"):
        demo_data.make_demo_dataset(str(tmp_path), num_train=0)
    with pytest.raises(ValueError, match="scratch"):
        demo_data.demo_sample("brick", "test", "dent", 0, size=64, seed=0)


def test_demo_command_accepts_the_surface_categories_and_names_all_on_a_typo() -> None:
    from jobs.demo import DemoConfig

    assert DemoConfig(categories="grain,uniform").category_list == ["grain", "uniform"]
    with pytest.raises(ValueError, match="brick, grass, gravel, grain, uniform"):
        DemoConfig(categories="grian")
