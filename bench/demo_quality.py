"""Train the demo model from scratch on the synthetic world (CPU) and measure it.

    python bench/demo_quality.py [--out var/models/demo] [--steps N] [--lr X] [--batch-size B]

Prints the training time, then exact-match, BLEU-4 and CIDEr on the held-out test split and on
the unseen-compositions split (colour-shape pairs no training image holds). Acceptance target
on a 2-core CPU: training <= 10 minutes and test exact-match >= 0.90.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from core_model.config import preset
from core_model.evaluate import evaluate_model
from core_model.synthetic import SyntheticWorld
from core_model.train import RECIPES, TrainConfig, run_training

TARGET_MINUTES = 10.0
TARGET_EXACT = 0.90


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="var/models/demo", help="final checkpoint directory")
    ap.add_argument("--steps", type=int, default=RECIPES["demo"]["max_steps"])
    ap.add_argument("--lr", type=float, default=RECIPES["demo"]["lr"])
    ap.add_argument("--batch-size", type=int, default=RECIPES["demo"]["batch_size"])
    ap.add_argument("--eval-size", type=int, default=1000, help="images per scored split")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    fields = {
        **RECIPES["demo"],
        "max_steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
    }
    cfg = TrainConfig(out_dir=args.out + ".run", progress=not args.no_progress, **fields)
    t0 = time.perf_counter()
    summary = run_training(preset("demo"), "synthetic", Path(args.out), cfg)
    train_s = time.perf_counter() - t0

    from core_model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(args.out)
    world = SyntheticWorld()
    rows = []
    for split in ("test", "unseen"):
        metrics, _ = evaluate_model(model, world.split(split, args.eval_size), meteor=False)
        rows.append((split, metrics))
    print()
    print(
        f"training: {summary['steps']} steps, batch {args.batch_size}, {train_s:.0f} s "
        f"({train_s / 60:.1f} min; target <= {TARGET_MINUTES:.0f} min)"
    )
    print(f"{'split':<8} {'exact':>7} {'BLEU-4':>7} {'CIDEr':>7}")
    for split, m in rows:
        print(f"{split:<8} {m['exact_match']:7.3f} {m['bleu_4']:7.3f} {m['cider']:7.3f}")
    test_exact = rows[0][1]["exact_match"]
    ok = train_s <= TARGET_MINUTES * 60 and test_exact >= TARGET_EXACT
    print(
        f"target {'MET' if ok else 'NOT MET'}: test exact-match {test_exact:.3f} (>= {TARGET_EXACT}), "
        f"training {train_s / 60:.1f} min (<= {TARGET_MINUTES:.0f})"
    )


if __name__ == "__main__":
    main()
