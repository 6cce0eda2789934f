"""Test helpers shared by the test suites: a generated corpus of awkward and hostile image files.

`bad_input_corpus()` returns `{file name: (bytes, Expected)}`; every file is generated here
(nothing downloaded), and each entry says what `captioner.intake.decode.decode_image` must do with
it: raise a specific `ImageRejected` subclass, or return an image of a given size whose
sample pixels have given colours. Workers' tests reuse it to check that one bad image fails
alone with a readable reason.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from captioner.intake.decode import (
    ImageRejected,
    ImageTooLarge,
    NotAnImage,
    TruncatedImage,
    UnsupportedFormat,
)
from core_model.imageops import ALPHA_BACKGROUND

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


@dataclass(frozen=True)
class Expected:
    """What decoding a corpus file must give: an error, or an image with known pixels."""

    error: type[ImageRejected] | None = None
    reason_contains: str = ""
    size: tuple[int, int] | None = None
    # {(x, y): (r, g, b)} sampled from the decoded RGB image.
    pixels: dict[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict)
    # Largest per-channel difference allowed (lossy formats need a little).
    tolerance: int = 0


def check_decoded(image: Image.Image, expected: Expected) -> None:
    """Assert a decoded image matches `expected` (size, mode and sampled pixel values)."""
    assert expected.error is None, f"expected {expected.error.__name__}, got an image"
    assert image.mode == "RGB", image.mode
    if expected.size is not None:
        assert image.size == expected.size, (image.size, expected.size)
    for (x, y), want in expected.pixels.items():
        got = image.getpixel((x, y))
        diff = max(abs(int(g) - int(w)) for g, w in zip(got, want, strict=True))
        assert diff <= expected.tolerance, f"pixel {(x, y)}: got {got}, want {want}"


def _save(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    """An image whose left half is `left` and right half is `right`."""
    im = Image.new(mode, size, left)
    im.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return im


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit greyscale pixels (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    # A few rows of zeros that compress to almost nothing: the point is the header.
    idat = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _noise_jpeg(size=(256, 256)) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return _save(Image.fromarray(arr, "RGB"), "JPEG", quality=95)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 12), c) for c in (RED, GREEN, BLUE)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _cmyk_jpeg() -> bytes:
    # Left half pure cyan ink, right half magenta+yellow (= red).
    im = _halves((32, 16), (255, 0, 0, 0), (0, 255, 255, 0), mode="CMYK")
    return _save(im, "JPEG", quality=95)


def _png16() -> bytes:
    arr = np.zeros((8, 16), dtype=np.uint16)
    arr[:, :8] = 65535
    arr[:, 8:] = 32768
    return _save(Image.fromarray(arr), "PNG")


def _palette_png_with_transparency() -> bytes:
    im = Image.new("P", (16, 8), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.paste(1, (8, 0, 16, 8))
    return _save(im, "PNG", transparency=0)  # index 0 (the left half) is transparent


def _rgba_png() -> bytes:
    im = _halves((16, 8), (0, 0, 255, 0), (0, 0, 255, 255), mode="RGBA")
    return _save(im, "PNG")


def _exif_rotated_jpeg() -> bytes:
    # Stored 40 wide x 20 tall, red left / blue right, with EXIF orientation 6 ("rotate 90
    # clockwise to display"): shown 20 wide x 40 tall, red on top, blue below.
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_halves((40, 20), RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())


def bad_input_corpus() -> dict[str, tuple[bytes, Expected]]:
    """Every awkward input we know of, with the outcome `decode_image` must produce."""
    truncated_jpeg = _noise_jpeg()
    valid_png = _save(Image.new("RGB", (64, 64), GREEN), "PNG", compress_level=0)
    return {
        "zero_bytes.jpg": (b"", Expected(NotAnImage, "empty")),
        "random_bytes.jpg": (
            random.Random(0).randbytes(4096),
            Expected(NotAnImage, "not an image"),
        ),
        "page.html.jpg": (
            b"<!DOCTYPE html>\n<html><body><img src='cat.jpg'></body></html>\n",
            Expected(NotAnImage, "HTML"),
        ),
        "drawing.svg.jpg": (
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
            b'height="10"><rect width="10" height="10" fill="red"/></svg>\n',
            Expected(UnsupportedFormat, "unsupported format SVG"),
        ),
        "document.pdf.jpg": (
            b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
            Expected(UnsupportedFormat, "unsupported format PDF"),
        ),
        "truncated.jpg": (
            truncated_jpeg[: len(truncated_jpeg) // 2],
            Expected(TruncatedImage, "truncated file"),
        ),
        "truncated.png": (valid_png[: len(valid_png) // 2], Expected(TruncatedImage, "truncated")),
        "bomb_40000x40000.png": (
            png_declaring(40_000, 40_000),
            Expected(ImageTooLarge, "image too large: 1600000000 pixels > limit 89478485"),
        ),
        "big_10000x10000.png": (
            png_declaring(10_000, 10_000),
            Expected(ImageTooLarge, "image too large: 100000000 pixels > limit 89478485"),
        ),
        "animated.gif": (
            _animated_gif(),
            Expected(size=(16, 12), pixels={(0, 0): RED, (15, 11): RED}),
        ),
        "cmyk.jpg": (
            _cmyk_jpeg(),
            Expected(size=(32, 16), pixels={(4, 8): (0, 255, 255), (27, 8): RED}, tolerance=12),
        ),
        "sixteen_bit.png": (
            _png16(),
            Expected(
                size=(16, 8),
                pixels={(2, 2): (255, 255, 255), (12, 2): (128, 128, 128)},
                tolerance=1,
            ),
        ),
        "palette_transparent.png": (
            _palette_png_with_transparency(),
            Expected(size=(16, 8), pixels={(2, 4): ALPHA_BACKGROUND, (12, 4): RED}),
        ),
        "rgba_half_transparent.png": (
            _rgba_png(),
            Expected(size=(16, 8), pixels={(2, 4): ALPHA_BACKGROUND, (12, 4): BLUE}),
        ),
        "exif_rotated.jpg": (
            _exif_rotated_jpeg(),
            Expected(size=(20, 40), pixels={(10, 5): RED, (10, 34): BLUE}, tolerance=12),
        ),
        "plain.webp": (
            _save(Image.new("RGB", (8, 8), BLUE), "WEBP", lossless=True),
            Expected(size=(8, 8), pixels={(4, 4): BLUE}),
        ),
        "plain.bmp": (
            _save(Image.new("RGB", (8, 6), GREEN), "BMP"),
            Expected(size=(8, 6), pixels={(4, 3): GREEN}),
        ),
        "plain.tiff": (
            _save(Image.new("RGB", (8, 6), RED), "TIFF"),
            Expected(size=(8, 6), pixels={(4, 3): RED}),
        ),
        "grey.ico.jpg": (
            _save(Image.new("RGB", (16, 16), RED), "ICO"),
            Expected(UnsupportedFormat, "unsupported format ICO"),
        ),
    }
