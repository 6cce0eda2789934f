"""Can the image side flag what the decoder is sure of? Candidates beyond the decoder's signals.

    python bench/confidence.py --checkpoint C --rows rows.json     # first: captions + truth
    python bench/confidence_probes.py --checkpoint C --rows rows.json [--train 4000]

The demo model is confidently wrong on colour-shape pairs it never saw ("a small blue square"
for a blue circle, every token above p = 0.99), so no signal of the decoder ranks those captions
first (bench/confidence.py). This bench measures, on the same captions (`--rows`, the test
split then the unseen compositions, in bench/confidence.py's order), signals taken from the
image features instead, each on three feature levels of the model (the conv stem's tokens, the
encoder's tokens, the prefix GPT-2 reads; pooled by mean and max over tokens):

    word support    a per-word presence probe (one logistic regression per frequent caption word,
                    fitted on `--train` training images): the least probe logit among the
                    caption's words
    word coverage   minus the largest probe logit among probed words the caption leaves out
    mahalanobis     distance of the image's features from the training images' (one Gaussian):
                    a novel-looking image ranks first
    knn cosine      mean cosine distance to the 10 nearest training images

and prints the AUROC for "caption is wrong" of each (test / unseen / both), beside the decoder's
calibrated confidence. Nothing here is used by the workers: it records what was tried.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core_model.confidence import DEFAULT_CALIBRATION, Signals, auroc  # noqa: E402

WORD = re.compile(r"[a-z]+")
MIN_COUNT = 20  # a probed word is in at least this many training images and absent from as many


def features(captioner, examples) -> dict[str, torch.Tensor]:
    """Pooled (mean, max over tokens) features of each level, (N, 2D) each."""
    model = captioner.model
    out: dict[str, list[torch.Tensor]] = {"stem": [], "encoder": [], "prefix": []}
    with torch.no_grad():
        for start in range(0, len(examples), 200):
            chunk = [examples[i].image for i in range(start, min(start + 200, len(examples)))]
            pixels = torch.stack([captioner.preprocess(im) for im in chunk])
            tokens = model.encode(pixels)
            levels = {
                "stem": model.encoder.patch_embed(pixels),
                "encoder": tokens,
                "prefix": model.prefix(tokens),
            }
            for name, t in levels.items():
                out[name].append(torch.cat([t.mean(1), t.amax(1)], dim=1))
    return {k: torch.cat(v) for k, v in out.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3):
    """Logistic regressions of y (N, W) on standardised x (N, D); returns x -> logits."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
        loss = loss + l2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lambda q: ((q - mean) / std) @ w.detach() + b.detach()


def word_scores(logits: torch.Tensor, words: list[str], texts: list[str]):
    support, coverage = [], []
    for row, text in zip(logits.clamp(-16, 16).tolist(), texts, strict=True):
        said = set(WORD.findall(text.lower()))
        inside = [v for v, w in zip(row, words, strict=True) if w in said]
        outside = [v for v, w in zip(row, words, strict=True) if w not in said]
        support.append(min(inside) if inside else 0.0)
        coverage.append(-max(outside) if outside else 0.0)
    return support, coverage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--rows", required=True, help="bench/confidence.py --rows output")
    ap.add_argument("--train", type=int, default=4000, help="training images for the fits")
    args = ap.parse_args()

    from core_model.inference import ImageCaptioner
    from core_model.synthetic import SyntheticWorld

    torch.set_grad_enabled(False)
    rows = json.loads(Path(args.rows).read_text())
    n_test = sum(r["split"] == "test" for r in rows)
    n_unseen = len(rows) - n_test
    captioner = ImageCaptioner.from_checkpoint(args.checkpoint, device="cpu")
    world = SyntheticWorld()
    t0 = time.perf_counter()
    train = world.split("train", args.train)
    f_train = features(captioner, train)
    f_eval = {
        k: torch.cat([a, b])
        for (k, a), b in zip(
            features(captioner, world.split("test", n_test)).items(),
            features(captioner, world.split("unseen", n_unseen)).values(),
            strict=True,
        )
    }
    print(f"features of {args.train} + {len(rows)} images: {time.perf_counter() - t0:.0f} s")

    train_words = [set(WORD.findall(train[i].caption.lower())) for i in range(len(train))]
    df = Counter(w for ws in train_words for w in ws)
    words = sorted(w for w, k in df.items() if k >= MIN_COUNT and len(train) - k >= MIN_COUNT)
    y = torch.tensor([[float(w in ws) for w in words] for ws in train_words])
    print(f"probed words ({len(words)}): {' '.join(words)}")

    wrong = [r["wrong"] for r in rows]
    texts = [r["text"] for r in rows]
    parts = {"test": slice(0, n_test), "unseen": slice(n_test, len(rows)), "both": slice(None)}

    def line(name: str, confidence: list[float]) -> None:
        cells = [auroc([-c for c in confidence[s]], wrong[s]) for s in parts.values()]
        print(f"{name:<30} " + " ".join(f"{v:7.3f}" for v in cells))

    print(f"\nAUROC for 'caption is wrong' ({n_test} test, {n_unseen} unseen captions)")
    print(f"{'signal':<30} " + " ".join(f"{name:>7}" for name in parts))
    decoder = [
        DEFAULT_CALIBRATION.confidence(
            Signals(r["mean_logprob"], r["min_token_logprob"], r["min_token_margin"], r["tokens"])
        )
        for r in rows
    ]
    line("decoder (DEFAULT_CALIBRATION)", decoder)
    for level in f_train:
        x, q = f_train[level], f_eval[level]
        probe = fit_probe(x, y)
        support, coverage = word_scores(probe(q), words, texts)
        line(f"{level}: word support", support)
        line(f"{level}: word coverage", coverage)
        mean = x.mean(0)
        precision = torch.linalg.inv(torch.cov((x - mean).T) + 1e-3 * torch.eye(x.shape[1]))
        d = q - mean
        line(f"{level}: mahalanobis", (-((d @ precision) * d).sum(1)).tolist())
        xn = torch.nn.functional.normalize(x - mean, dim=1)
        qn = torch.nn.functional.normalize(d, dim=1)
        line(f"{level}: knn cosine", (qn @ xn.T).topk(10, dim=1).values.mean(1).tolist())


if __name__ == "__main__":
    main()
