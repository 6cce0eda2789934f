"""Safe image decoding: untrusted bytes in, an 8-bit RGB `PIL.Image` out, or a specific error.

Only JPEG, PNG, WebP, GIF (first frame), BMP, TIFF, AVIF (Pillow's own plugin) and HEIC/HEIF
(through `pillow-heif`, registered on the first such file) are decoded; PIL is never asked to
try its other plugins (some, like EPS, run external programs). The pixel count is checked from the
header before any pixel is decoded, so a decompression bomb costs nothing. Truncated files
are rejected (we never set `ImageFile.LOAD_TRUNCATED_IMAGES`). Orientation, alpha, palette,
CMYK and 16-bit are normalised by `core_model.imageops.to_rgb`, the same function training and
inference use. Every rejection is an `ImageRejected` subclass whose `reason` a person can read.

Given the size the pixels are for (`target_size`, the model's input), a JPEG at least
`DRAFT_FACTOR` times larger on both sides is decoded at 1/2, 1/4 or 1/8 scale in the DCT
(Pillow's `draft`), never below that size: the resize that follows sees nearly the same pixels,
for a fraction of the decoding work (bench/decode.py). Other images decode in full, as before.
"""

from __future__ import annotations

import functools
import io
import re
import struct
import warnings
import zlib

from PIL import Image, ImageFile, UnidentifiedImageError

from captioner.settings import DEFAULT_MAX_IMAGE_PIXELS
from core_model.imageops import to_rgb

# PIL format names we decode, in the order PIL tries them. MPO is how PIL names multi-picture
# JPEGs from phone cameras. AVIF comes before HEIF: both accept the generic `mif1` brand, and
# Pillow's AVIF plugin passes a file on (SyntaxError) when its brands say it is not AVIF.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
_ALLOWED_PIL_FORMATS = {*ALLOWED_FORMATS, "MPO"}
_WITHOUT_HEIF = tuple(f for f in ALLOWED_FORMATS if f != "HEIF")
# ISO-BMFF brands (bytes 8..12, after "ftyp") of HEVC-coded HEIF files, the iPhone's HEIC
# among them; `mif1` / `msf1` are the generic image / sequence brands.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs")
_GENERIC_BRANDS = (b"mif1", b"msf1")

DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024
# A JPEG is drafted only when both its sides are at least this many times the target's larger
# side (a square request, so an EXIF rotation applied afterwards cannot make it too small).
DRAFT_FACTOR = 2


class ImageRejected(ValueError):
    """An input that will not be captioned; `reason` says why, in words."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class NotAnImage(ImageRejected):
    """Empty, random, text or other non-image bytes."""


class UnsupportedFormat(ImageRejected):
    """A real image format, but not one we decode (SVG, PDF, PSD; HEIC without pillow-heif)."""

    def __init__(self, format_name: str) -> None:
        self.format_name = format_name
        super().__init__(f"unsupported format {format_name}")


class ImageTooLarge(ImageRejected):
    """More pixels (or bytes) than the configured limit."""


class TruncatedImage(ImageRejected):
    """The file ends before its pixel data does."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("truncated file" + (f" ({detail})" if detail else ""))


class CorruptImage(ImageRejected):
    """A recognised format whose data does not decode."""


# Magic numbers of formats we refuse, so the reason names the format instead of "not an image".
_OTHER_FORMATS: tuple[tuple[bytes, int, str], ...] = (
    (b"%PDF", 0, "PDF"),
    (b"8BPS", 0, "PSD"),
    (b"%!PS", 0, "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", 0, "PostScript/EPS"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"qoif", 0, "QOI"),
)
_FTYP_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


@functools.cache
def heif_supported() -> bool:
    """Register pillow-heif's HEIF opener with PIL, once; False where pillow-heif is missing.

    Called on the first HEIF-branded file only, so a process that never sees one never
    imports pillow-heif (nor libheif).
    """
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _ftyp_brand(data: bytes) -> bytes | None:
    return data[8:12] if data[4:8] == b"ftyp" else None


def sniff_other_format(data: bytes) -> str | None:
    """The name of a known format `data` looks like (asked when PIL did not identify it)."""
    for magic, offset, name in _OTHER_FORMATS:
        if data[offset : offset + len(magic)] == magic:
            return name
    brand = _ftyp_brand(data)
    if brand in _FTYP_BRANDS:
        return _FTYP_BRANDS[brand]
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    # An HTML page with an inline <svg> is still an HTML page.
    if head.startswith(b"<") and _looks_like_text_markup(data) != "HTML":
        if b"<svg" in data[:4096].lower():
            return "SVG"
    return None


