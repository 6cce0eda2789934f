"""Image -> tensor exactly as the encoder expects it, from the encoder's own timm data config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .imageops import to_rgb


def data_config(encoder: torch.nn.Module) -> dict[str, Any]:
    """timm's data config for `encoder` (mean, std, size, interpolation), whole image kept.

    The input size comes from the built model (its patch embedding), not the pretrained card,
    so an encoder built at another resolution gets images of that resolution. crop_pct is 1.0:
    a caption describes the whole picture, so nothing is cropped beyond the aspect ratio.
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=encoder)
    img_size = getattr(getattr(encoder, "patch_embed", None), "img_size", None)
    if img_size is not None:
        cfg["input_size"] = (3, *tuple(img_size))
    cfg["crop_pct"] = 1.0
    return cfg


class Preprocessor:
    """Callable: PIL image (any mode) -> float tensor (3, H, W), normalised for the encoder."""

    def __init__(self, cfg: dict[str, Any]):
        from timm.data import create_transform

        self.cfg = dict(cfg)
        self.transform = create_transform(**self.cfg, is_training=False)

    @classmethod
    def for_encoder(cls, encoder: torch.nn.Module) -> Preprocessor:
        return cls(data_config(encoder))

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.cfg["input_size"][1:])  # type: ignore[return-value]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(image))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self(im) for im in images])


def open_image(path: str | Path) -> Image.Image:
    """Open a local image file fully (so the file handle is closed) for captioning."""
    with Image.open(path) as im:
        im.load()
        return im.copy() if im.mode != "P" else im.copy()
