"""Preprocessing on the device: JPEG bytes -> decoded on the GPU (nvJPEG) -> resized, normalised.

The CPU path (PIL + timm transform, `preprocess.Preprocessor`) decodes about 100 JPEGs per
second per core, far below what the model eats on a GPU. Here a batch of JPEG byte strings is
decoded in one `torchvision.io.decode_jpeg(..., device="cuda")` call and resized and
normalised there, with the same data config as the CPU path. Callers send only plain RGB or
greyscale JPEGs without an EXIF rotation this way (they check the header first); everything
else, and anything this path fails on, takes the CPU path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def decode_jpegs(datas: list[bytes], device: str | torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs to uint8 (3, H, W) tensors on `device`; None for any that fail."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        out = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        return list(out)
    except RuntimeError:
        pass  # one bad file fails the batched call: decode one by one to find it
    results: list[torch.Tensor | None] = []
    for enc in encoded:
        try:
            results.append(decode_jpeg(enc, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            results.append(None)
    return results


class TensorPreprocessor:
    """uint8 (3, H, W) tensors of any size -> normalised (B, 3, S, S), like `Preprocessor`.

    Resize of the shorter side to S (bicubic, antialiased), centre crop, scale to [0, 1],
    normalise with the encoder's mean and std. Images of equal size are resized together.
    """

    def __init__(
        self, cfg: dict[str, Any], device: str | torch.device, dtype: torch.dtype = torch.float32
    ):
        self.size = tuple(cfg["input_size"][1:])
        self.mode = "bicubic" if cfg.get("interpolation", "bicubic") == "bicubic" else "bilinear"
        self.device = torch.device(device)
        self.dtype = dtype
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float in [0, 255] of one size -> (N, 3, S, S)."""
        H, W = x.shape[-2:]
        th, tw = self.size
        scale = max(th / H, tw / W)
        nh, nw = max(th, round(H * scale)), max(tw, round(W * scale))
        if (nh, nw) != (H, W):
            x = F.interpolate(x, size=(nh, nw), mode=self.mode, antialias=True, align_corners=False)
        top, left = (nh - th) // 2, (nw - tw) // 2
        return x[..., top : top + th, left : left + tw]

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty(len(images), 3, *self.size, device=self.device, dtype=self.dtype)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(tuple(im.shape), []).append(i)
        for idx in by_shape.values():
            x = torch.stack([images[i] for i in idx]).to(self.device, non_blocking=True).float()
            x = self._resize_crop(x).clamp_(0, 255) / 255.0
            out[idx] = ((x - self.mean) / self.std).to(self.dtype)
        return out
