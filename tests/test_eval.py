"""Caption metrics agree with pycocoevalcap's scorers; exact-match and the table/JSON output."""

import contextlib
import io
import json

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from core_model import evaluate
from core_model.config import preset
from core_model.evaluate import evaluate_model, format_table, normalize, score_captions, write_json
from core_model.model import CaptionModel
from core_model.synthetic import SyntheticWorld

PREDS = {
    "1": "A small red circle to the left of a large blue square.",
    "2": "a large green square",
    "3": "a dog runs on the grass",
    "4": "two cats",
}
REFS = {
    "1": ["a small red circle to the left of a large blue square"],
    "2": ["a large green circle", "a big green circle"],
    "3": ["a dog is running on grass", "A brown dog runs across the grass!", "dog on a lawn"],
    "4": ["Two cats."],
}


def test_scores_match_pycocoevalcap_called_directly():
    got = score_captions(PREDS, REFS)
    gts = {k: [normalize(r) for r in v] for k, v in REFS.items()}
    res = {k: [normalize(PREDS[k])] for k in REFS}
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
    for n in range(4):
        assert got[f"bleu_{n + 1}"] == pytest.approx(bleu[n])
    assert got["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert got["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert 0 < got["bleu_4"] < got["bleu_1"] < 1
    assert "meteor" not in got and got["n_images"] == 4


def test_exact_match_ignores_case_and_punctuation_only():
    got = score_captions(PREDS, REFS)
    assert got["exact_match"] == pytest.approx(2 / 4)  # items 1 and 4
    assert normalize("  A, b!  c. ") == "a b c"
    assert score_captions({"x": "a red square"}, {"x": ["a red squares"]})["exact_match"] == 0.0
    perfect = score_captions({k: v[0] for k, v in REFS.items()}, REFS)
    assert perfect["exact_match"] == 1.0 and perfect["bleu_4"] == pytest.approx(1.0)


def test_missing_predictions_are_an_error():
    with pytest.raises(ValueError, match="no prediction"):
        score_captions({"1": "x"}, {"1": ["x"], "2": ["y"]})


def test_meteor_only_when_java_is_there(monkeypatch):
    monkeypatch.setattr(evaluate, "java_available", lambda: False)
    assert "meteor" not in score_captions(PREDS, REFS, meteor=None)


def test_table_and_json(tmp_path):
    got = score_captions(PREDS, REFS)
    table = format_table(got, title="test split")
    lines = table.splitlines()
    assert lines[0] == "test split"
    assert lines[3].startswith("exact_match") and "0.5000" in lines[3]
    assert any(line.startswith("cider") for line in lines)
    out = write_json(got, tmp_path / "m" / "metrics.json")
    assert json.loads(out.read_text()) == got


def test_evaluate_model_on_a_split():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model is fastest on one thread, even on a busy machine
    cfg = preset("tiny").replace(
        encoder_kwargs=dict(img_size=32),
        decoder=dict(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=2048),
    )
    model = CaptionModel(cfg)
    records = SyntheticWorld().split("test", 5)
    try:
        metrics, rows = evaluate_model(model, records, batch_size=2, meteor=False)
    finally:
        torch.set_num_threads(threads)
    assert metrics["n_images"] == 5 and 0.0 <= metrics["exact_match"] <= 1.0
    assert [r["references"] for r in rows] == [[ex.caption] for ex in records]
    assert rows[0]["image_id"] == records[0].image_id
    assert all(isinstance(r["prediction"], str) for r in rows)
