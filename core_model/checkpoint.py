"""Checkpoints: a directory holding `model.safetensors` and `config.json`. Never a pickle.

config.json carries the ModelConfig, the tokenizer id, the format version, the SHA-256 of the
weights file and free-form training provenance. Saving writes a temporary sibling directory and
renames it into place, so a reader sees the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "checkpoint.pt")


class CheckpointError(Exception):
    """A checkpoint that cannot be used, with a reason a person can act on."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(model, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write `model` (a CaptionModel) to directory `path` atomically. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {
            "format_version": FORMAT_VERSION,
            "model_config": model.cfg.to_dict(),
            "tokenizer": {
                "name": model.cfg.tokenizer,
                "vocab_size": model.cfg.decoder_config.vocab_size,
            },
            "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
            "provenance": provenance or {},
        }
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / WEIGHTS_FILE, "rb+") as f:
            os.fsync(f.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, validated; CheckpointError otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is a file; a checkpoint is a directory with {WEIGHTS_FILE} and {CONFIG_FILE}"
        )
    if not (path / WEIGHTS_FILE).exists():
        pickles = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickles:
            raise CheckpointError(
                f"checkpoint {path} holds a pickle ({pickles[0]}); pickles are never loaded, "
                f"convert it to {WEIGHTS_FILE}"
            )
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS_FILE}")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_FILE}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} is not valid JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the CaptionModel saved at `path` (eval mode). Returns (model, meta)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import CaptionModel

    path = Path(path)
    meta = read_meta(path)
    digest = _sha256(path / WEIGHTS_FILE)
    if digest != meta.get("weights_sha256"):
        raise CheckpointError(
            f"checkpoint {path}: {WEIGHTS_FILE} does not match the digest in {CONFIG_FILE} "
            "(tampered or partially written)"
        )
    try:
        cfg = ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: invalid model_config ({e})") from None
    try:
        state = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {WEIGHTS_FILE} ({e})") from None
    model = CaptionModel(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit the config ({first})"
        ) from None
    return model.to(device).eval(), meta
