"""The ViT-prefix-GPT-2 captioner, in one file.

    image -> timm encoder (frozen by default) -> Linear(embed_dim) -> MLP -> n_prefix_tokens x width
          -> LayerNorm -> optional TransformerEncoder refiner (over the prefix, or the prefix and
             every patch token) -> GPT-2, with the prefix placed before the caption's embeddings.

The GPT-2 body is written here (nanoGPT style) with Hugging Face's parameter names, so GPT-2
checkpoints load one to one, and so decoding owns its KV cache: one class serves training,
plain decoding and the fast decoding path. Shapes: B batch, P prefix tokens, T caption tokens,
C decoder width, V vocabulary, K beams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DecoderConfig, ModelConfig

IGNORE_INDEX = -100  # labels at prefix and padding positions: no loss there


# --------------------------------------------------------------------------------------------
# GPT-2
# --------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, H, T_max, head_dim)."""

    def __init__(self, cfg: DecoderConfig, batch: int, max_len: int, device, dtype):
        hd = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search: each new beam's parent)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)

    def repeat_rows(self, n: int) -> None:
        """Each row becomes n consecutive rows (one per beam or sample)."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout_p = cfg.dropout

    def forward(
        self, x: torch.Tensor, layer: int = 0, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k = cache.k[layer, :, :, : start + T]
            v = cache.v[layer, :, :, : start + T]
            # A prefill (start == 0) is causal; a one-token step sees every earlier position.
            causal = start == 0 and T > 1
            if start > 0 and T > 1:
                raise ValueError("multi-token steps after the prefill are not supported")
        else:
            causal = True
        dropout = self.attn_dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, layer=0, cache=None):
        x = x + self.attn(self.ln_1(x), layer, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2's body and tied output head. Parameter names match HF's `GPT2Model`."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Input embeddings (B, T, C), positions starting at the cache's length -> hidden (B, T, C)."""
        start = cache.length if cache is not None else 0
        T = x.shape[1]
        if start + T > self.cfg.n_positions:
            raise ValueError(f"sequence of {start + T} exceeds n_positions={self.cfg.n_positions}")
        pos = torch.arange(start, start + T, device=x.device)
        x = self.drop(x + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = block(x, i, cache)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.wte.weight)  # tied head: (..., C) -> (..., V)


# --------------------------------------------------------------------------------------------
# Encoder and prefix mapping
# --------------------------------------------------------------------------------------------


def build_encoder(cfg: ModelConfig, pretrained: bool = False, weights_file: str | None = None):
    import timm

    kwargs = dict(cfg.encoder_kwargs)
    if weights_file is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=weights_file)
    if cfg.encoder_stem is not None:
        if pretrained:
            raise ValueError(
                "a convolutional encoder_stem is trained from scratch: no pretrained weights"
            )
        kwargs.update(embed_layer=conv_stem_embed(cfg.encoder_stem), patch_size=1)
    encoder = timm.create_model(cfg.encoder_name, pretrained=pretrained, num_classes=0, **kwargs)
    if cfg.encoder_pos_init == "sincos" and not pretrained:
        init_sincos_pos_embed(encoder)
    return encoder


def conv_stem_embed(spec: dict):
    """timm's ConvStem (conv-norm-act layers, the last a plain conv) as a ViT embed_layer."""
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer_hybrid import ConvStem

    channels = tuple(int(c) for c in spec["channels"])
    strides = tuple(int(s) for s in spec.get("strides", (2,) * len(channels)))
    stem = ConvStem(
        channels=channels,
        depth=len(channels),
        stride=strides,
        kernel_size=int(spec.get("kernel_size", 3)),
    )
    return partial(HybridEmbed, backbone=stem)


@torch.no_grad()
def init_sincos_pos_embed(encoder: nn.Module) -> None:
    """Start a ViT's learned position embeddings at 2-D sin-cos values (patch tokens only), so
    where a token sits is readable from the first step instead of learned from noise."""
    from timm.layers import build_sincos2d_pos_embed

    pos = getattr(encoder, "pos_embed", None)
    grid = getattr(getattr(encoder, "patch_embed", None), "grid_size", None)
    if pos is None or grid is None:
        raise ValueError("encoder_pos_init='sincos' needs a ViT with pos_embed and a patch grid")
    table = build_sincos2d_pos_embed(list(grid), pos.shape[-1])  # (N, D)
    pos[0, pos.shape[1] - table.shape[0] :] = table.to(pos.dtype)


