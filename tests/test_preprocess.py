"""preprocess: decoding every common image mode, rejecting bad data, and the crop geometry."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from patchcore_core import preprocess

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def encode(image: Image.Image, fmt: str, transparency: int | None = None) -> bytes:
    buffer = io.BytesIO()
    if transparency is None:
        image.save(buffer, fmt)
    else:
        image.save(buffer, fmt, transparency=transparency)
    return buffer.getvalue()


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (1-bit gray) but whose pixel data is a stub."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def palette_image() -> Image.Image:
    image = Image.new("P", (40, 30), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    return image


# name -> (encoded bytes, expected RGB value of every pixel, tolerance)
CASES = {
    "gray_L": (encode(Image.new("L", (40, 30), 77), "PNG"), (77, 77, 77), 0),
    "gray_alpha_LA": (encode(Image.new("LA", (40, 30), (100, 7)), "PNG"), (100, 100, 100), 0),
    "bilevel_1": (encode(Image.new("1", (40, 30), 1), "PNG"), (255, 255, 255), 0),
    "palette_P_with_transparency": (
        encode(palette_image(), "PNG", transparency=0),
        (10, 20, 30),
        0,
    ),
    "RGBA_alpha_dropped": (encode(Image.new("RGBA", (40, 30), (1, 2, 3, 0)), "PNG"), (1, 2, 3), 0),
    # 16-bit: 32768 / 65535 * 255 = 127.50 -> 128
    "gray16_I;16": (
        encode(Image.fromarray(np.full((30, 40), 32768, np.uint16)), "PNG"),
        (128, 128, 128),
        0,
    ),
    # 32-bit int, largest value 1000 -> 16-bit depth: 1000 / 65535 * 255 = 3.89 -> 4
    "int32_I_tiff": (
        encode(Image.fromarray(np.full((30, 40), 1000, np.int32)), "TIFF"),
        (4, 4, 4),
        0,
    ),
    # float in [0, 1]: 0.5 * 255 = 127.5 -> 128
    "float_F_tiff": (
        encode(Image.fromarray(np.full((30, 40), 0.5, np.float32)), "TIFF"),
        (128, 128, 128),
        0,
    ),
    # CMYK (0, 255, 255, 0) is red; JPEG is lossy, hence the tolerance.
    "CMYK_jpeg": (encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), (255, 0, 0), 8),
    "RGB_jpeg": (encode(Image.new("RGB", (40, 30), (30, 140, 220)), "JPEG"), (30, 140, 220), 8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_image_gives_rgb_with_expected_colour(name: str) -> None:
    data, expected, tolerance = CASES[name]
    image = preprocess.decode_image(data)
    assert image.mode == "RGB"
    assert image.size == (40, 30)
    pixels = np.asarray(image).astype(int)
    assert np.abs(pixels - np.array(expected)).max() <= tolerance
    assert preprocess.to_tensor(image, resize=36, crop=32).shape == (3, 32, 32)


def test_decode_image_gray_values_are_copied_to_all_channels() -> None:
    gray = np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)
    pixels = np.asarray(preprocess.decode_image(encode(Image.fromarray(gray), "PNG")))
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], gray)


def test_decode_image_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x30, displayed rotated by 90 degrees
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (50, 60, 70)).save(buffer, "JPEG", exif=exif.tobytes())
    assert preprocess.decode_image(buffer.getvalue()).size == (30, 40)


def _valid_png() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), "PNG")


BAD_DATA = {
    "zero_bytes": b"",
    "truncated_png": _valid_png()[: len(_valid_png()) // 2],
    "png_header_only": _valid_png()[:40],
    "truncated_jpeg": encode(Image.new("RGB", (40, 30), (9, 9, 9)), "JPEG")[:300],
    "random_bytes": np.random.default_rng(2).bytes(500),
    "text_file": b"image_id,uri\nok_001,s3://bucket/ok_001.png\n" * 5,
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_decode_image_rejects_bad_data_with_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        preprocess.decode_image(BAD_DATA[name])


@pytest.mark.filterwarnings("error")  # Pillow's DecompressionBombWarning must not leak out
@pytest.mark.parametrize("side", [12_000, 20_000])  # 144 MP (Pillow warns), 400 MP (Pillow raises)
def test_decode_image_rejects_huge_header_before_decoding(side: int) -> None:
    # The stub pixel data would fail to decode with another message if decoding were attempted.
    with pytest.raises(ValueError, match="max_pixels=100000000"):
        preprocess.decode_image(png_with_header(side, side))


def test_decode_image_respects_custom_max_pixels() -> None:
    data = encode(Image.new("RGB", (40, 30)), "PNG")
    assert preprocess.decode_image(data, max_pixels=1200).size == (40, 30)
    with pytest.raises(ValueError, match="max_pixels=1199"):
        preprocess.decode_image(data, max_pixels=1199)


def test_to_tensor_of_constant_image_is_normalised_colour() -> None:
    image = Image.new("RGB", (90, 70), (200, 100, 50))
    tensor = preprocess.to_tensor(image, resize=64, crop=56)
    expected = (torch.tensor([200.0, 100.0, 50.0]).view(3, 1, 1) / 255 - MEAN) / STD
    assert tensor.shape == (3, 56, 56) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, expected.expand(3, 56, 56), atol=1e-6, rtol=0)


def test_to_tensor_crops_the_centre_of_a_tall_image() -> None:
    # 80 wide x 100 tall, resize=80 leaves it unchanged; crop 64 -> left 8, top round(18) = 18.
    pixels = np.random.default_rng(3).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    tensor = preprocess.to_tensor(Image.fromarray(pixels), resize=80, crop=64)
    window = torch.from_numpy(pixels[18:82, 8:72].astype(np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(tensor, (window / 255 - MEAN) / STD, atol=1e-6, rtol=0)
    assert preprocess.crop_box(80, 100, resize=80, crop=64) == (8.0, 18.0, 72.0, 82.0)


def test_to_tensor_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        preprocess.to_tensor(Image.new("L", (64, 64)), resize=64, crop=64)


@pytest.mark.parametrize(
    ("width", "height", "resize", "crop", "box"),
    [
        # wide: resized to 50x25 (scale 2); crop 20 at left 15, top round(2.5) = 2 (banker's)
        (100, 50, 25, 20, (30.0, 4.0, 70.0, 44.0)),
        # tall: the same, transposed
        (50, 100, 25, 20, (4.0, 30.0, 44.0, 70.0)),
        # 101x50 -> int(50.5) = 50 x 25: x scale 101/50 = 2.02, y scale 2
        (101, 50, 25, 20, (15 * 2.02, 4.0, 35 * 2.02, 44.0)),
    ],
)
def test_crop_box_by_hand(width: int, height: int, resize: int, crop: int, box: tuple) -> None:
    assert preprocess.crop_box(width, height, resize, crop) == pytest.approx(box)


def test_uncrop_map_constant_fills_exactly_the_crop_box() -> None:
    out = preprocess.uncrop_map(torch.ones(20, 20), width=100, height=50, resize=25, crop=20)
    expected = torch.zeros(50, 100)
    expected[4:44, 30:70] = 1  # box (30, 4, 70, 44): pixel centres x + 0.5 in [30, 70)
    assert out.shape == (50, 100) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("axis", ["x", "y"])
def test_uncrop_map_interpolates_a_ramp_bilinearly(axis: str) -> None:
    # amap value = crop column (or row) index; each crop pixel covers 2 original pixels.
    ramp = torch.arange(20, dtype=torch.float32)
    amap = ramp.expand(20, 20) if axis == "x" else ramp[:, None].expand(20, 20)
    out = preprocess.uncrop_map(amap.contiguous(), width=100, height=50, resize=25, crop=20)
    for y in range(50):
        for x in range(100):
            inside = 30 <= x < 70 and 4 <= y < 44
            along = (x + 0.5 - 30) / 2 - 0.5 if axis == "x" else (y + 0.5 - 4) / 2 - 0.5
            expected = min(max(along, 0.0), 19.0) if inside else 0.0
            assert out[y, x].item() == pytest.approx(expected, abs=1e-6), (y, x)


def _antialiased_reference(pixels: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) float in [0, 1] by torch's antialiased bilinear resize, an
    implementation independent of Pillow's."""
    image = torch.from_numpy(pixels).permute(2, 0, 1).double()[None] / 255
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)[0]


