"""Preprocessing: any image mode arrives as the RGB tensor the encoder expects."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from core_model.imageops import ALPHA_BACKGROUND
from core_model.preprocess import Preprocessor


@pytest.fixture(scope="module")
def pre():
    return Preprocessor.for_encoder(timm.create_model("test_vit", pretrained=False, num_classes=0))


def norm(v):  # 8-bit value -> normalised value for mean = std = 0.5
    return v / 255 / 0.5 - 1.0


def pixel(x: torch.Tensor, row: int, col: int) -> list[float]:
    return [round(float(c), 3) for c in x[:, row, col]]


def reload(im: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_rgba_composited_on_the_fixed_background(pre):
    arr = np.zeros((160, 160, 4), np.uint8)
    arr[:, :80] = (255, 0, 0, 255)  # opaque red left half, fully transparent right half
    x = pre(reload(Image.fromarray(arr, "RGBA"), "PNG"))
    assert pixel(x, 10, 10) == pytest.approx([1.0, -1.0, -1.0], abs=1e-3)
    bg = [norm(c) for c in ALPHA_BACKGROUND]
    assert pixel(x, 10, 150) == pytest.approx(bg, abs=1e-3)


def test_palette_with_transparency(pre):
    im = Image.new("P", (160, 160), 1)
    im.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    im.paste(0, (0, 0, 80, 160))
    x = pre(reload(im, "PNG", transparency=0))
    assert pixel(x, 5, 5) == pytest.approx([norm(c) for c in ALPHA_BACKGROUND], abs=1e-3)
    assert pixel(x, 5, 150) == pytest.approx([-1.0, norm(200), -1.0], abs=1e-3)


def test_cmyk_jpeg(pre):
    im = Image.new("CMYK", (160, 160), (0, 255, 255, 0))  # pure red in CMYK
    got = reload(im, "JPEG", quality=95)
    assert got.mode == "CMYK"
    x = pre(got)
    assert pixel(x, 80, 80) == pytest.approx([1.0, -1.0, -1.0], abs=0.05)


def test_sixteen_bit_png_scaled_not_clipped(pre):
    arr = np.full((160, 160), 0x8000, np.uint16)
    arr[:, 80:] = 0xFFFF
    x = pre(reload(Image.fromarray(arr), "PNG"))
    assert pixel(x, 50, 10) == pytest.approx([norm(128)] * 3, abs=1e-3)
    assert pixel(x, 50, 150) == pytest.approx([1.0] * 3, abs=1e-3)


def test_grayscale(pre):
    x = pre(reload(Image.new("L", (160, 160), 200), "PNG"))
    assert x.shape == (3, 160, 160)
    assert pixel(x, 1, 1) == pytest.approx([norm(200)] * 3, abs=1e-3)


def test_exif_rotation_applied(pre):
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100] = (255, 0, 0)  # stored: red left, blue right
    arr[:, 100:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the left side goes on top
    x = pre(reload(im, "JPEG", quality=95, exif=exif.tobytes()))
    assert pixel(x, 20, 80) == pytest.approx([1.0, -1.0, -1.0], abs=0.05)  # red on top
    assert pixel(x, 140, 80) == pytest.approx([-1.0, -1.0, 1.0], abs=0.05)  # blue below


# --- a large JPEG decoded at a reduced scale (Pillow's draft) before the resize --------------


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A photo-like picture: smooth gradients, a few shapes with soft edges, grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack(
        [x / w * 200 + 30, y / h * 180 + 40, (np.sin(x / w * 9) + np.cos(y / h * 7)) * 50 + 120],
        axis=-1,
    )
    for _ in range(6):
        cx, cy, r = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h, rng.uniform(0.05, 0.2) * w
        inside = np.clip((r - np.hypot(x - cx, y - cy)) / (0.01 * w), 0, 1)[..., None]
        arr = arr * (1 - inside) + rng.uniform(0, 255, 3) * inside
    arr += rng.normal(0, 3, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def encoded(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def caption_input(data: bytes, pre, *, draft: bool) -> np.ndarray:
    """The 8-bit pixels the worker gives the model for `data`, with or without the draft."""
    from captioner.settings import Settings
    from workers.pixels import decode_on_cpu, split_preprocess

    split = split_preprocess(pre)
    if not draft:
        split = dataclasses.replace(split, input_size=None)
    prepared = decode_on_cpu(data, Settings(), split)
    assert prepared.reason is None, prepared.reason
    return prepared.pixels.astype(np.int16)


def test_a_large_jpeg_is_drafted_and_its_caption_input_stays_close(pre):
    from captioner.intake.decode import decode_image

    data = encoded(photo(1600, 1200), "JPEG", quality=90)
    # 1/4 scale: the largest of 1/2, 1/4, 1/8 that keeps both sides at or above 160.
    assert decode_image(data, target_size=pre.input_size).size == (400, 300)
    assert decode_image(data).size == (1600, 1200)
    drafted, full = caption_input(data, pre, draft=True), caption_input(data, pre, draft=False)
    assert drafted.shape == full.shape == (160, 160, 3)
    assert np.abs(drafted - full).mean() < 2  # out of 255
    assert not np.array_equal(drafted, full)  # the draft did change the decoding


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encoded(photo(300, 250), "JPEG", quality=90), id="jpeg-under-2x"),
        pytest.param(encoded(photo(1600, 300), "JPEG", quality=90), id="jpeg-one-side-under-2x"),
        pytest.param(encoded(photo(1200, 900), "PNG"), id="large-png"),
        pytest.param(encoded(photo(1200, 900), "WEBP", quality=90), id="large-webp"),
    ],
)
def test_small_jpegs_and_other_formats_decode_bit_for_bit_as_before(pre, data):
    assert np.array_equal(
        caption_input(data, pre, draft=True), caption_input(data, pre, draft=False)
    )
