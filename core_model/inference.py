"""One object that loads a checkpoint once and captions images in batches."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import load_checkpoint
from .confidence import Calibration, Signals
from .preprocess import Preprocessor, open_image
from .tokenizer import CaptionTokenizer


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device a model runs on: 'auto' (or "") is the first CUDA device when there is
    one, else the CPU; any other name ('cpu', 'cuda:1', 'mps') is that device.

    Apple's MPS is used only when asked for by name: 'auto' never picks it on any machine, so a
    CUDA machine that also reports MPS still gets CUDA.
    """
    if str(device) in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


@dataclass
class Candidate:
    text: str
    score: float  # mean log-probability per token: higher is more confident, 0 is the maximum
    confidence: float = float("nan")  # probability in [0, 1] that the text is right
    min_token_logprob: float = 0.0  # the least likely token's log-probability
    min_token_margin: float = float("inf")  # least log-prob lead of a token over its runner-up
    tokens: int = 0  # generated tokens, EOS excluded


@dataclass
class CaptionResult:
    source: str  # the path, or "image[i]" for in-memory images
    candidates: list[Candidate] = field(default_factory=list)  # best first
    error: str | None = None  # why this image could not be captioned

    @property
    def text(self) -> str | None:
        return self.candidates[0].text if self.candidates else None


@dataclass
class DecodeOptions:
    num_beams: int = 1
    n_best: int = 1
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


def max_batch_for_memory(
    model,
    free_bytes: int,
    max_new_tokens: int,
    num_beams: int = 1,
    dtype_bytes: int = 2,
    headroom: float = 0.5,
) -> int:
    """Largest batch whose KV cache and activations fit in `headroom` of `free_bytes`.

    Per image: the decoder's KV cache (2 x layers x (prefix + new tokens) x width x beams),
    the vocabulary-sized logits of each row (float32, a few live copies), and the encoder's
    activations (tokens x width x depth-independent working set, about 24 live tensors).
    """
    cfg = model.cfg
    dec = cfg.decoder_config
    T = cfg.n_prefix_tokens + max_new_tokens
    kv = 2 * dec.n_layer * T * dec.n_embd * dtype_bytes * num_beams
    logits = 4 * dec.vocab_size * 4 * num_beams
    enc = model.encoder
    n_tokens = getattr(getattr(enc, "patch_embed", None), "num_patches", 196) + 1
    acts = 24 * n_tokens * enc.num_features * dtype_bytes
    per_image = kv + logits + acts
    return max(1, int(free_bytes * headroom) // per_image)


class ImageCaptioner:
    """Loads a checkpoint (or takes a built model) and captions lists of images or paths.

    On CUDA, greedy and beam decoding go through `FastGenerator` (bf16, CUDA graphs): batches
    are padded to `batch_size` so one captured graph serves every batch of a run.
    """

    def __init__(
        self,
        model,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        meta=None,
        fast: bool | None = None,
    ):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta or {}
        self.batch_size = batch_size
        self.preprocess = Preprocessor.for_encoder(model.encoder)
        self.tokenizer = CaptionTokenizer(model.cfg.decoder_config.vocab_size)
        self.calibration = Calibration.from_meta(self.meta)  # signals -> confidence
        self.fast = None
        if fast or (fast is None and self.device.type == "cuda"):
            from .fastgen import FastGenerator

            self.fast = FastGenerator(self.model)
        if self.device.type == "cuda":  # no more per batch than free GPU memory holds
            free, _ = torch.cuda.mem_get_info(self.device)
            fit = max_batch_for_memory(self.model, free, self.model.cfg.max_caption_tokens)
            self.batch_size = max(1, min(batch_size, fit))

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        fast: bool | None = None,
    ):
        model, meta = load_checkpoint(path, device="cpu")
        return cls(model, device=device, batch_size=batch_size, meta=meta, fast=fast)

    @functools.cached_property
    def tensor_preprocessor(self):
        """Device-side resize + normalise for images decoded on the device (same data config);
        built once, on first use."""
        from .tensor_preprocess import TensorPreprocessor

        return TensorPreprocessor(self.preprocess.cfg, self.device)

    def caption(
        self,
        images: Sequence[Image.Image | str | Path],
        options: DecodeOptions | None = None,
        progress: Iterable | None = None,
    ) -> list[CaptionResult]:
        """Caption every image; an unreadable one gets `error` set and the rest go on."""
        opts = options or DecodeOptions()
        results: list[CaptionResult] = []
        tensors: list[tuple[int, torch.Tensor]] = []
        for i, item in enumerate(images):
            source = str(item) if isinstance(item, (str, Path)) else f"image[{i}]"
            results.append(CaptionResult(source))
            try:
                im = open_image(item) if isinstance(item, (str, Path)) else item
                tensors.append((i, self.preprocess(im)))
            except FileNotFoundError:
                results[i].error = "file not found"
            except UnidentifiedImageError:
                results[i].error = "not a readable image"
            except (OSError, ValueError) as e:
                results[i].error = f"cannot decode image: {e}"
        for start in range(0, len(tensors), self.batch_size):
            chunk = tensors[start : start + self.batch_size]
            pixels = torch.stack([t for _, t in chunk]).to(self.device)
            for (i, _), hyps in zip(chunk, self.caption_tensors(pixels, opts), strict=False):
                results[i].candidates = hyps
            if progress is not None:
                progress.update(len(chunk))  # type: ignore[attr-defined]
        return results

    @torch.no_grad()
    def caption_tensors(
        self, pixels: torch.Tensor, options: DecodeOptions | None = None
    ) -> list[list[Candidate]]:
        """Preprocessed pixels (B, 3, H, W) -> candidates per image, best first."""
        o = options or DecodeOptions()
        if self.fast is not None and not o.do_sample:
            return self._decode_hyps(self._fast_generate(pixels, o))
        dtype = next(self.model.parameters()).dtype
        hyps = self.model.generate(
            pixels.to(self.device, dtype),
            num_beams=o.num_beams,
            n_best=o.n_best,
            max_new_tokens=o.max_new_tokens,
            do_sample=o.do_sample,
            temperature=o.temperature,
            top_k=o.top_k,
            top_p=o.top_p,
            seed=o.seed,
        )
        return self._decode_hyps(hyps)

    def _fast_generate(self, pixels: torch.Tensor, o: DecodeOptions) -> list:
        """Fixed-shape chunks of batch_size (the last one padded), so graphs are reused."""
        out: list = []
        bs = self.batch_size
        for start in range(0, len(pixels), bs):
            chunk = pixels[start : start + bs]
            n = len(chunk)
            if n < bs:
                pad = chunk[-1:].expand(bs - n, *chunk.shape[1:])
                chunk = torch.cat([chunk, pad])
            hyps = self.fast.generate(
                chunk, num_beams=o.num_beams, n_best=o.n_best, max_new_tokens=o.max_new_tokens
            )
            out.extend(hyps[:n])
        return out

    def _decode_hyps(self, hyps: list) -> list[list[Candidate]]:
        out = []
        for per_image in hyps:
            cands, seen = [], set()
            for h in per_image:
                text = self.tokenizer.decode(h.tokens)
                if text not in seen:  # two token sequences can spell the same text
                    seen.add(text)
                    signals = Signals.of(h)
                    cands.append(
                        Candidate(
                            text,
                            h.score,
                            self.calibration.confidence(signals),
                            h.min_token_logprob,
                            h.min_token_margin,
                            len(h.tokens),
                        )
                    )
            out.append(cands)
        return out
