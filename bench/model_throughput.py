"""Model-alone captioning throughput: our batched greedy generation vs Hugging Face's
VisionEncoderDecoderModel.generate (ViT + GPT-2 with cross-attention), same sizes, random
weights, same batch size and the same number of new tokens, measured in one process.

    python bench/model_throughput.py                      # CPU: ViT-B/16 + GPT-2 small, batch 8
    python bench/model_throughput.py --device cuda        # bf16, batches 64, 256, 1024
    python bench/model_throughput.py --size tiny          # quick check with tiny models
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from core_model.config import ModelConfig, preset  # noqa: E402
from core_model.fastgen import FastGenerator  # noqa: E402
from core_model.model import CaptionModel  # noqa: E402

SIZES = {
    # ours, and the matching HF ViT / GPT-2 configs
    "base": dict(
        vit=dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            image_size=224,
            patch_size=16,
        ),
        gpt2=dict(n_layer=12, n_head=12, n_embd=768),
    ),
    "tiny": dict(
        vit=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=256,
            image_size=160,
            patch_size=16,
        ),
        gpt2=dict(n_layer=2, n_head=2, n_embd=32, n_positions=64),
    ),
}


def our_model(size: str) -> CaptionModel:
    cfg: ModelConfig = preset("base") if size == "base" else preset("tiny")
    return CaptionModel(cfg)


def hf_model(size: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTModel,
    )

    s = SIZES[size]
    enc = ViTModel(ViTConfig(**s["vit"]), add_pooling_layer=False)
    dec = GPT2LMHeadModel(GPT2Config(**s["gpt2"], add_cross_attention=True, is_decoder=True))
    model = VisionEncoderDecoderModel(encoder=enc, decoder=dec)
    model.config.decoder_start_token_id = 50256
    model.config.pad_token_id = 50256
    model.config.eos_token_id = 50256
    model.generation_config.decoder_start_token_id = 50256
    model.generation_config.pad_token_id = 50256
    model.generation_config.eos_token_id = 50256
    return model, s["vit"]["image_size"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="base", choices=sorted(SIZES))
    ap.add_argument(
        "--batch-sizes",
        default=None,
        help="comma-separated (default: 8 on CPU, 64,256,1024 on CUDA)",
    )
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--skip-hf-above", type=int, default=512, help="HF's baseline is skipped above this batch"
    )
    ap.add_argument(
        "--compile-encoder", action="store_true", help="torch.compile the encoder (CUDA)"
    )
    ap.add_argument(
        "--plain", action="store_true", help="also time our plain (eager, early-stopping) path"
    )
    ap.add_argument("--no-pipelined", action="store_true", help="skip the two-stream pipelined run")
    ap.add_argument(
        "--watchdog", type=float, default=0, help="dump stacks and exit after this many seconds"
    )
    args = ap.parse_args()

    if args.watchdog:
        import faulthandler

        faulthandler.dump_traceback_later(args.watchdog, exit=True)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    batches = [int(b) for b in (args.batch_sizes or ("64,256,1024" if cuda else "8")).split(",")]
    repeats = args.repeats or (3 if cuda else 2)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    ours = our_model(args.size).to(device=device, dtype=dtype).eval()
    fast = FastGenerator(ours, dtype=dtype, compile_encoder=args.compile_encoder)
    hf, img = hf_model(args.size)
    hf = hf.to(device=device, dtype=dtype).eval()
    res = ours.cfg.encoder_kwargs.get("img_size", 224 if args.size == "base" else 160)
    name = (
        torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"device: {name}, dtype {dtype}, size {args.size}, {args.new_tokens} new tokens, greedy")
    print(
        f"ours: {'CUDA-graph' if fast.use_cuda_graphs else 'eager'} fast path"
        f"{' + compiled encoder' if args.compile_encoder else ''}; baseline: HF VisionEncoderDecoderModel.generate"
    )
    print(
        "ours 1-stream: one batch at a time; ours pipelined: batch i+1 encodes while batch i decodes"
    )
    print(
        f"{'batch':>6} {'ours 1-stream':>14} {'ours pipelined':>15} {'HF VED img/s':>13} {'ratio':>7}"
        f" {'ours peak MiB':>14} {'HF peak MiB':>12}{'  plain img/s' if args.plain else ''}"
    )
    for B in batches:
        # several distinct inputs, so nothing is measured on one cached buffer
        inputs = [torch.randn(B, 3, res, res, device=device, dtype=dtype) for _ in range(4)]
        hf_pixels = torch.randn(B, 3, img, img, device=device, dtype=dtype)
        n_tok = args.new_tokens

        def run_ours(inputs=inputs, n_tok=n_tok):
            for px in inputs:
                state = fast.search(px, max_new_tokens=n_tok, min_new_tokens=n_tok)
            assert bool((state.length == n_tok).all())  # one sync, after the batches

        def run_pipelined(inputs=inputs, n_tok=n_tok):
            states = list(fast.search_many(inputs, max_new_tokens=n_tok, min_new_tokens=n_tok))
            assert all(bool((st.length == n_tok).all()) for st in states)

        def run_plain(px=inputs[0], n_tok=n_tok):
            out = ours.generate(px, max_new_tokens=n_tok, min_new_tokens=n_tok)
            assert all(len(h[0].tokens) == n_tok for h in out)

        def run_hf(px=hf_pixels, n_tok=n_tok):
            hf.generate(
                pixel_values=px,
                max_new_tokens=n_tok,
                min_new_tokens=n_tok,
                do_sample=False,
                num_beams=1,
            )

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        ips_seq = len(inputs) * B / timed(run_ours, device, repeats)
        peak_ours = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan")
        print(f"{B:>6} ours 1-stream {ips_seq:.1f} img/s, peak {peak_ours:.0f} MiB", flush=True)
        ips_pipe = float("nan")
        if not args.no_pipelined:
            try:
                ips_pipe = len(inputs) * B / timed(run_pipelined, device, repeats)
            except RuntimeError as e:  # report, and keep the other figures
                print(f"pipelined run failed at batch {B}: {e}")
        if B <= args.skip_hf_above:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            hf_ips = B / timed(run_hf, device, repeats)
            peak_hf = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan")
            ratio = max(ips_seq, ips_pipe if ips_pipe == ips_pipe else 0.0) / hf_ips
        else:
            hf_ips = ratio = peak_hf = float("nan")
        plain = f"{B / timed(run_plain, device, repeats):>13.1f}" if args.plain else ""
        print(
            f"{B:>6} {ips_seq:>14.1f} {ips_pipe:>15.1f} {hf_ips:>13.1f} {ratio:>7.2f}"
            f" {peak_ours:>14.0f} {peak_hf:>12.0f}{plain}",
            flush=True,
        )


if __name__ == "__main__":
    main()
