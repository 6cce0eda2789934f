"""core_model: the ViT-prefix-GPT-2 captioner (pure PyTorch + timm).

Names are imported lazily so `import core_model.imageops` stays torch-free.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "config",
    "preset": "config",
    "CaptionModel": "model",
    "Hypothesis": "model",
    "CaptionTokenizer": "tokenizer",
    "Preprocessor": "preprocess",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
    "from_pretrained": "pretrained",
    "PretrainedWeightsError": "pretrained",
    "ImageCaptioner": "inference",
    "DecodeOptions": "inference",
    "CaptionResult": "inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'core_model' has no attribute {name!r}")