@pytest.mark.parametrize(
    ("width", "height", "resize", "crop"),
    [(300, 200, 256, 224), (97, 130, 64, 56), (640, 480, 72, 64), (50, 40, 72, 64)],
)
def test_to_tensor_resamples_in_float_like_an_antialiased_resize_then_crop(
    width: int, height: int, resize: int, crop: int
) -> None:
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    tensor = preprocess.to_tensor(Image.fromarray(pixels), resize, crop)
    new_w, new_h = (resize, int(resize * height / width)) if width <= height else (
        int(resize * width / height), resize)
    left, top = round((new_w - crop) / 2), round((new_h - crop) / 2)
    window = _antialiased_reference(pixels, (new_h, new_w))[:, top : top + crop, left : left + crop]
    # Both are float resamplers of the same triangle filter; they differ only in rounding and
    # at the border (Pillow renormalises the clipped filter): 1e-5 of a normalised unit here.
    torch.testing.assert_close(tensor.double(), (window - MEAN.double()) / STD.double(), atol=2e-5,
                               rtol=0)


def test_to_tensor_keeps_sub_grey_level_detail_that_8_bit_resizing_rounds_away() -> None:
    # A 2x shrink of alternating 100/101 columns averages to 100.5: representable in float only.
    pixels = np.zeros((64, 128, 3), dtype=np.uint8)
    pixels[:, 0::2], pixels[:, 1::2] = 100, 101
    tensor = preprocess.to_tensor(Image.fromarray(pixels), resize=32, crop=32, frame="full")
    grey = tensor * STD + MEAN  # back to [0, 1]
    torch.testing.assert_close(grey[:, 4:-4, 4:-4] * 255, torch.full((3, 24, 24), 100.5),
                               atol=1e-3, rtol=0)


