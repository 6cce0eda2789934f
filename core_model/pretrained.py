"""Build a CaptionModel from pretrained timm and GPT-2 weights.

Where weights come from, in order:
  1. `weights_dir`, when given: plain folders (`DIR/<encoder_name>/model.safetensors`,
     `DIR/<decoder>/config.json + model.safetensors`) or a Hugging Face cache laid out under DIR
     (`models--timm--<hub id>/snapshots/*/`, `models--<org>--<name>/snapshots/*/`).
  2. the model hub, when online (HF_HUB_OFFLINE unset).
  3. otherwise a `PretrainedWeightsError` naming what is missing and how to provide it.
Only safetensors files are read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import GPT2_SIZES, DecoderConfig, ModelConfig
from .model import CaptionModel, build_encoder

# GPT-2 size names -> repository ids on the hub (the original OpenAI checkpoints).
GPT2_HUB_IDS = {name: f"openai-community/{name}" for name in GPT2_SIZES}
HOW_TO = (
    "pass --weights-dir DIR holding {what} (a plain folder or a Hugging Face cache), "
    "or run where the model hub is reachable"
)


class PretrainedWeightsError(Exception):
    """Pretrained weights that could not be found or read."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _cache_snapshots(root: Path, repo_id: str) -> list[Path]:
    folder = root / ("models--" + repo_id.replace("/", "--"))
    return sorted((folder / "snapshots").glob("*")) if folder.exists() else []


def find_encoder_file(encoder_name: str, weights_dir: str | Path) -> Path | None:
    """model.safetensors for a timm encoder under weights_dir, plain or HF-cache layout."""
    import timm

    root = Path(weights_dir)
    candidates = [
        root / encoder_name / "model.safetensors",
        root / encoder_name.split(".")[0] / "model.safetensors",
    ]
    cfg = timm.models.get_pretrained_cfg(encoder_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id:
        candidates += [s / "model.safetensors" for s in _cache_snapshots(root, hub_id)]
    return next((c for c in candidates if c.is_file()), None)


def find_decoder_dir(decoder: str, weights_dir: str | Path) -> Path | None:
    """A folder with config.json + model.safetensors for a GPT-2 checkpoint under weights_dir."""
    root = Path(weights_dir)
    candidates = [root / decoder, root / decoder.split("/")[-1]]
    for repo_id in {decoder, GPT2_HUB_IDS.get(decoder, decoder)}:
        candidates += _cache_snapshots(root, repo_id)
    for c in candidates:
        if (c / "config.json").is_file() and (c / "model.safetensors").is_file():
            return c
    return None


def load_gpt2_state(
    folder: str | Path, vocab_size: int | None = None
) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """Read an HF GPT-2 checkpoint folder into (DecoderConfig, state dict of our GPT2 module).

    HF stores GPT-2's projections as Conv1D with (in, out) weights: they are transposed into
    nn.Linear's (out, in). With vocab_size below the checkpoint's, the embedding keeps the first
    vocab_size - 1 rows and <|endoftext|> (GPT-2's last id) moves to the last row.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg = DecoderConfig(
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        n_positions=hf.get("n_positions", 1024),
        vocab_size=hf.get("vocab_size", 50257),
        dropout=hf.get("resid_pdrop", 0.1),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )
    raw = load_file(str(folder / "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key.removeprefix("transformer.")
        if name.startswith("lm_head.") or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied head; causal-mask buffers of older HF versions
        if any(name.endswith(s) for s in ("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            value = value.t().contiguous()
        state[name] = value
    if vocab_size is not None and vocab_size < cfg.vocab_size:
        wte = state["wte.weight"]
        state["wte.weight"] = torch.cat([wte[: vocab_size - 1], wte[-1:]]).contiguous()
        cfg.vocab_size = vocab_size
    return cfg, state


def _hub_decoder_dir(decoder: str) -> Path:
    from huggingface_hub import snapshot_download

    repo_id = GPT2_HUB_IDS.get(decoder, decoder)
    return Path(snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors"]))


def from_pretrained(
    cfg: ModelConfig,
    weights_dir: str | Path | None = None,
    decoder: str | None = None,
    vocab_size: int | None = None,
) -> CaptionModel:
    """A CaptionModel whose encoder and decoder start from pretrained weights.

    `decoder` names the GPT-2 checkpoint (a size such as "gpt2", a hub id, or a folder name
    under weights_dir); it defaults to cfg.decoder when that is a size name. The mapper and
    refiner start fresh: they are what fine-tuning learns first.
    """
    decoder = decoder or (cfg.decoder if isinstance(cfg.decoder, str) else None)
    if decoder is None:
        raise PretrainedWeightsError("name the GPT-2 checkpoint to load (decoder=...)")
    if weights_dir is not None and not Path(weights_dir).is_dir():
        raise PretrainedWeightsError(f"--weights-dir {weights_dir} is not a directory")

    # encoder
    if weights_dir is not None:
        enc_file = find_encoder_file(cfg.encoder_name, weights_dir)
        if enc_file is None:
            raise PretrainedWeightsError(
                f"no weights for encoder {cfg.encoder_name!r} under {weights_dir}: expected "
                f"{Path(weights_dir) / cfg.encoder_name / 'model.safetensors'} or a Hugging Face cache"
            )
        encoder = build_encoder(cfg, pretrained=True, weights_file=str(enc_file))
    elif _offline():
        raise PretrainedWeightsError(
            f"encoder {cfg.encoder_name!r}: offline and no weights given; "
            + HOW_TO.format(what=f"{cfg.encoder_name}/model.safetensors")
        )
    else:
        try:
            encoder = build_encoder(cfg, pretrained=True)
        except OSError as e:  # connection refused, DNS, missing file: all OSError subclasses
            raise PretrainedWeightsError(
                f"encoder {cfg.encoder_name!r}: cannot fetch from the model hub ({type(e).__name__}); "
                + HOW_TO.format(what=f"{cfg.encoder_name}/model.safetensors")
            ) from None

    # decoder
    if weights_dir is not None:
        folder = find_decoder_dir(decoder, weights_dir)
        if folder is None:
            raise PretrainedWeightsError(
                f"no GPT-2 checkpoint {decoder!r} under {weights_dir}: expected "
                f"{Path(weights_dir) / decoder}/config.json and model.safetensors, or a Hugging Face cache"
            )
    elif _offline():
        raise PretrainedWeightsError(
            f"decoder {decoder!r}: offline and no weights given; "
            + HOW_TO.format(what=f"{decoder}/config.json and model.safetensors")
        )
    else:
        try:
            folder = _hub_decoder_dir(decoder)
        except OSError as e:
            raise PretrainedWeightsError(
                f"decoder {decoder!r}: cannot fetch from the model hub ({type(e).__name__}); "
                + HOW_TO.format(what=f"{decoder}/config.json and model.safetensors")
            ) from None
    want_vocab = vocab_size or cfg.decoder_config.vocab_size
    dcfg, state = load_gpt2_state(folder, vocab_size=want_vocab)
    dcfg.dropout = cfg.decoder_config.dropout
    full = cfg.replace(decoder={k: getattr(dcfg, k) for k in DecoderConfig.__dataclass_fields__})
    model = CaptionModel(full, encoder=encoder)
    missing, unexpected = model.decoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"GPT-2 checkpoint {folder} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model
