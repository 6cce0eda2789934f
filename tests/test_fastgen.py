"""The fast generation path gives the plain path's captions and scores."""

from __future__ import annotations

import copy

import pytest
import torch

from core_model.config import preset
from core_model.fastgen import FastGenerator
from core_model.model import CaptionModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    m = CaptionModel(preset("tiny")).eval()
    # make EOS likely after a few tokens, so finished beams and early stopping are exercised
    e = torch.randn(m.decoder.cfg.n_embd)
    with torch.no_grad():
        m.decoder.wte.weight[m.eos_id] = 1.5 * e / e.norm()
    return m


@pytest.mark.parametrize("beams,n_best", [(1, 1), (3, 1), (4, 3)])
def test_fast_path_matches_plain_path(model, beams, n_best):
    pixels = torch.randn(5, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    plain = model.generate(pixels, num_beams=beams, n_best=n_best, max_new_tokens=12)
    fast = FastGenerator(copy.deepcopy(model)).generate(
        pixels, num_beams=beams, n_best=n_best, max_new_tokens=12
    )
    assert [[h.tokens for h in per] for per in fast] == [[h.tokens for h in per] for per in plain]
    for f, p in zip(fast, plain, strict=False):
        assert [h.score for h in f] == pytest.approx([h.score for h in p], abs=1e-5)
    # the EOS boost did its job: some captions stopped before the limit
    assert any(len(per[0].tokens) < 12 for per in plain)


def test_fast_path_without_cuda_refuses_graphs(model):
    with pytest.raises(ValueError, match="CUDA graphs"):
        FastGenerator(copy.deepcopy(model), use_cuda_graphs=True)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run by bench/gpu_check.sh)"
)
def test_cuda_graph_path_matches_plain_path_within_bf16(model):
    pixels = torch.randn(8, 3, 160, 160)
    plain = copy.deepcopy(model).cuda().generate(pixels.cuda(), num_beams=2, max_new_tokens=10)
    fast = FastGenerator(copy.deepcopy(model).cuda())
    out1 = fast.generate(pixels, num_beams=2, max_new_tokens=10)
    out2 = fast.generate(pixels, num_beams=2, max_new_tokens=10)  # a replay of the captured graph
    assert out1 == out2
    agree = sum(f[0].tokens == p[0].tokens for f, p in zip(out1, plain, strict=False))
    assert agree >= 6  # bf16 may flip a near-tie
    for f, p in zip(out1, plain, strict=False):
        if f[0].tokens == p[0].tokens:
            assert f[0].score == pytest.approx(p[0].score, abs=0.05)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run by bench/gpu_check.sh)"
)
def test_pipelined_search_many_matches_one_at_a_time(model):
    fast = FastGenerator(copy.deepcopy(model).cuda())
    batches = [torch.randn(6, 3, 160, 160, device="cuda") for _ in range(3)]
    one = [fast.search(b, max_new_tokens=8).tokens.clone() for b in batches]
    many = [st.tokens for st in fast.search_many(batches, max_new_tokens=8)]
    assert len(many) == 3
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


def test_search_many_on_cpu_yields_each_batch(model):
    fast = FastGenerator(copy.deepcopy(model))
    batches = [torch.randn(2, 3, 160, 160) for _ in range(3)]
    out = [st.tokens.clone() for st in fast.search_many(batches, max_new_tokens=5)]
    ref = [fast.search(b, max_new_tokens=5).tokens for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_image_captioner_fast_mode_pads_and_matches_plain(model):
    from core_model.inference import DecodeOptions, ImageCaptioner

    pixels = torch.randn(7, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    opts = DecodeOptions(num_beams=2, n_best=2, max_new_tokens=10)
    plain = ImageCaptioner(copy.deepcopy(model), device="cpu", batch_size=4, fast=False)
    fast = ImageCaptioner(copy.deepcopy(model), device="cpu", batch_size=4, fast=True)
    assert fast.fast is not None and plain.fast is None
    a, b = plain.caption_tensors(pixels, opts), fast.caption_tensors(pixels, opts)
    assert len(b) == 7  # 4 + 3 (the last chunk padded to 4, the padding dropped)
    assert [[c.text for c in x] for x in a] == [[c.text for c in x] for x in b]


def test_max_batch_for_memory_scales_with_free_memory(model):
    from core_model.inference import max_batch_for_memory

    small = max_batch_for_memory(model, 1 << 30, 20)
    large = max_batch_for_memory(model, 8 << 30, 20)
    assert 1 <= small < large
    assert max_batch_for_memory(model, 1 << 30, 20, num_beams=4) < small