def test_full_frame_resizes_the_whole_input_and_crop_box_is_the_image() -> None:
    pixels = np.random.default_rng(5).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    tensor = preprocess.to_tensor(Image.fromarray(pixels), resize=48, crop=48, frame="full")
    expected = (_antialiased_reference(pixels, (48, 48)) - MEAN.double()) / STD.double()
    torch.testing.assert_close(tensor.double(), expected, atol=2e-5, rtol=0)
    assert preprocess.crop_box(90, 60, 48, 48, frame="full") == (0.0, 0.0, 90.0, 60.0)


def test_uncrop_map_of_full_frame_covers_every_input_pixel() -> None:
    out = preprocess.uncrop_map(torch.ones(20, 20), width=100, height=50, resize=25, crop=20,
                                frame="full")
    torch.testing.assert_close(out, torch.ones(50, 100), atol=0, rtol=0)
    # a one-hot corner of the map lands in the input's corner, not in a cropped-away border
    amap = torch.zeros(20, 20)
    amap[0, 0] = 1.0
    corner = preprocess.uncrop_map(amap, width=100, height=50, resize=25, crop=20, frame="full")
    assert corner[0, 0] == 1.0 and corner[-1, -1] == 0.0


def test_crop_box_rejects_unknown_frame() -> None:
    with pytest.raises(ValueError, match="'crop' or 'full'"):
        preprocess.crop_box(10, 10, 10, 10, frame="tiles")


def test_to_tensor_of_a_gray_image_equals_resampling_each_channel() -> None:
    # the one-resample path for gray inputs against the per-channel path: an image whose
    # channels differ in one pixel only takes the per-channel path
    gray = np.random.default_rng(7).integers(0, 256, (150, 210), dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    almost = rgb.copy()
    almost[0, 0, 2] ^= 1
    fast = preprocess.to_tensor(Image.fromarray(rgb), 128, 112)
    slow = preprocess.to_tensor(Image.fromarray(almost), 128, 112)
    torch.testing.assert_close(fast[:2], slow[:2], rtol=0, atol=0)
    # channel 2 differs only near the changed corner pixel (outside the centre crop: not at all)
    torch.testing.assert_close(fast[2], slow[2], rtol=0, atol=0)
    for c in range(3):  # the same value in every channel before normalisation
        torch.testing.assert_close(fast[c] * STD[c] + MEAN[c], fast[0] * STD[0] + MEAN[0],
                                   rtol=0, atol=1e-6)
