"""Which confidence ranks wrong captions first? Measured on the synthetic world, whose truth is known.

    python bench/confidence.py [--checkpoint var/models/demo] [--eval-size 1000] [--rows F.json]

Captions the synthetic test split and the unseen-composition split with the bulk decoding
(beam 3, n-best 3), labels each best caption wrong when it differs from the truth, and prints
the AUROC for "caption is wrong" of each candidate signal (rank formula; 1.0 ranks every wrong
caption before every right one, 0.5 is chance):

    mean log-prob          the old score (length-normalised mean)
    mean log-prob, shown   the same to 3 decimals, as pages showed it (ties rank at random)
    min token prob         the least likely token of the caption
    token margin           the least log-prob lead of a chosen token over the best other one
    n-best margin          the best caption's mean log-prob minus the runner-up caption's
    length                 fewer tokens, fewer chances to be wrong
    mix (fit on half)      the calibrated logistic mix, fitted on one half, measured on the other
    default calibration    core_model.confidence.DEFAULT_CALIBRATION, as the workers use it

for the test split, the unseen compositions and both, then calibration (mean confidence against
accuracy per bin) and the coefficients fitted on every caption (stored as DEFAULT_CALIBRATION)
and on the test split alone. The checkpoint is trained first (the demo
recipe, as bench/demo_quality.py) when it does not exist; `--rows` keeps the captioned rows so
a second run only refits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core_model.confidence import (  # noqa: E402
    DEFAULT_CALIBRATION,
    Calibration,
    Signals,
    auroc,
    fit_calibration,
)

BINS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
TARGET_AUROC = 0.9


def train_if_missing(checkpoint: Path, steps: int | None) -> None:
    if (checkpoint / "config.json").exists():
        return
    from core_model.config import preset
    from core_model.train import RECIPES, TrainConfig, run_training

    recipe = {**RECIPES["demo"], **({"max_steps": steps} if steps else {})}
    print(f"training the demo model ({recipe['max_steps']} steps) into {checkpoint}", flush=True)
    t0 = time.perf_counter()
    cfg = TrainConfig(out_dir=str(checkpoint) + ".run", progress=False, **recipe)
    run_training(preset("demo"), "synthetic", checkpoint, cfg)
    print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)


def caption_rows(checkpoint: Path, eval_size: int, batch: int) -> list[dict]:
    """One row per image: the best caption's signals, the runner-up's score, right or wrong."""
    from core_model.evaluate import normalize
    from core_model.inference import DecodeOptions, ImageCaptioner
    from core_model.synthetic import SyntheticWorld

    captioner = ImageCaptioner.from_checkpoint(checkpoint, device="cpu", batch_size=batch)
    options = DecodeOptions(num_beams=3, n_best=3)
    world = SyntheticWorld()
    rows: list[dict] = []
    for split in ("test", "unseen"):
        examples = world.split(split, eval_size)
        t0 = time.perf_counter()
        for start in range(0, len(examples), batch):
            chunk = [examples[i] for i in range(start, min(start + batch, len(examples)))]
            results = captioner.caption([ex.image for ex in chunk], options)
            for ex, res in zip(chunk, results, strict=True):
                best = res.candidates[0]
                truth = {normalize(c) for c in ex.captions}
                rows.append(
                    {
                        "split": split,
                        "text": best.text,
                        "truth": ex.caption,
                        "wrong": normalize(best.text) not in truth,
                        "mean_logprob": best.score,
                        "min_token_logprob": best.min_token_logprob,
                        "min_token_margin": best.min_token_margin,
                        "tokens": best.tokens,
                        "runner_up": res.candidates[1].score if len(res.candidates) > 1 else None,
                    }
                )
        print(f"captioned {split}: {len(examples)} images, {time.perf_counter() - t0:.0f} s")
    return rows


def signals(row: dict) -> Signals:
    return Signals(
        row["mean_logprob"], row["min_token_logprob"], row["min_token_margin"], row["tokens"]
    )


def nbest_margin(row: dict) -> float:
    return row["mean_logprob"] - row["runner_up"] if row["runner_up"] is not None else 50.0


# Each candidate signal: larger = more confident (AUROC for "wrong" ranks by its negation).
CANDIDATES = {
    "mean log-prob": lambda r: r["mean_logprob"],
    "mean log-prob, shown (3 dp)": lambda r: round(r["mean_logprob"], 3),
    "min token prob": lambda r: math.exp(r["min_token_logprob"]),
    "token margin": lambda r: r["min_token_margin"],
    "n-best margin": nbest_margin,
    "length (shorter)": lambda r: -r["tokens"],
}


def wrong_auroc(rows: list[dict], confidence) -> float:
    return auroc([-confidence(r) for r in rows], [r["wrong"] for r in rows])


def calibration_table(rows: list[dict], calibration: Calibration) -> list[str]:
    conf = [calibration.confidence(signals(r)) for r in rows]
    lines = [f"{'confidence':<12} {'captions':>8} {'mean conf':>9} {'accuracy':>8}"]
    ece = 0.0
    for lo, hi in zip(BINS, BINS[1:], strict=False):
        idx = [i for i, c in enumerate(conf) if lo <= c < hi or (hi == 1.0 and c == 1.0)]
        if not idx:
            continue
        mean_c = sum(conf[i] for i in idx) / len(idx)
        acc = sum(not rows[i]["wrong"] for i in idx) / len(idx)
        ece += len(idx) / len(rows) * abs(mean_c - acc)
        lines.append(f"[{lo:.2f}, {hi:.2f}) {len(idx):>8} {mean_c:>9.3f} {acc:>8.3f}")
    lines.append(f"expected calibration error: {ece:.3f}")
    return lines


def report(rows: list[dict]) -> None:
    n_wrong = sum(r["wrong"] for r in rows)
    flat = [r for r in rows if round(r["mean_logprob"], 3) == 0.0]
    print(
        f"\n{len(rows)} captions, {n_wrong} wrong ({n_wrong / len(rows):.1%}); "
        f"{len(flat)} show a mean log-prob of -0.000, {sum(r['wrong'] for r in flat)} of them wrong"
    )
    for split in ("test", "unseen"):
        part = [r for r in rows if r["split"] == split]
        print(f"  {split}: {len(part)} captions, {sum(r['wrong'] for r in part)} wrong")
    test = [r for r in rows if r["split"] == "test"]
    fit_half, measure_half = rows[0::2], rows[1::2]  # interleaved: both splits in each half
    mix = fit_calibration([signals(r) for r in fit_half], [r["wrong"] for r in fit_half])
    lean = fit_calibration(
        [signals(r) for r in fit_half],
        [r["wrong"] for r in fit_half],
        use=("min_token_logit", "min_token_margin"),
    )
    parts = {
        "test": [r for r in measure_half if r["split"] == "test"],
        "unseen": [r for r in measure_half if r["split"] == "unseen"],
        "both": measure_half,
    }
    print(f"\nAUROC for 'caption is wrong' on the measuring half ({len(measure_half)} captions)")
    print(f"{'signal':<34} " + " ".join(f"{name:>7}" for name in parts))
    table = dict(CANDIDATES)
    table["mix, all features (fit on half)"] = lambda r: mix.confidence(signals(r))
    table["mix, min token + margin (half)"] = lambda r: lean.confidence(signals(r))
    table["default calibration"] = lambda r: DEFAULT_CALIBRATION.confidence(signals(r))
    for name, fn in table.items():
        print(f"{name:<34} " + " ".join(f"{wrong_auroc(p, fn):7.3f}" for p in parts.values()))
    for name, part in parts.items():
        value = wrong_auroc(part, lambda r: mix.confidence(signals(r)))
        verdict = "MET" if value >= TARGET_AUROC else "NOT MET"
        print(f"target {verdict} on {name}: mix AUROC {value:.3f} (>= {TARGET_AUROC})")
    for name, part in parts.items():
        print(f"\ncalibration of the half-fitted mix on the measuring half, {name}")
        print("\n".join(calibration_table(part, mix)))
    print("\ncalibration of the default calibration on every caption")
    print("\n".join(calibration_table(rows, DEFAULT_CALIBRATION)))
    for name, part in (("every caption (DEFAULT_CALIBRATION)", rows), ("the test split", test)):
        fitted = fit_calibration([signals(r) for r in part], [r["wrong"] for r in part])
        print(f"\nfitted on {name}:")
        print(
            json.dumps(
                {k: round(v, 4) for k, v in fitted.weights.items()}
                | {"bias": round(fitted.bias, 4)}
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="var/models/demo", help="trained here if missing")
    ap.add_argument("--steps", type=int, default=None, help="training steps if it is trained")
    ap.add_argument("--eval-size", type=int, default=1000, help="images per split")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--rows", default=None, help="JSON of captioned rows: read if it exists")
    args = ap.parse_args()
    rows_path = Path(args.rows) if args.rows else None
    if rows_path is not None and rows_path.exists():
        rows = json.loads(rows_path.read_text())
    else:
        checkpoint = Path(args.checkpoint)
        train_if_missing(checkpoint, args.steps)
        rows = caption_rows(checkpoint, args.eval_size, args.batch_size)
        if rows_path is not None:
            rows_path.write_text(json.dumps(rows))
    report(rows)


if __name__ == "__main__":
    main()