class PrefixMapper(nn.Module):
    """Encoder features -> (B, P, C) prefix embeddings for GPT-2."""

    def __init__(self, cfg: ModelConfig, enc_dim: int, width: int):
        super().__init__()
        self.cfg = cfg
        P, E = cfg.n_prefix_tokens, cfg.embed_dim
        hidden = cfg.mapper_hidden or 2 * E
        self.proj = nn.Linear(enc_dim, E)
        self.mlp = nn.Sequential(
            nn.Linear(E, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, P * width)
        )
        self.norm = nn.LayerNorm(width)
        self.patch_proj = nn.Linear(enc_dim, width) if cfg.prefix_source == "patches" else None
        self.refiner = None
        if cfg.refiner_layers:
            layer = nn.TransformerEncoderLayer(
                d_model=width,
                nhead=cfg.refiner_heads,
                dim_feedforward=4 * width,
                dropout=cfg.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.refiner = nn.TransformerEncoder(
                layer, cfg.refiner_layers, enable_nested_tensor=False
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        P = self.cfg.n_prefix_tokens
        pooled = features.mean(dim=1) if features.dim() == 3 else features  # (B, enc_dim)
        z = self.proj(pooled)  # (B, E)
        prefix = self.norm(self.mlp(z).view(z.shape[0], P, -1))  # (B, P, C)
        if self.refiner is None:
            return prefix
        if self.patch_proj is not None:  # attend across the prefix and every encoder token
            tokens = self.patch_proj(features)  # (B, N, C)
            refined = self.refiner(torch.cat([prefix, tokens], dim=1))  # (B, P + N, C)
            return refined if self.cfg.prefix_keeps_patches else refined[:, :P]
        return self.refiner(prefix)


# --------------------------------------------------------------------------------------------
# The captioner
# --------------------------------------------------------------------------------------------


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, EOS excluded
    score: float  # mean log-probability per generated token (EOS included when reached)
    # The least likely token the hypothesis chose (EOS included when reached): one doubtful
    # word in an otherwise sure caption shows here, not in the mean.
    min_token_logprob: float = 0.0
    # Smallest log-probability lead of a chosen token over the best other token at its step
    # (log p(chosen) - max log p(other)); negative where beam search kept a runner-up token.
    min_token_margin: float = float("inf")


class CaptionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        dcfg = cfg.decoder_config
        self.encoder = encoder if encoder is not None else build_encoder(cfg)
        self.mapper = PrefixMapper(cfg, self.encoder.num_features, dcfg.n_embd)
        self.decoder = GPT2(dcfg)
        self.eos_id = dcfg.vocab_size - 1
        self.apply_freezing()

    # --- parameters -------------------------------------------------------------------------

    def apply_freezing(self) -> None:
        for p in self.encoder.parameters():
            p.requires_grad_(not self.cfg.freeze_encoder)
        for p in self.decoder.parameters():
            p.requires_grad_(not self.cfg.freeze_decoder)
        if self.cfg.freeze_encoder:
            self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze_encoder:
            self.encoder.eval()  # a frozen encoder keeps eval behaviour (no dropout, fixed stats)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- forward ----------------------------------------------------------------------------

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> encoder features: (B, D) pooled, or (B, N, D) every token."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_encoder):
            tokens = self.encoder.forward_features(pixels)
            if self.cfg.prefix_source == "patches":
                return tokens
            return self.encoder.forward_head(tokens, pre_logits=True)

    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        return self.mapper(features)

    def make_labels(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, prefix_len: int | None = None
    ) -> torch.Tensor:
        """Labels aligned with [prefix, caption]: -100 at every prefix and padding position."""
        B, T = input_ids.shape
        P = prefix_len or self.cfg.n_prefix_tokens
        pad = torch.arange(T, device=input_ids.device)[None, :] >= lengths[:, None]
        text = input_ids.masked_fill(pad, IGNORE_INDEX)
        prefix = torch.full((B, P), IGNORE_INDEX, dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([prefix, text], dim=1)  # (B, P + T)

    def forward(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        pixels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass. input_ids (B, T) padded (with EOS, which the labels mask),
        lengths (B,) counting each caption's EOS. Returns (logits at text positions (N, V), loss).

        Logits are computed only where a label exists: the vocabulary-sized head is the
        costliest part of a small model's step, and prefix/padding positions need none.
        """
        if features is None:
            if pixels is None:
                raise ValueError("forward needs pixels or precomputed features")
            features = self.encode(pixels)
        prefix = self.prefix(features)  # (B, P, C)
        x = torch.cat([prefix, self.decoder.wte(input_ids)], dim=1)  # (B, P + T, C)
        hidden = self.decoder(x)
        labels = self.make_labels(input_ids, lengths, prefix.shape[1])
        # position i predicts label i + 1
        shifted = labels[:, 1:]
        keep = shifted != IGNORE_INDEX
        logits = self.decoder.logits(hidden[:, :-1][keep])  # (N, V)
        loss = F.cross_entropy(logits.float(), shifted[keep])
        return logits, loss

    # --- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        pixels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        *,
        num_beams: int = 1,
        n_best: int = 1,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[Hypothesis]]:
        """Caption a batch. Returns, per image, up to n_best hypotheses sorted by score.

        greedy: num_beams=1, n_best=1. beam: num_beams=K (n_best <= K; K is raised to n_best).
        sampling: do_sample=True, n_best samples per image, seeded by `seed`.
        min_new_tokens forbids EOS before that many tokens (greedy; benchmarks use it to fix lengths).
        """
        if features is None:
            if pixels is None:
                raise ValueError("generate needs pixels or precomputed features")
            features = self.encode(pixels)
        max_new = max_new_tokens or self.cfg.max_caption_tokens
        if max_new < 1:
            raise ValueError("max_new_tokens must be >= 1")
        prefix = self.prefix(features)
        if do_sample:
            return self._sample(prefix, max_new, n_best, temperature, top_k, top_p, seed)
        num_beams = max(num_beams, n_best)
        state = self.search(prefix, max_new, num_beams, min_new_tokens)
        return state.results(n_best, self.eos_id)

    def _prefill(self, prefix: torch.Tensor, max_new: int) -> tuple[KVCache, torch.Tensor]:
        B, P, _ = prefix.shape
        cache = KVCache(self.decoder.cfg, B, P + max_new, prefix.device, prefix.dtype)
        hidden = self.decoder(prefix, cache)
        return cache, self.decoder.logits(hidden[:, -1])  # (B, V): the first caption token

    def _step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        hidden = self.decoder(self.decoder.wte(tokens)[:, None, :], cache)
        return self.decoder.logits(hidden[:, -1])  # (B, V) next-token logits

    def search(
        self,
        prefix: torch.Tensor,
        max_new: int,
        K: int = 1,
        min_new: int = 0,
        early_stop: bool = True,
    ) -> BeamState:
        """Greedy (K=1) or beam search from prefix embeddings (B, P, C).

        With early_stop the loop ends once every beam has emitted EOS (one host sync per step).
        Without it, it always runs max_new steps and never synchronises with the device, so it
        can be captured in a CUDA graph; finished beams never change, so results are identical.
        """
        B = prefix.shape[0]
        cache, logits = self._prefill(prefix, max_new)
        if K > 1:
            cache.repeat_rows(K)
            logits = logits.repeat_interleave(K, dim=0)  # (B*K, V)
        state = BeamState.start(B, K, max_new, prefix.device)
        for t in range(max_new):
            if t < min_new:
                logits[:, self.eos_id] = float("-inf")
            rows = state.advance(logits, t, self.eos_id)
            if t + 1 == max_new or (early_stop and bool(state.finished.all())):
                break
            if K > 1:
                cache.reorder(rows)
            logits = self._step(state.last_tokens(t), cache)
        return state

    def _strip(self, ids: list[int]) -> list[int]:
        return ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids

    @staticmethod
    def _best(hyps: list[Hypothesis], n: int) -> list[Hypothesis]:
        out: list[Hypothesis] = []
        seen: set[tuple[int, ...]] = set()
        for h in sorted(hyps, key=lambda h: h.score, reverse=True):
            key = tuple(h.tokens)
            if key not in seen:
                seen.add(key)
                out.append(h)
            if len(out) == n:
                break
        return out

    def _sample(self, prefix, max_new, n, temperature, top_k, top_p, seed):
        B = prefix.shape[0]
        dev = prefix.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(0 if seed is None else seed)
        cache, logits = self._prefill(prefix, max_new)
        cache.repeat_rows(n)
        logp = F.log_softmax(logits.float(), dim=-1).repeat_interleave(n, dim=0)  # (B*n, V)
        rows = B * n
        tokens = torch.full((rows, max_new), self.eos_id, dtype=torch.long, device=dev)
        total = torch.zeros(rows, device=dev)
        count = torch.zeros(rows, device=dev)
        least = torch.zeros(rows, device=dev)  # min token log-probability so far
        margin = torch.full((rows,), float("inf"), device=dev)  # min lead over the runner-up
        done = torch.zeros(rows, dtype=torch.bool, device=dev)
        for t in range(max_new):
            probs = F.softmax(filter_logits(logp / max(temperature, 1e-6), top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            nxt = nxt.masked_fill(done, self.eos_id)
            chosen = logp.gather(1, nxt[:, None]).squeeze(1)  # (B*n,)
            lead = chosen - best_other(logp, nxt[:, None]).squeeze(1)
            total += chosen.masked_fill(done, 0.0)
            least = torch.where(done, least, torch.minimum(least, chosen))
            margin = torch.where(done, margin, torch.minimum(margin, lead))
            count += (~done).float()
            tokens[:, t] = nxt
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
            logp = F.log_softmax(self._step(nxt, cache).float(), dim=-1)
        scores = (total / count.clamp(min=1)).view(B, n).tolist()
        toks = tokens.view(B, n, max_new).tolist()
        leasts, margins = least.view(B, n).tolist(), margin.view(B, n).tolist()
        return [
            self._best(
                [
                    Hypothesis(self._strip(toks[b][i]), scores[b][i], leasts[b][i], margins[b][i])
                    for i in range(n)
                ],
                n,
            )
            for b in range(B)
        ]


class BeamState:
    """Beam search over fixed-shape tensors, shared by the plain and the fast decoding paths.

    K beams per image. A beam that emits EOS is finished: from then on its only extension is
    EOS at no cost, so it keeps its place while its score stays fixed. Beams are chosen by
    summed log-probability; the survivors are ranked by mean log-probability per token.
    Each beam also carries its least likely token and its smallest lead over a runner-up
    token (`Hypothesis.min_token_logprob`, `.min_token_margin`), the signals of a confidence.
    """

    def __init__(self, tokens, beam_sum, length, finished, min_logprob, min_margin):
        self.tokens = tokens  # (B, K, max_new) ids so far (EOS after the end)
        self.beam_sum = beam_sum  # (B, K) summed log-probabilities
        self.length = length  # (B, K) tokens counted in the score (EOS included)
        self.finished = finished  # (B, K) bool
        self.min_logprob = min_logprob  # (B, K) least token log-probability (0 before any)
        self.min_margin = min_margin  # (B, K) least lead over the runner-up (inf before any)

    def copy(self) -> BeamState:
        """Private copies of every tensor (the fast path's static outputs are rewritten)."""
        return BeamState(
            self.tokens.clone(),
            self.beam_sum.clone(),
            self.length.clone(),
            self.finished.clone(),
            self.min_logprob.clone(),
            self.min_margin.clone(),
        )

    @classmethod
    def start(cls, B: int, K: int, max_new: int, device) -> BeamState:
        beam_sum = torch.zeros(B, K, device=device)
        beam_sum[:, 1:] = float("-inf")  # the K beams start identical: expand the first only
        return cls(
            torch.zeros(B, K, max_new, dtype=torch.long, device=device),
            beam_sum,
            torch.zeros(B, K, device=device),
            torch.zeros(B, K, dtype=torch.bool, device=device),
            torch.zeros(B, K, device=device),
            torch.full((B, K), float("inf"), device=device),
        )

    def advance(self, logits: torch.Tensor, t: int, eos_id: int) -> torch.Tensor:
        """Take step t's next-token logits (B*K, V); returns the parent row of each new beam (B*K,)."""
        B, K = self.beam_sum.shape
        if K == 1:
            return self._advance_greedy(logits, t, eos_id)
        V = logits.shape[-1]
        logp = F.log_softmax(logits.float(), dim=-1)
        top2, top2_ids = logp.topk(2, dim=-1)  # (B*K, 2): each row's best and runner-up
        done = self.finished.view(-1)
        logp.masked_fill_(done[:, None], float("-inf"))  # a finished beam's only extension:
        logp[:, eos_id] = torch.where(done, 0.0, logp[:, eos_id])  # EOS, at no cost
        cand = (self.beam_sum.view(-1, 1) + logp).view(B, K * V)
        top_sum, top_idx = cand.topk(K, dim=-1)  # (B, K)
        parent = torch.div(top_idx, V, rounding_mode="floor")
        token = top_idx % V
        rows = (torch.arange(B, device=parent.device)[:, None] * K + parent).view(-1)  # (B*K,)
        chosen = logp.view(B, K * V).gather(1, top_idx)  # (B, K) the new token's log-prob
        best, second = top2[rows].unbind(-1)
        other = torch.where(top2_ids[rows, 0] == token.view(-1), second, best).view(B, K)
        parent_done = self.finished.gather(1, parent)
        self.tokens = self.tokens.gather(1, parent[:, :, None].expand_as(self.tokens)).clone()
        self.tokens[:, :, t] = token
        self.length = self.length.gather(1, parent) + (~parent_done).float()
        least, margin = self.min_logprob.gather(1, parent), self.min_margin.gather(1, parent)
        self.min_logprob = torch.where(parent_done, least, torch.minimum(least, chosen))
        self.min_margin = torch.where(parent_done, margin, torch.minimum(margin, chosen - other))
        self.finished = parent_done | (token == eos_id)
        self.beam_sum = top_sum
        return rows

    def _advance_greedy(self, logits: torch.Tensor, t: int, eos_id: int) -> torch.Tensor:
        """K = 1: argmax and its log-probability, without materialising log-softmax (B, V)."""
        lf = logits.float()
        top2, top2_ids = lf.topk(2, dim=-1)  # (B, 2)
        best, token = top2[:, 0], top2_ids[:, 0]
        logp = -(lf - best[:, None]).exp().sum(dim=-1).log()  # log-softmax at the argmax, stably
        done = self.finished[:, 0]
        token = token.masked_fill(done, eos_id)
        self.tokens[:, 0, t] = token
        self.beam_sum += logp.masked_fill(done, 0.0)[:, None]
        self.length += (~done).float()[:, None]
        live = (~done)[:, None]
        least = torch.minimum(self.min_logprob, logp[:, None])
        lead = torch.minimum(self.min_margin, (best - top2[:, 1])[:, None])  # over the runner-up
        self.min_logprob = torch.where(live, least, self.min_logprob)
        self.min_margin = torch.where(live, lead, self.min_margin)
        self.finished |= (token == eos_id)[:, None]
        return torch.arange(token.shape[0], device=token.device)

    def last_tokens(self, t: int) -> torch.Tensor:
        return self.tokens[:, :, t].reshape(-1)

    def results(self, n_best: int, eos_id: int) -> list[list[Hypothesis]]:
        score = (self.beam_sum / self.length.clamp(min=1)).tolist()
        tokens = self.tokens.tolist()
        least, margin = self.min_logprob.tolist(), self.min_margin.tolist()
        out = []
        for b in range(len(tokens)):
            hyps = []
            for k, toks in enumerate(tokens[b]):
                if score[b][k] != float("-inf"):
                    ids = toks[: toks.index(eos_id)] if eos_id in toks else toks
                    hyps.append(Hypothesis(ids, score[b][k], least[b][k], margin[b][k]))
            out.append(CaptionModel._best(hyps, n_best))
        return out


def best_other(logp: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The largest value of each row of `logp` (R, V) outside column `chosen` (R, 1) -> (R, 1)."""
    top2, ids = logp.topk(2, dim=-1)
    return torch.where(ids[:, :1] == chosen, top2[:, 1:], top2[:, :1])


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask all but the top-k tokens and the smallest set whose probability reaches top_p."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits
