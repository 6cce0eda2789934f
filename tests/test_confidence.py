"""A caption's confidence: the decoder's per-token signals, the calibrated mix, and the worker
saving it as the caption's score."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from sqlalchemy import select

from core_model.confidence import (
    DEFAULT_CALIBRATION,
    FEATURES,
    Calibration,
    Signals,
    auroc,
    fit_calibration,
)
from core_model.config import preset
from core_model.model import CaptionModel
from tests import test_review_browser as review_browser
from tests.workers_fixtures import Stack, write_checkpoint

MAX_NEW = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    m = CaptionModel(preset("tiny")).eval()
    # EOS likely after a few tokens, so both finished and unfinished hypotheses occur
    e = torch.randn(m.decoder.cfg.n_embd)
    with torch.no_grad():
        m.decoder.wte.weight[m.eos_id] = 1.5 * e / e.norm()
    return m


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(4, 3, 160, 160, generator=torch.Generator().manual_seed(2))


def token_logprobs(model, pixels_one, tokens):
    """Teacher-forced log-softmax at each step of `tokens` (+ EOS when the caption stopped
    before the limit), from one full forward pass without the KV cache: (log-probs (T, V), ids)."""
    ids = list(tokens) + ([model.eos_id] if len(tokens) < MAX_NEW else [])
    with torch.no_grad():
        prefix = model.prefix(model.encode(pixels_one[None]))  # (1, P, C)
        x = torch.cat([prefix, model.decoder.wte(torch.tensor([ids]))], dim=1)
        hidden = model.decoder(x)
        P = prefix.shape[1]
        logits = model.decoder.logits(hidden[0, P - 1 : P - 1 + len(ids)])  # (T, V)
    return F.log_softmax(logits.float(), dim=-1), ids


def hand_signals(model, pixels_one, tokens):
    logp, ids = token_logprobs(model, pixels_one, tokens)
    chosen = logp[torch.arange(len(ids)), torch.tensor(ids)]
    others = logp.clone()
    others[torch.arange(len(ids)), torch.tensor(ids)] = float("-inf")
    lead = chosen - others.max(dim=-1).values
    return chosen.mean().item(), chosen.min().item(), lead.min().item()


@pytest.mark.parametrize("beams,n_best", [(1, 1), (3, 3)])
def test_min_token_logprob_and_margin_match_a_hand_computation(model, pixels, beams, n_best):
    hyps = model.generate(pixels, num_beams=beams, n_best=n_best, max_new_tokens=MAX_NEW)
    lengths = set()
    for i, per_image in enumerate(hyps):
        assert len(per_image) == n_best
        for h in per_image:
            mean, least, lead = hand_signals(model, pixels[i], h.tokens)
            lengths.add(len(h.tokens))
            assert h.score == pytest.approx(mean, abs=1e-4)
            assert h.min_token_logprob == pytest.approx(least, abs=1e-4)
            assert h.min_token_margin == pytest.approx(lead, abs=1e-4)
            assert h.min_token_logprob <= h.score + 1e-6
    assert min(lengths) < MAX_NEW  # some hypotheses stopped at EOS, whose step counts too
    if beams == 1:  # greedy takes the argmax: it leads its runner-up at every step
        assert all(h.min_token_margin >= 0 for per in hyps for h in per)


def test_sampled_hypotheses_carry_the_same_signals(model, pixels):
    hyps = model.generate(pixels, do_sample=True, n_best=2, seed=4, max_new_tokens=MAX_NEW)
    for i, per_image in enumerate(hyps):
        for h in per_image:
            mean, least, lead = hand_signals(model, pixels[i], h.tokens)
            assert h.score == pytest.approx(mean, abs=1e-4)
            assert h.min_token_logprob == pytest.approx(least, abs=1e-4)
            assert h.min_token_margin == pytest.approx(lead, abs=1e-4)


def test_fast_path_reports_the_plain_paths_signals(model, pixels):
    import copy

    from core_model.fastgen import FastGenerator

    plain = model.generate(pixels, num_beams=3, n_best=2, max_new_tokens=MAX_NEW)
    fast = FastGenerator(copy.deepcopy(model)).generate(
        pixels, num_beams=3, n_best=2, max_new_tokens=MAX_NEW
    )
    for f, p in zip(fast, plain, strict=True):
        assert [h.tokens for h in f] == [h.tokens for h in p]
        assert [h.min_token_logprob for h in f] == pytest.approx(
            [h.min_token_logprob for h in p], abs=1e-5
        )
        assert [h.min_token_margin for h in f] == pytest.approx(
            [h.min_token_margin for h in p], abs=1e-5
        )


# --- the calibrated confidence ------------------------------------------------------------


BASE = Signals(mean_logprob=-0.05, min_token_logprob=-0.7, min_token_margin=0.4, tokens=8)
GRIDS = {
    "mean_logprob": [-30.0, -5.0, -1.0, -0.2, -0.01, -1e-4, -1e-9, 0.0],
    "min_token_logprob": [-float("inf"), -60.0, -4.0, -0.7, -0.05, -1e-6, 0.0],
    "min_token_margin": [-float("inf"), -25.0, -1.0, 0.0, 0.3, 2.0, 40.0, float("inf")],
    "tokens": [40, 20, 12, 8, 3, 1, 0],  # fewer tokens: no less confident
}
STRONG = Calibration(bias=-1.0, weights={name: 0.7 for name in FEATURES})


@pytest.mark.parametrize("calibration", [DEFAULT_CALIBRATION, STRONG], ids=["default", "all"])
@pytest.mark.parametrize("field", sorted(GRIDS))
def test_confidence_is_monotone_in_each_signal_and_within_0_1(calibration, field):
    values = []
    for v in GRIDS[field]:
        signals = Signals(**{**BASE.__dict__, field: v})
        c = calibration.confidence(signals)
        assert 0.0 <= c <= 1.0 and not math.isnan(c)
        values.append(c)
    assert values == sorted(values), (field, values)  # each grid runs from worse to better
    if calibration is STRONG:
        assert values[-1] > values[0]  # and a weighted signal does move it


def test_confidence_handles_a_nan_margin():
    c = STRONG.confidence(Signals(-0.1, -0.3, float("nan"), 5))
    assert 0.0 <= c <= 1.0


def test_a_calibration_refuses_negative_weights_and_unknown_features():
    with pytest.raises(ValueError, match=">= 0"):
        Calibration(0.0, {"min_token_logit": -0.5})
    with pytest.raises(ValueError, match="unknown"):
        Calibration(0.0, {"colour": 1.0})
    round_trip = Calibration.from_dict(STRONG.to_dict())
    assert round_trip == STRONG
    assert Calibration.from_meta({"confidence": STRONG.to_dict()}) == STRONG
    assert Calibration.from_meta({}) is DEFAULT_CALIBRATION


def test_auroc_by_the_rank_formula():
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    # one tie between a positive and a negative counts a half
    assert auroc([0.5, 0.5, 0.1], [True, False, False]) == pytest.approx(0.75)
    assert math.isnan(auroc([0.3, 0.4], [True, True]))


def test_fit_ranks_wrong_captions_first_and_keeps_weights_non_negative():
    gen = torch.Generator().manual_seed(0)
    signals, wrong = [], []
    for _ in range(400):
        least = -float(torch.rand(1, generator=gen)) * 3  # a doubtful token: likely wrong
        is_wrong = float(torch.rand(1, generator=gen)) < 1 - math.exp(least)
        # the length says the opposite of its assumed direction here: its weight stays 0
        tokens = 4 + int(is_wrong) * -2 + int(torch.randint(0, 6, (1,), generator=gen))
        signals.append(Signals(least / 3, least, 1.0 + least, tokens))
        wrong.append(is_wrong)
    cal = fit_calibration(signals, wrong)
    assert all(w >= 0 for w in cal.weights.values())
    assert cal.weights["shortness"] == 0.0
    conf = [cal.confidence(s) for s in signals]
    assert auroc([-c for c in conf], wrong) > 0.7
    # calibrated: the mean confidence is near the share of right captions
    assert sum(conf) / len(conf) == pytest.approx(1 - sum(wrong) / len(wrong), abs=0.05)


# --- the worker saves it --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny", seed=0)


def test_a_caption_saved_by_the_worker_carries_its_confidence(
    migrated_url, tmp_path, tiny_checkpoint, redis_dbs, monkeypatch
):
    from captioner.state.models import Caption, Image
    from dashboard.api import caption_dict
    from workers.caption import run_caption_batch

    stack = Stack(
        root=tmp_path,
        database_url=migrated_url,
        redis_url=redis_dbs.flushed("scratch"),
        checkpoint=tiny_checkpoint,
    )
    try:
        stack.apply_env(monkeypatch)
        job_id, ids = stack.submit_pngs(3, name="confidence", publish=False)
        out = run_caption_batch(
            job_id, ids, worker_id="w-conf", settings=stack.settings(), retrying=False
        )
        assert sorted(out.captioned) == sorted(ids)
        with stack.sessions() as s:
            captions = s.scalars(select(Caption).where(Caption.image_id.in_(ids))).all()
            review_scores = dict(
                s.execute(select(Image.id, Image.review_score).where(Image.id.in_(ids))).all()
            )
            assert len(captions) == 3
            for c in captions:
                assert 0.0 <= c.score <= 1.0
                assert review_scores[c.image_id] == pytest.approx(c.score)  # the queue's key
                assert len(c.candidates) == 3  # beam 3 / n-best 3, the bulk default
                best = c.candidates[0]
                assert best["text"] == c.text
                assert best["confidence"] == pytest.approx(c.score)
                # the raw signals are kept, and the confidence is what they give
                assert best["score"] <= 0.0
                assert best["min_token_logprob"] <= best["score"] + 1e-6
                assert isinstance(best["tokens"], int)
                signals = Signals(
                    best["score"],
                    best["min_token_logprob"],
                    best["min_token_margin"],
                    best["tokens"],
                )
                assert DEFAULT_CALIBRATION.confidence(signals) == pytest.approx(c.score)
                for alt in c.candidates:
                    assert 0.0 <= alt["confidence"] <= 1.0
                api = caption_dict(c)
                assert api["score"] == c.score
                assert api["candidates"][0]["confidence"] == pytest.approx(c.score)
    finally:
        stack.close()


# --- the review page shows it -----------------------------------------------------------------

live = review_browser.live  # the review page's live dashboard and Chromium page fixtures
page = review_browser.page


def test_review_page_shows_the_confidence_as_a_percentage(live, page):
    from playwright.sync_api import expect
    from sqlalchemy import update

    from captioner.state.db import session_scope
    from captioner.state.models import Caption

    job_id, ids = live.job(2, "confidence")
    new, old = ids  # `old`: a caption saved when scores were mean log-probabilities
    candidates = [
        {"text": "a small red circle", "score": -0.01, "confidence": 0.873},
        {"text": "a large red circle", "score": -0.9, "confidence": 0.2},
    ]
    with session_scope(live.stack.sessions) as s:
        s.execute(
            update(Caption)
            .where(Caption.image_id == new)
            .values(text="a small red circle", score=0.873, candidates=candidates)
        )
    review_browser.open_queue(page, live, job_id)
    expected = {new: "confidence 87%", old: "score -0.890"}
    seen = []
    for k in range(2):
        if k:
            page.keyboard.press("j")
            expect(page.locator("#review-position")).to_have_text("2 of 2")
        image_id = int(page.locator("#review").get_attribute("data-image-id"))
        seen.append(image_id)
        expect(page.locator("#review-score")).to_have_text(expected[image_id])
        items = page.locator("#review-candidates li")
        if image_id == new:
            expect(items.nth(0)).to_have_text("a small red circle (87%)")
            expect(items.nth(1)).to_have_text("a large red circle (20%)")
        else:  # no confidence kept: the raw score, as before
            expect(items.nth(0)).to_have_text(re.compile(r"\(-0\.890\)$"))
    assert sorted(seen) == sorted(ids)
