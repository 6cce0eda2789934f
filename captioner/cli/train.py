"""`captioner train` and `captioner eval` (registered in captioner/cli.py as train_cmd / eval_cmd).

Heavy imports (torch, the model) happen inside the commands. Bad input gives one readable line
on stderr and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__)


@click.command("train")
@click.option(
    "--preset",
    "preset_name",
    default="demo",
    show_default=True,
    type=click.Choice(["tiny", "demo", "base"]),
    help="Model configuration to train from scratch.",
)
@click.option(
    "--data",
    default="synthetic",
    show_default=True,
    help="synthetic | karpathy:PATH | jsonl:PATH | csv:PATH | folder:PATH",
)
@click.option(
    "--image-root",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder that relative image paths in --data are resolved against.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Final checkpoint directory [default: var/models/PRESET].",
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where best/, last/ and metrics.jsonl go [default: OUT.run].",
)
@click.option(
    "--init",
    type=click.Path(path_type=Path),
    default=None,
    help="Start from this checkpoint's weights (fine-tuning) instead of a fresh model.",
)
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last/ state.")
@click.option("--epochs", type=int, default=None, help="Passes over the training data.")
@click.option(
    "--steps", type=int, default=None, help="Optimizer steps in all (overrides --epochs)."
)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--warmup", type=int, default=None, help="Linear warmup steps.")
@click.option(
    "--freeze-encoder/--train-encoder",
    default=None,
    help="Override the preset's choice (a frozen encoder's features are cached).",
)
@click.option(
    "--workers", type=int, default=0, show_default=True, help="DataLoader worker processes."
)
@click.option("--device", default="", help="cpu, cuda, cuda:1 ... [default: cuda when available].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--train-size", type=int, default=None, help="Synthetic training images per epoch.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_cmd(
    preset_name,
    data,
    image_root,
    out,
    run_dir,
    init,
    resume,
    epochs,
    steps,
    batch_size,
    lr,
    warmup,
    freeze_encoder,
    workers,
    device,
    seed,
    train_size,
    no_progress,
):
    """Train a captioner (the demo model by default: synthetic data, CPU-sized)."""
    from core_model.checkpoint import CheckpointError
    from core_model.config import preset
    from core_model.datasets import DatasetError
    from core_model.train import RECIPES, TrainConfig, run_training

    out = out or Path("var/models") / preset_name
    run_dir = run_dir or out.with_name(out.name + ".run")
    fields = dict(RECIPES.get(preset_name, {}))
    overrides = dict(epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if steps is not None:
        fields["max_steps"] = steps
    elif epochs is not None:
        fields["max_steps"] = 0
    try:
        cfg = TrainConfig(
            out_dir=str(run_dir),
            num_workers=workers,
            device=device,
            seed=seed,
            progress=not no_progress,
            **fields,
        )
        model_cfg = preset(preset_name)
        if freeze_encoder is not None:
            model_cfg = model_cfg.replace(freeze_encoder=freeze_encoder)
        sizes = {"train": train_size} if train_size else None
        t0 = time.perf_counter()
        summary = run_training(
            model_cfg,
            data,
            out,
            cfg,
            init=init,
            resume=resume,
            image_root=image_root,
            synthetic_sizes=sizes,
        )
    except (DatasetError, CheckpointError, ValueError, FileNotFoundError) as e:
        raise _fail(e) from None
    best = summary.get("best") or {}
    click.echo(
        f"trained {summary['steps']} steps in {time.perf_counter() - t0:.0f} s; "
        f"best val: loss {best.get('val_loss', float('nan')):.4f}, "
        f"exact-match {best.get('exact_match', float('nan')):.3f}, "
        f"CIDEr {best.get('cider', float('nan')):.3f}"
    )
    click.echo(f"checkpoint: {out}")


@click.command("eval")
@click.option(
    "--checkpoint",
    "-c",
    required=True,
    type=click.Path(path_type=Path),
    help="Checkpoint directory.",
)
@click.option(
    "--split",
    default="test",
    show_default=True,
    help="Split of --data: train, val, test (synthetic also: unseen, concept).",
)
@click.option(
    "--data",
    default="synthetic",
    show_default=True,
    help="synthetic | karpathy:PATH | jsonl:PATH | csv:PATH | folder:PATH",
)
@click.option(
    "--references",
    type=click.Path(path_type=Path),
    default=None,
    help="JSONL of {image, caption|captions}: score on these images instead of --data.",
)
@click.option("--image-root", type=click.Path(path_type=Path), default=None)
@click.option("--limit", type=int, default=None, help="Score only the first N images.")
@click.option("--size", type=int, default=None, help="Synthetic split size [default: 1000].")
@click.option("--beams", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--meteor/--no-meteor",
    default=None,
    help="METEOR (needs Java) [default: when java is on PATH].",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Write metrics JSON here."
)
@click.option(
    "--predictions",
    type=click.Path(path_type=Path),
    default=None,
    help="Write one JSON line per image (prediction and references) here.",
)
@click.option("--device", default="", help="cpu, cuda ... [default: cuda when available].")
def eval_cmd(
    checkpoint,
    split,
    data,
    references,
    image_root,
    limit,
    size,
    beams,
    batch_size,
    meteor,
    out,
    predictions,
    device,
):
    """Score a checkpoint: exact-match, BLEU-1..4, ROUGE-L, CIDEr (and METEOR with Java)."""
    from core_model.checkpoint import CheckpointError, load_checkpoint
    from core_model.datasets import DatasetError, load_jsonl, load_records
    from core_model.evaluate import evaluate_model, format_table, write_json
    from core_model.inference import resolve_device
    from core_model.synthetic import SyntheticWorld, world_config_from_dict

    try:
        model, meta = load_checkpoint(checkpoint, resolve_device(device))
        if references is not None:
            records, source = (
                load_jsonl(references, split=None, image_root=image_root),
                str(references),
            )
        else:
            world = None
            if data == "synthetic" and meta.get("provenance", {}).get("world"):
                world = SyntheticWorld(world_config_from_dict(meta["provenance"]["world"]))
            sizes = {split: size} if size else None
            records = load_records(data, split, image_root, sizes, world)
            source = f"{data} {split}"
        if limit is not None:
            records = records[:limit]
        if len(records) == 0:
            raise click.ClickException(f"no images to score in {source}")
        metrics, rows = evaluate_model(
            model, records, batch_size=batch_size, num_beams=beams, meteor=meteor, progress=True
        )
    except (DatasetError, CheckpointError, ValueError, FileNotFoundError) as e:
        raise _fail(e) from None
    click.echo(format_table(metrics, title=f"{checkpoint} on {source}"))
    if out is not None:
        write_json({"checkpoint": str(checkpoint), "source": source, **metrics}, out)
        click.echo(f"wrote {out}")
    if predictions is not None:
        predictions.parent.mkdir(parents=True, exist_ok=True)
        predictions.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
