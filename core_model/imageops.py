"""Pixel-level image normalisation shared by training, inference and the decoding layer.

Pure PIL + numpy: importing this module never imports torch, so the web process may use it.
Every image the model sees goes through `to_rgb` first, whatever mode it arrived in.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# Transparent pixels are composited on this fixed colour, so the same file always gives the
# same pixels (mid grey: neutral for a ViT normalised with mean 0.5).
ALPHA_BACKGROUND = (128, 128, 128)


def _sixteen_bit_to_8(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit single-channel images to 8 bits by their full range, not by clipping."""
    arr = np.asarray(im)
    if arr.dtype == np.uint16 or im.mode in ("I;16", "I;16B", "I;16L"):
        arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    elif im.mode == "I":
        arr = arr.astype(np.int64)
        # 'I' images from 16-bit PNGs hold 0..65535; anything else is scaled by its own range.
        hi = 65535 if arr.max(initial=0) > 255 else 255
        arr8 = (np.clip(arr, 0, hi) * 255 // hi).astype(np.uint8)
    else:  # 'F'
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=1.0))
        scale = (hi - lo) or 1.0
        arr8 = np.clip((arr - lo) / scale * 255.0, 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, mode="L")


def to_rgb(im: Image.Image, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """Return an 8-bit RGB image: EXIF orientation applied, alpha composited on `background`.

    Handles RGBA/LA/PA, palette (with or without transparency), CMYK (including Adobe's
    inverted CMYK JPEGs, which PIL decodes), 1-bit, 16-bit and float greyscale.
    """
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return _sixteen_bit_to_8(im).convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")
