"""Loading pretrained encoder/decoder weights from a local directory, and GPT-2 compatibility."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from core_model.config import preset
from core_model.pretrained import PretrainedWeightsError, from_pretrained

HF_GPT2 = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)


def _save_hf_gpt2(folder):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(11)
    hf = GPT2LMHeadModel(GPT2Config(**HF_GPT2)).eval()
    hf.save_pretrained(folder, safe_serialization=True)
    return hf


def _save_timm(path):
    torch.manual_seed(12)
    enc = timm.create_model("test_vit", pretrained=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return enc


@pytest.fixture()
def plain_dir(tmp_path):
    enc = _save_timm(tmp_path / "test_vit" / "model.safetensors")
    hf = _save_hf_gpt2(tmp_path / "tiny-gpt2")
    return tmp_path, enc, hf


def test_plain_folders_load_both_halves(plain_dir):
    root, enc, hf = plain_dir
    model = from_pretrained(preset("tiny"), weights_dir=root, decoder="tiny-gpt2").eval()
    ours = model.encoder.state_dict()
    for k, v in enc.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(ours[k], v), k
    # our GPT-2 forward gives Hugging Face's logits on the same weights
    ids = torch.tensor([[464, 3290, 318, 257, 1332, 50256, 11]])
    with torch.no_grad():
        ref = hf(ids).logits
        got = model.decoder.logits(model.decoder(model.decoder.wte(ids)))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_hf_cache_layout_and_vocab_limit(tmp_path):
    snap = tmp_path / "models--timm--test_vit.r160_in1k" / "snapshots" / "0123abc"
    enc = _save_timm(snap / "model.safetensors")
    hf = _save_hf_gpt2(tmp_path / "models--acme--tiny-gpt2" / "snapshots" / "feed")
    model = from_pretrained(
        preset("tiny"), weights_dir=tmp_path, decoder="acme/tiny-gpt2", vocab_size=1024
    )
    assert torch.equal(model.encoder.patch_embed.proj.weight, enc.patch_embed.proj.weight)
    wte = model.decoder.wte.weight
    assert wte.shape[0] == 1024
    ref = hf.transformer.wte.weight
    assert torch.equal(wte[:1023], ref[:1023]) and torch.equal(
        wte[1023], ref[50256]
    )  # EOS moved last


def test_missing_weights_name_what_is_missing(tmp_path, monkeypatch):
    _save_hf_gpt2(tmp_path / "tiny-gpt2")
    with pytest.raises(PretrainedWeightsError, match="no weights for encoder 'test_vit'"):
        from_pretrained(preset("tiny"), weights_dir=tmp_path, decoder="tiny-gpt2")
    _save_timm(tmp_path / "test_vit" / "model.safetensors")
    with pytest.raises(PretrainedWeightsError, match="no GPT-2 checkpoint 'gpt2'"):
        from_pretrained(preset("tiny"), weights_dir=tmp_path, decoder="gpt2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        PretrainedWeightsError, match="offline and no weights given; pass --weights-dir"
    ):
        from_pretrained(preset("base"))
    with pytest.raises(PretrainedWeightsError, match="name the GPT-2 checkpoint"):
        from_pretrained(preset("tiny"))
