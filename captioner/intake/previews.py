"""Resized previews of stored images, made once and kept in the object store.

The review page shows an image at up to `PREVIEW_SIDE` pixels and the grid and job pages as
thumbnails of `THUMBNAIL_SIDE`: reading an 8000x6000 original (megabytes) to show it at 500
pixels costs every reviewer seconds a day per image. `preview(store, key, side, ...)` returns
JPEG bytes no larger than `side` on either side: from `previews/<side>/<key>.jpg` when it was
made before, else made now (a large JPEG decoded at a reduced scale, `decode.draft_jpeg`) and
stored there. An original already within `side` is its own preview (`None` is returned: serve
the original). `previews/` is a system namespace: nobody submits keys or prefixes there.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from PIL import Image

from captioner.intake import decode
from captioner.storage import InvalidKey, ObjectNotFound

if TYPE_CHECKING:
    from captioner.storage import ObjectStore

THUMBNAIL_SIDE = 256
PREVIEW_SIDE = 1024
SIDES = (THUMBNAIL_SIDE, PREVIEW_SIDE)
PREFIX = "previews/"
# A preview is a small JPEG; anything stored under its key larger than this is not one.
PREVIEW_MAX_BYTES = 4 * 1024 * 1024
JPEG_QUALITY = 85


def preview_key(key: str, side: int) -> str:
    return f"{PREFIX}{side}/{key}.jpg"


def make_preview(data: bytes, side: int, *, max_pixels: int, max_bytes: int) -> bytes | None:
    """JPEG bytes of `data` fitted within `side` x `side` (aspect kept), or None when the
    image already fits (the original is the preview). Raises `decode.ImageRejected`."""
    header = decode.open_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
    if max(header.size) <= side:
        return None
    im = decode.decode_image(
        data, max_pixels=max_pixels, max_bytes=max_bytes, target_size=(side, side)
    )
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


def preview(
    store: ObjectStore, key: str, side: int, *, max_pixels: int, max_bytes: int
) -> bytes | None:
    """The stored preview of `key` at `side`, made and stored on first use; None when the
    original fits within `side`. ObjectNotFound / ObjectTooLarge / ImageRejected for an
    original that is missing, over `max_bytes` or not an image."""
    if side not in SIDES:
        raise ValueError(f"preview side {side}: use one of {', '.join(map(str, SIDES))}")
    stored = preview_key(key, side)
    try:
        return store.get_at_most(stored, PREVIEW_MAX_BYTES)
    except ObjectNotFound:
        pass
    data = store.get_at_most(key, max_bytes)
    made = make_preview(data, side, max_pixels=max_pixels, max_bytes=max_bytes)
    if made is not None:
        try:
            store.put(stored, made, "image/jpeg")
        except InvalidKey:  # an original key too long to carry the preview's prefix: not kept
            pass
    return made
