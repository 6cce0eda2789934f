"""The `captioner` command line. Heavy imports (torch) happen inside the commands that need them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="captioner")
def cli() -> None:
    """Caption image collections, review the captions, learn from the reviews."""


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    "-c",
    required=True,
    type=click.Path(path_type=Path),
    help="Checkpoint directory.",
)
@click.option("--beams", default=1, show_default=True, help="Beam width (1 = greedy).")
@click.option("--n-best", default=1, show_default=True, help="Candidates per image.")
@click.option(
    "--max-new-tokens", type=int, default=None, help="Caption length cap (default: the model's)."
)
@click.option("--sample", is_flag=True, help="Sample instead of searching (seeded).")
@click.option("--seed", default=0, show_default=True, help="Seed for --sample.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout.")
def caption(
    images, checkpoint, beams, n_best, max_new_tokens, sample, seed, batch_size, device, as_json
):
    """Caption IMAGES with the model in CHECKPOINT."""
    from tqdm import tqdm

    from core_model.checkpoint import CheckpointError
    from core_model.inference import DecodeOptions, ImageCaptioner

    try:
        captioner = ImageCaptioner.from_checkpoint(checkpoint, device=device, batch_size=batch_size)
    except (CheckpointError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    opts = DecodeOptions(
        num_beams=beams, n_best=n_best, max_new_tokens=max_new_tokens, do_sample=sample, seed=seed
    )
    with tqdm(
        total=len(images), desc="captioning", unit="img", disable=None, file=sys.stderr
    ) as bar:
        results = captioner.caption(list(images), opts, progress=bar)
    failed = 0
    for r in results:
        if r.error:
            failed += 1
            click.echo(f"error: {r.source}: {r.error}", err=True)
            if as_json:
                click.echo(json.dumps({"image": r.source, "error": r.error}))
            continue
        if as_json:
            cands = [{"text": c.text, "score": round(c.score, 5)} for c in r.candidates]
            click.echo(json.dumps({"image": r.source, "caption": r.text, "candidates": cands}))
        else:
            click.echo(f"{r.source}\t{r.text}\t{r.candidates[0].score:.3f}")
            for c in r.candidates[1:]:
                click.echo(f"\t{c.text}\t{c.score:.3f}")
    if failed:
        sys.exit(1)


@cli.command("init-model")
@click.option(
    "--preset", "preset_name", default="tiny", show_default=True, help="tiny, demo or base."
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write."
)
@click.option("--seed", default=0, show_default=True)
def init_model(preset_name, out, seed):
    """Write a freshly initialised (untrained) model checkpoint."""
    import torch

    from core_model.checkpoint import save_checkpoint
    from core_model.config import preset
    from core_model.model import CaptionModel

    try:
        cfg = preset(preset_name)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    torch.manual_seed(seed)
    model = CaptionModel(cfg)
    save_checkpoint(model, out, provenance={"trained": False, "preset": preset_name, "seed": seed})
    click.echo(f"wrote untrained {preset_name} model to {out}")


def _register() -> None:
    from captioner.cli.client import export, import_captions, submit, user
    from captioner.cli.db import db
    from captioner.cli.models import model, retrain_cmd
    from captioner.cli.run import run, serve
    from captioner.cli.train import eval_cmd, train_cmd
    from captioner.cli.worker import beat, worker

    cli.add_command(db)
    cli.add_command(worker)
    cli.add_command(beat)
    cli.add_command(submit)
    cli.add_command(export)
    cli.add_command(import_captions)
    cli.add_command(user)
    cli.add_command(model)
    cli.add_command(retrain_cmd)
    cli.add_command(train_cmd, name="train")
    cli.add_command(eval_cmd, name="eval")
    cli.add_command(run)
    cli.add_command(serve)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
