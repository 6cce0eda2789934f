"""Device-side JPEG decoding and preprocessing agree with the PIL/timm path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from core_model.preprocess import Preprocessor, data_config
from core_model.tensor_preprocess import TensorPreprocessor, decode_jpegs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = rng.integers(0, 255, 3)
    arr[h // 4 : h // 2, w // 3 : w // 2] = rng.integers(0, 255, 3)  # a block to locate
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoder():
    return timm.create_model("test_vit", pretrained=False, num_classes=0)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_pil_path(encoder, device):
    datas = [jpeg(320, 240, 1), jpeg(320, 240, 2), jpeg(200, 300, 3), jpeg(160, 160, 4)]
    pil = Preprocessor.for_encoder(encoder).batch([Image.open(io.BytesIO(d)) for d in datas])
    decoded = decode_jpegs(datas, device)
    assert all(d is not None and d.dtype == torch.uint8 for d in decoded)
    ours = TensorPreprocessor(data_config(encoder), device)(decoded).cpu()
    assert ours.shape == pil.shape == (4, 3, 160, 160)
    # resampling kernels differ slightly between PIL and torch: compare closely, not exactly
    assert (ours - pil).abs().mean() < 0.02
    assert (ours - pil).abs().max() < 0.6


@pytest.mark.parametrize("device", DEVICES)
def test_a_bad_jpeg_fails_alone(device):
    good = jpeg(64, 48, 5)
    out = decode_jpegs([good, good[: len(good) // 3] + b"\x00" * 10, b"not a jpeg", good], device)
    assert out[0] is not None and out[3] is not None
    assert out[2] is None
    assert tuple(out[0].shape) == (3, 48, 64)
