"""Caption metrics: BLEU-1..4, ROUGE-L, CIDEr (pycocoevalcap's scorers), METEOR when Java is on
PATH, and exact-match.

pycocoevalcap's PTBTokenizer runs a Java program; here captions are tokenised in Python instead
(lowercase, punctuation removed, split on whitespace) and the scorers are called directly, so
BLEU, ROUGE-L and CIDEr need no Java.

    metrics = score_captions({"1": "a red circle"}, {"1": ["a red circle", "a circle"]})
    metrics, preds = evaluate_model(model, records)      # greedy captions of the records' images
    print(format_table(metrics)); write_json(metrics, "metrics.json")
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
METRIC_ORDER = ("exact_match", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def normalize(text: str) -> str:
    """Lowercase, punctuation removed, single spaces: the form every metric compares."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def java_available() -> bool:
    return shutil.which("java") is not None


def score_captions(
    predictions: dict[str, str],  # id -> generated caption
    references: dict[str, Sequence[str]],  # id -> one or more reference captions
    meteor: bool | None = False,  # True: METEOR too (needs Java); None: when Java is on PATH
) -> dict[str, float]:
    """Corpus scores over the ids of `references` (each must have a prediction)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = set(references) - set(predictions)
    if missing:
        raise ValueError(
            f"{len(missing)} references have no prediction (e.g. {sorted(missing)[0]!r})"
        )
    if not references:
        raise ValueError("nothing to score: no references")
    gts = {k: [normalize(r) for r in refs] for k, refs in references.items()}
    res = {k: [normalize(predictions[k])] for k in references}
    out: dict[str, float] = {}
    out["exact_match"] = sum(res[k][0] in gts[k] for k in gts) / len(gts)
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length statistics
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"bleu_{n}"] = float(b)
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    if meteor is None:
        meteor = java_available()
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        out["meteor"] = float(Meteor().compute_score(gts, res)[0])
    out["n_images"] = len(gts)
    return out


def evaluate_model(
    model,  # CaptionModel
    records: Sequence,  # CaptionRecord / SyntheticExample / (image, caption-or-captions)
    batch_size: int = 64,
    num_beams: int = 1,
    read_bytes=None,  # object-store getter for image keys
    meteor: bool | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Caption each record's image and score against its references.

    Returns (metrics, rows) with rows = [{"image_id", "prediction", "references"}].
    """
    import torch

    from .datasets import load_image
    from .preprocess import Preprocessor
    from .tokenizer import CaptionTokenizer

    model.eval()
    tok = CaptionTokenizer(model.cfg.decoder_config.vocab_size)
    prep = Preprocessor.for_encoder(model.encoder)
    rows: list[dict[str, Any]] = []
    starts = range(0, len(records), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="captioning", unit="batch")
    for start in starts:
        chunk = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        pixels = torch.stack([prep(load_image(_image(r), read_bytes)) for r in chunk])
        with torch.no_grad():
            hyps = model.generate(pixels=pixels.to(model.device), num_beams=num_beams)
        for k, (r, h) in enumerate(zip(chunk, hyps, strict=True)):
            rows.append(
                {
                    "image_id": str(getattr(r, "image_id", start + k)),
                    "prediction": tok.decode(h[0].tokens),
                    "references": list(_refs(r)),
                }
            )
    preds = {str(i): row["prediction"] for i, row in enumerate(rows)}
    refs = {str(i): row["references"] for i, row in enumerate(rows)}
    return score_captions(preds, refs, meteor=meteor), rows


def _image(record: Any):
    return record[0] if isinstance(record, tuple) else record.image


def _refs(record: Any) -> tuple[str, ...]:
    if isinstance(record, tuple):
        return (record[1],) if isinstance(record[1], str) else tuple(record[1])
    return tuple(record.captions)


def format_table(metrics: dict[str, Any], title: str = "") -> str:
    """A two-column text table of the metrics, in the usual order."""
    keys = [k for k in METRIC_ORDER if k in metrics] + [
        k for k in metrics if k not in METRIC_ORDER and isinstance(metrics[k], (int, float))
    ]
    width = max(len(k) for k in keys)
    lines = [title] if title else []
    lines.append(f"{'metric':<{width}}  value")
    lines.append("-" * (width + 9))
    for k in keys:
        v = metrics[k]
        lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
