"""Demo data: deterministic files, MVTec layout, and masks that cover exactly the painted pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


@pytest.mark.parametrize("category", demo_data.CATEGORIES)
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


def test_bad_arguments_raise_with_the_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="brick"):
        demo_data.make_demo_dataset(str(tmp_path), categories=("wood",))
    with pytest.raises(ValueError, match="num_train"):
        demo_data.make_demo_dataset(str(tmp_path), num_train=0)
    with pytest.raises(ValueError, match="scratch"):
        demo_data.demo_sample("brick", "test", "dent", 0, size=64, seed=0)
