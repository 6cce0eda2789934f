"""One object that loads a checkpoint once and captions images in batches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import load_checkpoint
from .preprocess import Preprocessor, open_image
from .tokenizer import CaptionTokenizer


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> the first CUDA device when there is one, else the CPU.

    Apple's MPS is used only when asked for by name: 'auto' never picks it on any machine.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


@dataclass
class Candidate:
    text: str
    score: float  # mean log-probability per token: higher is more confident, 0 is the maximum


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


class ImageCaptioner:
    """Loads a checkpoint (or takes a built model) and captions lists of images or paths."""

    def __init__(self, model, device: str | torch.device = "auto", batch_size: int = 32, meta=None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta or {}
        self.batch_size = batch_size
        self.preprocess = Preprocessor.for_encoder(model.encoder)
        self.tokenizer = CaptionTokenizer(model.cfg.decoder_config.vocab_size)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", batch_size: int = 32):
        model, meta = load_checkpoint(path, device="cpu")
        return cls(model, device=device, batch_size=batch_size, meta=meta)

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
            for (i, _), hyps in zip(chunk, self.caption_tensors(pixels, opts)):
                results[i].candidates = hyps
            if progress is not None:
                progress.update(len(chunk))  # type: ignore[attr-defined]
        return results

    @torch.no_grad()
    def caption_tensors(self, pixels: torch.Tensor, options: DecodeOptions | None = None) -> list[list[Candidate]]:
        """Preprocessed pixels (B, 3, H, W) -> candidates per image, best first."""
        o = options or DecodeOptions()
        hyps = self.model.generate(
            pixels,
            num_beams=o.num_beams,
            n_best=o.n_best,
            max_new_tokens=o.max_new_tokens,
            do_sample=o.do_sample,
            temperature=o.temperature,
            top_k=o.top_k,
            top_p=o.top_p,
            seed=o.seed,
        )
        out = []
        for per_image in hyps:
            cands, seen = [], set()
            for h in per_image:
                text = self.tokenizer.decode(h.tokens)
                if text not in seen:  # two token sequences can spell the same text
                    seen.add(text)
                    cands.append(Candidate(text, h.score))
            out.append(cands)
        return out
