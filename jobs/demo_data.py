"""Synthetic data in the MVTec AD layout (the paper's benchmark, §4.1) from skimage's texture photos.

Nominal tiles are random crops of `skimage.data.brick/grass/gravel` (flips, small scale and
brightness changes), or procedural grey surfaces (`grain`: fine-grain cast or sand-blasted metal,
every tile its own noise realisation; `uniform`: a flat, gently shaded surface); test tiles carry
synthetic defects with exact ground-truth masks: every pixel outside the mask equals the clean
tile, every defect pixel lies inside it. Same seed, same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from patchcore_core import storage

CATEGORIES = ("brick", "grass", "gravel")  # skimage photos; the demo's default set
# Procedural grey surfaces, selectable by name (issue 14: fine-grain textures like real inspection
# images of cast or blasted parts, and the uniform case next to them).
SURFACE_CATEGORIES = ("grain", "uniform")
ALL_CATEGORIES = (*CATEGORIES, *SURFACE_CATEGORIES)  # order fixes each category's seed stream
DEFECT_TYPES = ("scratch", "stain", "misplaced", "texture", "color")
# RGB gain per category: turns the grayscale photos into plausible colour material.
_TINTS = {"brick": (1.0, 0.72, 0.58), "grass": (0.80, 1.0, 0.62), "gravel": (1.0, 0.95, 0.86),
          "grain": (1.0, 1.0, 1.0), "uniform": (1.0, 1.0, 1.0)}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's "L": what a grey camera records of a colour
_GRAIN_SOURCE_SEED = 20240614  # the fixed 512 px grain realisation behind "misplaced" defects
_SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged: anti-aliased edges
_SOURCE_SCALE = 2.0  # source px per tile px: a 128 px tile shows a 256 px crop of the 512 px photo


@dataclass(frozen=True)
class DemoSample:
    """One generated tile. clean, image: (size, size, 3) uint8; mask: (size, size) bool.

    For nominal tiles image == clean and the mask is empty.
    """

    clean: np.ndarray
    image: np.ndarray
    mask: np.ndarray


def source_texture(category: str) -> np.ndarray:
    """The 512x512 grayscale photo behind `category`, float32 in [0, 255].

    For the surface categories it is one fixed grain realisation at 2 source px per tile px (as
    the photos are); only their "misplaced" defects read it: coarser grain, or on the uniform
    surface a rough spot.
    """
    if category not in ALL_CATEGORIES:
        raise ValueError(f"unknown demo category {category!r}; choose from {list(ALL_CATEGORIES)}")
    if category in SURFACE_CATEGORIES:
        rng = np.random.default_rng(_GRAIN_SOURCE_SEED)
        return _grain_gray(512, _SOURCE_SCALE, rng).astype(np.float32)
    from skimage import data  # deferred: importing skimage.data is slow and unused elsewhere

    return getattr(data, category)().astype(np.float32)


def _grain_gray(size: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Fine-grain surface lit from the top left: (size, size) float64 grey levels, mean 135, std 20.

    Height = white noise band-passed by a difference of Gaussians (sigma 0.7 and 2 px, times
    `scale`): bumps 1-3 px across. Brightness = its slope along the light (relief) plus the height
    itself (albedo); the light direction is fixed, as on an inspection line.
    """
    noise = rng.standard_normal((size, size))
    height = ndimage.gaussian_filter(noise, 0.7 * scale, mode="wrap")
    height -= ndimage.gaussian_filter(noise, 2.0 * scale, mode="wrap")
    slope_y, slope_x = np.gradient(height)
    light = (slope_x + slope_y) / math.sqrt(2.0)
    shade = 0.7 * light / light.std() + 0.5 * height / height.std()
    return 135.0 + 20.0 * shade / shade.std()


