"""Preprocessing: any image mode arrives as the RGB tensor the encoder expects."""

from __future__ import annotations

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
