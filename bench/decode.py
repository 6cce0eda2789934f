"""The worker's CPU decode + resize of JPEGs, with and without Pillow's `draft` (the JPEG decoded
at 1/2, 1/4 or 1/8 scale in the DCT when the model's input is much smaller), in one process:

    python bench/decode.py                   # 640x480 and 4000x3000 JPEGs, model input 224
    python bench/decode.py --sizes 1600x1200 --count 50 --input 384

Each image goes through `workers.pixels.decode_on_cpu` with the split preprocess of a timm eval
transform (resize the shorter side, centre crop), exactly as a caption batch's fetch threads do;
"without draft" is the same call with the model's input size withheld. One thread: img/s per core.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour fields and soft shapes drawn small, scaled up, grain."""
    rng = np.random.default_rng(seed)
    small_w, small_h = max(width // 8, 8), max(height // 8, 8)
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    arr = np.stack(
        [
            x / small_w * 200 + rng.uniform(0, 50),
            y / small_h * 180 + rng.uniform(0, 70),
            (np.sin(x / small_w * 9) + np.cos(y / small_h * 7)) * 50 + 120,
        ],
        axis=-1,
    )
    for _ in range(8):
        cx, cy = rng.uniform(0, small_w), rng.uniform(0, small_h)
        r = rng.uniform(0.05, 0.25) * small_w
        inside = np.clip(r - np.hypot(x - cx, y - cy), 0, 1)[..., None]
        arr = arr * (1 - inside) + rng.uniform(0, 255, 3) * inside
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((width, height))
    grain = rng.normal(0, 4, (height, width, 1)).astype(np.float32)
    full = np.clip(np.asarray(im, np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(full).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def split_for(input_size: int):
    """The worker's per-image step for a ViT eval transform at `input_size` (crop_pct 1.0)."""
    from core_model.preprocess import Preprocessor
    from workers.pixels import split_preprocess

    cfg = {
        "input_size": (3, input_size, input_size),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    return split_preprocess(Preprocessor(cfg))


def rate(datas: list[bytes], split, rounds: int) -> tuple[float, np.ndarray]:
    """Images per second through `decode_on_cpu`, and the last image's 8-bit pixels."""
    from captioner.settings import Settings
    from workers.pixels import decode_on_cpu

    settings = Settings()
    last = None
    started = time.perf_counter()
    for _ in range(rounds):
        for data in datas:
            prepared = decode_on_cpu(data, settings, split)
            assert prepared.reason is None, prepared.reason
            last = prepared.pixels
    return rounds * len(datas) / (time.perf_counter() - started), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="640x480,4000x3000", help="WxH,WxH,...")
    parser.add_argument("--count", type=int, default=0, help="images per size (default: by size)")
    parser.add_argument("--input", type=int, default=224, help="the model's input side")
    parser.add_argument("--rounds", type=int, default=2, help="passes over each set, each side")
    args = parser.parse_args()

    drafted = split_for(args.input)
    full = dataclasses.replace(drafted, input_size=None)
    print(f"model input {args.input}x{args.input}, one thread, {args.rounds} rounds per side")
    for spec in args.sizes.split(","):
        width, height = (int(v) for v in spec.split("x"))
        count = args.count or max(4, min(100, 30_000_000 // (width * height)))
        datas = [photo_jpeg(width, height, seed) for seed in range(count)]
        rate(datas[:2], full, 1)  # warm-up: imports, allocator
        without, px_full = rate(datas, full, args.rounds)
        with_draft, px_draft = rate(datas, drafted, args.rounds)
        diff = np.abs(px_full.astype(np.int16) - px_draft.astype(np.int16)).mean()
        print(
            f"{width}x{height} ({count} JPEGs, {sum(map(len, datas)) / count / 1e3:.0f} KB each): "
            f"full decode {without:.1f} img/s, draft {with_draft:.1f} img/s, "
            f"ratio {with_draft / without:.2f}x; mean |diff| of the caption input "
            f"{diff:.2f}/255"
        )


if __name__ == "__main__":
    main()