def _surface_tile(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A fresh procedural tile (no two share pixels position by position): (size, size, 3) uint8.

    grain: `_grain_gray` at scale 0.95-1.05. uniform: level 150, a linear ramp of up to 12 and a
    bowl of up to +-6 grey levels across the tile. Both: gain 0.93-1.07, offset +-6 and sensor
    noise of std 2 grey levels; the three channels are equal.
    """
    if category == "grain":
        gray = _grain_gray(size, rng.uniform(0.95, 1.05), rng)
    else:
        y, x = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5  # tile coordinates in [-0.5, 0.5)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        ramp = rng.uniform(0.0, 12.0) * (x * math.cos(angle) + y * math.sin(angle))
        gray = 150.0 + ramp + rng.uniform(-6.0, 6.0) * 2.0 * (x**2 + y**2)
    gray = gray * rng.uniform(0.93, 1.07) + rng.uniform(-6.0, 6.0)
    gray = gray + rng.normal(0.0, 2.0, size=gray.shape)
    return _to_uint8(np.repeat(gray[..., None], 3, axis=2))


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    """(h, w) float32 -> (size, size) float32, Pillow bilinear (antialiased when shrinking)."""
    image = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _colourise(gray: np.ndarray, category: str, gain: float, offset: float) -> np.ndarray:
    """(h, w) gray -> (h, w, 3) float32 RGB, unclipped."""
    tint = np.asarray(_TINTS[category], dtype=np.float32)
    return gray[..., None] * (gain * tint) + offset


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Round to the nearest level and saturate to [0, 255] uint8 (no wrap-around)."""
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _nominal_tile(source: np.ndarray, category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop (scale +-5 %), random flips, small gain/offset change: (size, size, 3) uint8.

    Surface categories draw a fresh tile instead (`_surface_tile`; `source` unused).
    """
    if category in SURFACE_CATEGORIES:
        return _surface_tile(category, size, rng)
    side = min(source.shape[0], round(size * _SOURCE_SCALE * rng.uniform(0.95, 1.05)))
    top, left = rng.integers(0, source.shape[0] - side + 1, size=2)
    gray = _resize(source[top : top + side, left : left + side], size)
    if rng.random() < 0.5:
        gray = gray[:, ::-1]
    if rng.random() < 0.5:
        gray = gray[::-1, :]
    return _to_uint8(_colourise(gray, category, rng.uniform(0.93, 1.07), rng.uniform(-6.0, 6.0)))


# --------------------------------------------------------------------------- defect shapes


def _coverage(size: int, draw_shapes: Any) -> np.ndarray:
    """Per-pixel area coverage in [0, 1] of shapes drawn by `draw_shapes(draw, scale)`.

    Drawn on a 4x canvas then box-averaged: the anti-aliased alpha of the shape.
    """
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw_shapes(ImageDraw.Draw(canvas), float(_SUPERSAMPLE))
    values = np.asarray(canvas, dtype=np.float32) / 255.0
    return values.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def _centre(size: int, rng: np.random.Generator) -> tuple[float, float]:
    """A defect centre (x, y) in the middle 60 % of the tile, so centre crops keep it."""
    return tuple(float(v) for v in rng.uniform(0.3 * size, 0.7 * size, size=2))  # type: ignore[return-value]


def _scratch_alpha(
    size: int,
    rng: np.random.Generator,
    *,
    centre: tuple[float, float] | None = None,
    angle: float | None = None,
    bend_scale: float = 1.0,
) -> np.ndarray:
    """A thick curved line (quadratic Bezier), 2-5 % of the tile wide: (size, size) coverage.

    centre (x, y) in px and angle in radians are drawn from `rng` when None (middle 60 % of the
    tile, [0, pi)); bend_scale < 1 straightens the curve. benchmarks/accuracy_bench.py passes all
    three for its border defects; the defaults give the demo's bytes.
    """
    cx, cy = _centre(size, rng) if centre is None else centre
    angle = rng.uniform(0, math.pi) if angle is None else angle
    half = 0.5 * size * rng.uniform(0.3, 0.6)
    dx, dy = half * math.cos(angle), half * math.sin(angle)
    bend = size * rng.uniform(-0.15, 0.15) * bend_scale  # x * 1.0 == x: the default is exact
    control = (cx - bend * math.sin(angle), cy + bend * math.cos(angle))
    t = np.linspace(0.0, 1.0, 32)[:, None]
    start, end = np.array([cx - dx, cy - dy]), np.array([cx + dx, cy + dy])
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * np.array(control) + t**2 * end
    width = size * rng.uniform(0.02, 0.05)

    def draw(canvas: ImageDraw.ImageDraw, scale: float) -> None:
        points = [(float(x) * scale, float(y) * scale) for x, y in curve]
        canvas.line(points, fill=255, width=max(1, round(width * scale)), joint="curve")

    return _coverage(size, draw)


def _blob_alpha(
    size: int,
    rng: np.random.Generator,
    radius: tuple[float, float],
    *,
    centre: tuple[float, float] | None = None,
) -> np.ndarray:
    """Union of 3-5 overlapping ellipses around one centre: (size, size) coverage in [0, 1].

    radius: (low, high) range of each semi-axis as a fraction of the tile side; centre (x, y) in px
    is drawn from `rng` when None (the middle 60 % of the tile).
    """
    cx, cy = _centre(size, rng) if centre is None else centre
    ellipses = []
    for _ in range(int(rng.integers(3, 6))):
        rx, ry = size * rng.uniform(*radius, size=2)
        ox, oy = rng.normal(0.0, 0.4 * min(rx, ry), size=2)
        ellipses.append((cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry))

    def draw(canvas: ImageDraw.ImageDraw, scale: float) -> None:
        for box in ellipses:
            canvas.ellipse([v * scale for v in box], fill=255)

    return _coverage(size, draw)


# --------------------------------------------------------------------------- defect appearance


def _misplaced_content(
    source: np.ndarray, category: str, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Material from elsewhere in the photo, rotated 30-150 degrees and zoomed in 1.4-2x."""
    angle = rng.uniform(30.0, 150.0)
    rotated = np.asarray(
        Image.fromarray(source, mode="F").rotate(angle, Image.Resampling.BILINEAR), dtype=np.float32
    )
    # keep to the square inscribed in the rotated photo (no empty corners)
    inner = int(source.shape[0] / math.sqrt(2)) - 2
    side = min(inner, round(size * _SOURCE_SCALE / rng.uniform(1.4, 2.0)))
    lo = (source.shape[0] - inner) // 2
    top, left = lo + rng.integers(0, inner - side + 1, size=2)
    gray = _resize(rotated[top : top + side, left : left + side], size)
    return _colourise(gray, category, 1.0, 0.0)


def _defect_content(
    kind: str, clean: np.ndarray, source: np.ndarray, category: str, rng: np.random.Generator
) -> np.ndarray:
    """What the defect region shows, for the whole tile: (size, size, 3) float32."""
    size = clean.shape[0]
    base = clean.astype(np.float32)
    mean = float(base.mean())
    if kind == "scratch":
        # bright scratch on dark material and vice versa; slight colour noise
        level = rng.uniform(225, 250) if mean < 140 else rng.uniform(10, 35)
        return np.full_like(base, level) + rng.normal(0.0, 4.0, size=(1, 1, 3))
    if kind == "stain":
        colours = ((150.0, 70.0, 30.0), (35.0, 30.0, 28.0), (220.0, 205.0, 70.0), (60.0, 90.0, 200.0))
        colour = np.asarray(colours[int(rng.integers(len(colours)))], dtype=np.float32)
        return 0.25 * base + 0.75 * colour  # keeps a little of the texture under the stain
    if kind == "misplaced":
        return _misplaced_content(source, category, size, rng)
    if kind == "texture":
        if rng.random() < 0.5:  # smeared: blurred and darkened
            sigma = size * rng.uniform(0.02, 0.035)
            return ndimage.gaussian_filter(base, sigma=(sigma, sigma, 0)) * rng.uniform(0.65, 0.8)
        return base + rng.normal(0.0, 45.0, size=base.shape)  # grainy: strong pixel noise
    if kind == "color":
        if category in SURFACE_CATEGORIES:  # a grey camera sees discolouration as a tone change
            return base + rng.choice((-1.0, 1.0)) * rng.uniform(12.0, 30.0)
        # rotate the colour channels and lift saturation: same texture, wrong colour
        shifted = base[..., [2, 0, 1]] if rng.random() < 0.5 else base[..., [1, 2, 0]]
        grey = base.mean(axis=2, keepdims=True)
        return grey + 1.8 * (shifted - grey) + rng.uniform(-25, 25)
    raise ValueError(f"unknown defect type {kind!r}; choose from {list(DEFECT_TYPES)}")


def add_defect(
    clean: np.ndarray, kind: str, source: np.ndarray, category: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of `kind` onto a clean (size, size, 3) uint8 tile.

    Returns (image uint8, mask bool). The mask is where the anti-aliased shape covers >= half a
    pixel; there the pixel blends clean -> defect by its coverage (0.5..1); elsewhere it is clean.
    Surface categories are grey: their defects show the luma of the defect colour.
    """
    if kind not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {kind!r}; choose from {list(DEFECT_TYPES)}")
    size = clean.shape[0]
    if kind == "scratch":
        alpha = _scratch_alpha(size, rng)
    elif kind == "stain":
        alpha = _blob_alpha(size, rng, (0.04, 0.09))
    else:
        alpha = _blob_alpha(size, rng, (0.07, 0.14))
    content = _defect_content(kind, clean, source, category, rng)
    if category in SURFACE_CATEGORIES:
        content = np.repeat(content @ np.asarray(_LUMA, dtype=np.float32), 3).reshape(content.shape)
    mask = alpha >= 0.5
    weight = np.where(mask, alpha, 0.0)[..., None]
    blended = _to_uint8(clean.astype(np.float32) * (1.0 - weight) + content * weight)
    image = np.where(mask[..., None], blended, clean)  # outside the mask: the clean bytes exactly
    return image, mask


# --------------------------------------------------------------------------- dataset


def _sample_rng(seed: int, category: str, split: str, defect: str, index: int) -> np.random.Generator:
    """Independent generator per image, so any image can be rebuilt on its own."""
    split_code = ("train", "test").index(split)
    defect_code = ("good", *DEFECT_TYPES).index(defect)
    category_code = ALL_CATEGORIES.index(category)
    return np.random.default_rng([seed, category_code, split_code, defect_code, index])


def demo_sample(
    category: str,
    split: str,
    defect: str,
    index: int,
    *,
    size: int,
    seed: int,
    source: np.ndarray | None = None,
) -> DemoSample:
    """Rebuild image `index` of `<category>/<split>/<defect>` (defect "good" = nominal)."""
    if split not in ("train", "test") or (split == "train" and defect != "good"):
        raise ValueError(f"no such demo image: split {split!r} defect {defect!r}")
    if defect != "good" and defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {defect!r}; choose 'good' or one of {list(DEFECT_TYPES)}")
    source = source_texture(category) if source is None else source
    rng = _sample_rng(seed, category, split, defect, index)
    clean = _nominal_tile(source, category, size, rng)
    if defect == "good":
        return DemoSample(clean, clean, np.zeros(clean.shape[:2], dtype=bool))
    image, mask = add_defect(clean, defect, source, category, rng)
    return DemoSample(clean, image, mask)


def _png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a (size, size, 3) or (size, size) uint8 array (RGB or grey)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # no timestamps: same pixels, same bytes
    return buffer.getvalue()


def make_demo_dataset(
    out_dir: str,
    categories: Sequence[str] = CATEGORIES,
    num_train: int = 30,
    num_test_good: int = 8,
    num_test_defect: int = 3,
    size: int = 128,
    seed: int = 0,
    defect_types: Sequence[str] = DEFECT_TYPES,
) -> dict[str, dict[str, int]]:
    """Write an MVTec AD layout under `out_dir` (local path or URI).

    <out>/<category>/train/good/NNN.png, test/good/NNN.png, test/<defect>/NNN.png,
    ground_truth/<defect>/NNN_mask.png (0/255, same size). num_test_defect is per defect type;
    size is the tile side in px. Returns {category: {"train": n, "test_good": n, "test_defect": n}}.
    categories: any of ALL_CATEGORIES; the default is the three photo textures.
    """
    for name, value, low in (("num_train", num_train, 1), ("num_test_good", num_test_good, 1),
                             ("num_test_defect", num_test_defect, 1), ("size", size, 32)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    bad = [c for c in categories if c not in ALL_CATEGORIES]
    bad += [d for d in defect_types if d not in DEFECT_TYPES]
    if bad or not categories or not defect_types:
        raise ValueError(
            f"unknown or missing categories/defect types {bad}; "
            f"categories: {list(ALL_CATEGORIES)}, "
            f"defect types: {list(DEFECT_TYPES)}"
        )
    counts = {}
    for category in categories:
        source = source_texture(category)
        root = storage.join_uri(out_dir, category)
        jobs = [("train", "good", i) for i in range(num_train)]
        jobs += [("test", "good", i) for i in range(num_test_good)]
        jobs += [("test", d, i) for d in defect_types for i in range(num_test_defect)]
        for split, defect, index in jobs:
            sample = demo_sample(category, split, defect, index, size=size, seed=seed, source=source)
            name = f"{index:03d}"
            storage.write_bytes(storage.join_uri(root, split, defect, f"{name}.png"), _png(sample.image))
            if defect != "good":
                mask = sample.mask.astype(np.uint8) * 255
                storage.write_bytes(
                    storage.join_uri(root, "ground_truth", defect, f"{name}_mask.png"), _png(mask)
                )
        counts[category] = {
            "train": num_train,
            "test_good": num_test_good,
            "test_defect": num_test_defect * len(defect_types),
        }
    return counts