def _looks_like_text_markup(data: bytes) -> str | None:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML"
    if head.startswith(b"<?xml") or head.startswith(b"<"):
        return "XML/markup"
    return None


def _reject_unidentified(data: bytes) -> ImageRejected:
    if not data:
        return NotAnImage("not an image: empty file")
    other = sniff_other_format(data)
    if other in ("AVIF", "HEIC", "HEIF") and _decodable_brand(_ftyp_brand(data)):
        # A brand we decode whose boxes PIL could not parse.
        return CorruptImage(f"corrupt image: unreadable {other} file")
    if other:
        return UnsupportedFormat(other)
    markup = _looks_like_text_markup(data)
    if markup:
        return NotAnImage(f"not an image: looks like {markup}")
    return NotAnImage("not an image")


def _formats_for(data: bytes) -> tuple[str, ...]:
    """The formats PIL may try on `data`: HEIF only for HEIF brands, registered on first use."""
    if _ftyp_brand(data) in (*_HEIF_BRANDS, *_GENERIC_BRANDS) and heif_supported():
        return ALLOWED_FORMATS
    return _WITHOUT_HEIF


def _decodable_brand(brand: bytes | None) -> bool:
    """Whether a file with this ftyp brand has a decoder: AVIF always, HEIF with pillow-heif."""
    if brand in (b"avif", b"avis"):
        return True
    return brand in (*_HEIF_BRANDS, *_GENERIC_BRANDS) and heif_supported()


def _too_large(pixels: int | None, max_pixels: int) -> ImageTooLarge:
    shown = f"{pixels} pixels" if pixels is not None else "too many pixels"
    return ImageTooLarge(f"image too large: {shown} > limit {max_pixels}")


def open_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Image.Image:
    """Identify `data` and read its header only: format and size checked, no pixels decoded."""
    if len(data) > max_bytes:
        raise ImageTooLarge(f"file too large: {len(data)} bytes > limit {max_bytes}")
    if not data:
        raise _reject_unidentified(data)
    try:
        with warnings.catch_warnings():
            # PIL warns between its limit and twice it; we apply our own limit just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=_formats_for(data))
    except Image.DecompressionBombError as exc:
        match = _BOMB_PIXELS.search(str(exc))
        raise _too_large(int(match.group(1)) if match else None, max_pixels) from None
    except UnidentifiedImageError:
        raise _reject_unidentified(data) from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        # A header PIL recognised but could not parse.
        raise _classify_decode_error(exc) from None
    if im.format not in _ALLOWED_PIL_FORMATS:
        raise UnsupportedFormat(str(im.format))
    width, height = im.size
    if width <= 0 or height <= 0:
        raise CorruptImage(f"corrupt image: invalid size {width}x{height}")
    if width * height > max_pixels:
        raise _too_large(width * height, max_pixels)
    return im


def _classify_decode_error(exc: BaseException) -> ImageRejected:
    message = str(exc)
    lowered = message.lower()
    if isinstance(exc, EOFError) or "truncated" in lowered or "end of file" in lowered:
        return TruncatedImage()
    return CorruptImage(f"corrupt image: {message or type(exc).__name__}")


def draft_jpeg(im: Image.Image, target_size: tuple[int, int] | None) -> bool:
    """Ask PIL to decode the JPEG `im` (header read, pixels not yet) at 1/2, 1/4 or 1/8 scale
    when both its sides are at least `DRAFT_FACTOR` times `target_size`'s larger side; the
    scale keeps both sides at or above that side. True when it did."""
    if target_size is None or im.format != "JPEG":
        return False
    side = max(target_size)
    if side <= 0 or min(im.size) < DRAFT_FACTOR * side:
        return False
    return im.draft("RGB", (side, side)) is not None


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    target_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode untrusted bytes to an 8-bit RGB image (first frame), or raise `ImageRejected`.

    `target_size` ((height, width) the pixels will be resized to) lets a large JPEG be decoded
    at a reduced scale no smaller than it (see `draft_jpeg`); None decodes every pixel."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone turned on PIL's global "accept truncated files"; we would silently caption
        # half-grey images. Refuse loudly rather than decode unsafely.
        raise RuntimeError("PIL ImageFile.LOAD_TRUNCATED_IMAGES is set; safe decoding needs it off")
    im = open_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
    try:
        im.seek(0)  # first frame of animated GIF / WebP / multi-page TIFF
        draft_jpeg(im, target_size)
        im.load()
        return to_rgb(im)
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error) as exc:
        raise _classify_decode_error(exc) from None
    except Image.DecompressionBombError as exc:  # e.g. a later TIFF/GIF frame size
        raise _too_large(None, max_pixels) from exc
