"""From a storage key to model-ready pixels: the fetch-and-decode step of a caption batch.

`prepare_image` reads one image from the object store and decodes it safely on the CPU, or, on
CUDA with `Settings.gpu_decode`, leaves a plain JPEG's bytes for `decode_jpegs_on_device` (one
nvJPEG call for the whole batch, under the model lock). `device_batch` stacks the pixels into
one batch on the model's device. Each image's trouble stays its own: a missing or undecodable
image becomes a permanent failure with its reason, a storage error a transient one (retried).

A model's preprocessing (resize, crop, to tensor, normalise) is split in two
(`split_preprocess`): the resize and crop run per image on the fetch threads and leave 8-bit
pixels; to-tensor and normalise run once for the whole batch (`batch_pixels`), the same
arithmetic in the same order, so the pixels are bit for bit those of the per-image transform.
The per-image tensor work was a third of a plumbing-only worker's CPU (py-spy,
bench/pipeline_throughput.py --plumbing).

torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from captioner.intake.decode import ImageRejected, decode_image, open_image
from captioner.settings import Settings
from captioner.storage import InvalidKey, ObjectNotFound, ObjectTooLarge

NOT_FOUND_REASON = "image file not found in storage"
TOO_LARGE_REASON = "image file too large: {size} bytes > limit {limit} (not read)"
MODEL_REJECTED_REASON = "could not prepare the image for the model: {error}"


@dataclass(frozen=True)
class Prepared:
    """What came of fetching and decoding one image: pixels, bytes for the device decoder, or
    the reason it failed."""

    pixels: Any = None  # a preprocessed tensor (3, H, W), or 8-bit (H, W, 3) for `batch_pixels`
    jpeg: bytes | None = None  # bytes left for the batched device decoder
    width: int | None = None
    height: int | None = None
    reason: str | None = None  # permanent failure, for people
    reason_kind: str = ""  # metrics label
    transient: str | None = None  # transient failure: retry


def prepare_image(
    store, key: str, settings: Settings, preprocess, device_jpeg: bool = False
) -> Prepared:
    """Fetch `key` and decode it: on the CPU, or (`device_jpeg`) kept for the device decoder
    if it is a JPEG nvJPEG decodes exactly as the CPU would."""
    try:
        # An object over the limit is refused without being read (its length comes first).
        data = store.get_at_most(key, settings.max_image_bytes)
    except ObjectTooLarge as exc:
        reason = TOO_LARGE_REASON.format(size=exc.size, limit=settings.max_image_bytes)
        return Prepared(reason=reason, reason_kind="too_large")
    except (ObjectNotFound, InvalidKey) as exc:
        kind = "not_found" if isinstance(exc, ObjectNotFound) else "invalid_key"
        reason = NOT_FOUND_REASON if kind == "not_found" else f"invalid storage key: {exc}"
        return Prepared(reason=reason, reason_kind=kind)
    except Exception as exc:  # network, throttling, disk: retried, never swallowed
        return Prepared(transient=f"{type(exc).__name__}: {exc}")
    header = _device_decodable(data, settings) if device_jpeg else None
    if header is not None:
        return Prepared(jpeg=data, width=header.width, height=header.height)
    return decode_on_cpu(data, settings, preprocess)


def _device_decodable(data: bytes, settings: Settings):
    """The header of a plain RGB or greyscale JPEG, within limits and not rotated by EXIF
    (nvJPEG gives the same pixels as the CPU path); None sends it to the CPU path."""
    try:
        header = open_image(
            data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes
        )
    except ImageRejected:
        return None  # the CPU path names the reason
    if header.format != "JPEG" or header.mode not in ("RGB", "L"):
        return None
    return header if header.getexif().get(0x0112, 1) == 1 else None


def decode_on_cpu(data: bytes, settings: Settings, preprocess) -> Prepared:
    """Decode `data` safely (within the size limits) and preprocess it for the model (with a
    `SplitPreprocess`, its per-image step: `batch_pixels` finishes the batch). A JPEG much
    larger than the model's input is decoded at a reduced scale (`decode_image`'s draft)."""
    try:
        image = decode_image(
            data,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
            target_size=getattr(preprocess, "input_size", None),
        )
    except ImageRejected as exc:
        return Prepared(reason=exc.reason, reason_kind=type(exc).__name__)
    step = preprocess.per_image if isinstance(preprocess, SplitPreprocess) else preprocess
    try:
        pixels = step(image)
    except (OSError, ValueError, RuntimeError) as exc:
        return Prepared(reason=MODEL_REJECTED_REASON.format(error=exc), reason_kind="preprocess")
    return Prepared(pixels=pixels, width=image.width, height=image.height)


def decode_jpegs_on_device(
    prepared: dict[int, Prepared], captioner, settings: Settings
) -> dict[int, Prepared]:
    """`prepared` with the batch's device-decodable JPEGs decoded in one nvJPEG call and
    preprocessed on the device; an image nvJPEG refuses goes through the CPU path instead."""
    from core_model.tensor_preprocess import decode_jpegs

    ids = [i for i, p in prepared.items() if p.jpeg is not None]
    if not ids:
        return dict(prepared)
    decoded = decode_jpegs([prepared[i].jpeg for i in ids], captioner.device)
    ok = [(i, t) for i, t in zip(ids, decoded, strict=True) if t is not None]
    on_device: dict[int, Prepared] = {}
    if ok:
        pixels = captioner.tensor_preprocessor([t for _, t in ok])
        for (i, _), px in zip(ok, pixels, strict=True):
            on_device[i] = replace(prepared[i], pixels=px, jpeg=None)
    refused = {  # nvJPEG refused these: the CPU path decides
        i: decode_on_cpu(prepared[i].jpeg, settings, captioner.preprocess)
        for i in ids
        if i not in on_device
    }
    return {**prepared, **on_device, **refused}


@dataclass(frozen=True)
class SplitPreprocess:
    """A preprocessing transform in two steps: `per_image` (PIL image -> 8-bit (H, W, 3) array:
    resize, crop) and `normalize` (to float in [0, 1], then (x - mean) / std, as torchvision's
    `to_tensor` and `normalize` do), the second run by `batch_pixels` on a whole batch."""

    per_image: Callable[[Any], Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int] | None = None  # (height, width) the model takes


@functools.lru_cache(maxsize=4)
def split_preprocess(preprocess) -> SplitPreprocess | Callable[[Any], Any]:
    """`preprocess` split (see `SplitPreprocess`) when it is a torchvision `Compose` of image
    steps followed by to-tensor and a plain normalise (timm's eval transform); otherwise
    `preprocess` itself, run whole per image. Cached per preprocess (one per loaded model)."""
    from torchvision import transforms

    steps = list(getattr(getattr(preprocess, "transform", None), "transforms", []) or [])
    if len(steps) < 2:
        return preprocess
    to_tensor, normalize = steps[-2], steps[-1]
    if not (
        type(to_tensor).__name__ in ("ToTensor", "MaybeToTensor")
        and type(normalize) is transforms.Normalize
        and not normalize.inplace
    ):
        return preprocess
    geometry = transforms.Compose(steps[:-2])

    def per_image(image):
        # `decode_image` already made it 8-bit RGB with EXIF orientation applied (the
        # `to_rgb` that `Preprocessor` would run again).
        return np.asarray(geometry(image), dtype=np.uint8)

    mean = tuple(float(m) for m in normalize.mean)
    std = tuple(float(v) for v in normalize.std)
    return SplitPreprocess(
        per_image=per_image,
        mean=mean,
        std=std,
        input_size=getattr(preprocess, "input_size", None),
    )


def batch_pixels(items: list, split: SplitPreprocess | Any) -> list:
    """The batch's pixels as float tensors (3, H, W): the 8-bit arrays of `split.per_image`
    converted and normalised together in one step, the tensors left as they are."""
    import torch

    arrays = [i for i, x in enumerate(items) if isinstance(x, np.ndarray)]
    if not arrays:
        return list(items)
    if not isinstance(split, SplitPreprocess):
        raise TypeError("8-bit pixels need the split preprocess that made them")
    stacked = torch.from_numpy(np.stack([items[i] for i in arrays]))  # (B, H, W, 3) uint8
    pixels = stacked.permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype()).div(255)
    mean = torch.tensor(split.mean, dtype=pixels.dtype).view(1, -1, 1, 1)
    std = torch.tensor(split.std, dtype=pixels.dtype).view(1, -1, 1, 1)
    pixels.sub_(mean).div_(std)
    out = list(items)
    for row, i in enumerate(arrays):
        out[i] = pixels[row]
    return out


def device_batch(tensors: list, device):
    """One (B, 3, H, W) batch of preprocessed pixels on `device`, in the order given.

    On CUDA the CPU-decoded tensors are stacked straight into one pinned (page-locked) buffer
    and sent with one `non_blocking` copy (a copy from pageable memory is synchronous), while
    those nvJPEG decoded are already there. On the CPU: one `torch.stack`, as always.
    """
    import torch

    if device.type != "cuda":
        return torch.stack([t.to(device, non_blocking=True) for t in tensors])
    on_host = [i for i, t in enumerate(tensors) if t.device.type == "cpu"]
    if not on_host:
        return torch.stack(tensors)
    first = tensors[on_host[0]]
    staging = torch.empty((len(on_host), *first.shape), dtype=first.dtype, pin_memory=True)
    torch.stack([tensors[i] for i in on_host], out=staging)
    # The caching host allocator keeps `staging` alive until the copy is done.
    moved = staging.to(device, non_blocking=True)
    if len(on_host) == len(tensors):
        return moved
    merged = list(tensors)
    for row, i in enumerate(on_host):
        merged[i] = moved[row]
    return torch.stack(merged)
