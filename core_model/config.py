"""ModelConfig: every hyper-parameter of a CaptionModel, saved inside each checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# GPT-2 sizes as published; `decoder` may name one of these or give a dict of the same keys.
GPT2_SIZES: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
GPT2_VOCAB_SIZE = 50257  # 256 byte tokens + 50,000 merges + <|endoftext|>
GPT2_N_POSITIONS = 1024


def from_fields(cls: type, d: dict[str, Any], what: str):
    """`cls(**d)` for a dataclass, naming any key that is not one of its fields."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} fields: {sorted(unknown)}")
    return cls(**d)


@dataclass
class DecoderConfig:
    """The GPT-2 body. Field names follow Hugging Face's GPT2Config so weights map one to one."""

    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # model width (also the prefix token width)
    n_positions: int = GPT2_N_POSITIONS  # learned position embeddings (prefix + caption must fit)
    vocab_size: int = GPT2_VOCAB_SIZE  # output classes; < 50257 keeps GPT-2's first merges + EOS
    dropout: float = 0.1  # embedding, attention and residual dropout while training
    layer_norm_epsilon: float = 1e-5

    @classmethod
    def from_spec(cls, spec: str | dict[str, Any] | DecoderConfig) -> DecoderConfig:
        if isinstance(spec, DecoderConfig):
            return spec
        if isinstance(spec, str):
            if spec not in GPT2_SIZES:
                raise ValueError(f"unknown GPT-2 size {spec!r}; known: {', '.join(GPT2_SIZES)}")
            return cls(**GPT2_SIZES[spec])
        return from_fields(cls, spec, "decoder")


@dataclass
class ModelConfig:
    """A ViT-prefix-GPT-2 captioner. Everything needed to rebuild the module, nothing else."""

    # --- image encoder (timm) ---
    encoder_name: str = "vit_base_patch16_224"  # any timm model with forward_features/forward_head
    encoder_kwargs: dict[str, Any] = field(
        default_factory=dict
    )  # extra timm.create_model args (img_size, ...)
    freeze_encoder: bool = True  # frozen encoder: no grads, eval mode, features cacheable
    # convolutional stem in place of the ViT's patchify layer (timm ConvStem + HybridEmbed), for
    # encoders trained from scratch: {"channels": [..], "strides": [..], "kernel_size": 3}; the
    # product of the strides is the token grid's stride. None keeps the model's patch embedding.
    encoder_stem: dict[str, Any] | None = None
    encoder_pos_init: Literal["learned", "sincos"] = "learned"  # sincos: 2-D sin-cos start values
    # --- prefix mapping ---
    embed_dim: int = 512  # encoder features are projected to this width first
    mapper_hidden: int = 0  # hidden width of the projection MLP (0 = 2 * embed_dim)
    n_prefix_tokens: int = 5  # prefix vectors handed to GPT-2 before the caption tokens
    prefix_source: Literal["pooled", "patches"] = (
        "pooled"  # refiner sees the pooled vector only, or every patch
    )
    prefix_keeps_patches: bool = (
        False  # "patches": GPT-2 also sees the refined patch tokens after the prefix
    )
    refiner_layers: int = 2  # nn.TransformerEncoder layers over the prefix (0 = off)
    refiner_heads: int = 8  # attention heads in the refiner (must divide decoder width)
    dropout: float = 0.1  # dropout in the mapper and refiner
    # --- text decoder (GPT-2) ---
    decoder: str | dict[str, Any] = "gpt2"  # GPT-2 size name or DecoderConfig fields
    freeze_decoder: bool = False  # freeze GPT-2 entirely (train the mapper only)
    max_caption_tokens: int = 32  # caption tokens, EOS included; the prefix is not counted
    tokenizer: str = "gpt2-bpe"  # GPT-2's byte-level BPE (limited to vocab_size when smaller)

    def __post_init__(self) -> None:
        if self.encoder_stem is not None:
            stem = self.encoder_stem
            unknown = set(stem) - {"channels", "strides", "kernel_size"}
            if unknown or not stem.get("channels"):
                raise ValueError(
                    "encoder_stem needs 'channels' (and optionally 'strides', 'kernel_size')"
                )
            if len(stem.get("strides", stem["channels"])) != len(stem["channels"]):
                raise ValueError("encoder_stem: one stride per channel count")
        if self.encoder_pos_init not in ("learned", "sincos"):
            raise ValueError(
                f"encoder_pos_init must be 'learned' or 'sincos', not {self.encoder_pos_init!r}"
            )
        if self.prefix_source not in ("pooled", "patches"):
            raise ValueError(
                f"prefix_source must be 'pooled' or 'patches', not {self.prefix_source!r}"
            )
        if self.prefix_source == "patches" and self.refiner_layers < 1:
            raise ValueError(
                "prefix_source='patches' needs refiner_layers >= 1 to attend across patches"
            )
        if self.prefix_keeps_patches and self.prefix_source != "patches":
            raise ValueError("prefix_keeps_patches needs prefix_source='patches'")
        if self.n_prefix_tokens < 1:
            raise ValueError("n_prefix_tokens must be >= 1")
        dec = self.decoder_config
        if self.refiner_layers and dec.n_embd % self.refiner_heads:
            raise ValueError(
                f"refiner_heads={self.refiner_heads} must divide decoder width {dec.n_embd}"
            )
        if self.n_prefix_tokens + self.max_caption_tokens > dec.n_positions:
            raise ValueError(
                "n_prefix_tokens + max_caption_tokens exceeds the decoder's n_positions"
            )

    @property
    def decoder_config(self) -> DecoderConfig:
        return DecoderConfig.from_spec(self.decoder)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return from_fields(cls, d, "ModelConfig")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def preset(name: str) -> ModelConfig:
    """Named configurations. `tiny` builds in well under a second, for tests."""
    if name == "base":
        return ModelConfig()
    if name == "tiny":
        return ModelConfig(
            encoder_name="test_vit",
            embed_dim=32,
            n_prefix_tokens=4,
            refiner_layers=1,
            refiner_heads=2,
            decoder=dict(n_layer=2, n_head=2, n_embd=32, n_positions=64),
            max_caption_tokens=24,
        )
    if name == "demo":
        # Trained from scratch on the synthetic shapes world on a CPU in minutes: a ViT at 48 px
        # (the world's 64 px images resized) whose patchify layer is a small conv stem (stride 8,
        # a 6 x 6 token grid; early convolutions let a from-scratch ViT see shapes in few steps)
        # with 2-D sin-cos start positions, GPT-2 attending to every refined token, a 2-layer
        # GPT-2, and GPT-2's BPE limited to its first 2,048 ids (any English word is still
        # spelled by those sub-words, so reviews can teach new ones).
        return ModelConfig(
            encoder_name="vit_tiny_patch16_224",
            encoder_kwargs=dict(img_size=48, embed_dim=128, depth=2, num_heads=4),
            encoder_stem=dict(channels=[32, 64, 128, 128], strides=[2, 2, 2, 1], kernel_size=3),
            encoder_pos_init="sincos",
            freeze_encoder=False,
            embed_dim=256,
            n_prefix_tokens=5,
            prefix_source="patches",
            prefix_keeps_patches=True,
            refiner_layers=1,
            refiner_heads=4,
            dropout=0.0,
            decoder=dict(
                n_layer=2, n_head=4, n_embd=128, n_positions=128, vocab_size=2048, dropout=0.0
            ),
            max_caption_tokens=24,
        )
    raise ValueError(f"unknown preset {name!r}; known: tiny, demo, base")
