"""Checkpoints: atomic safetensors directories that round-trip exactly and refuse pickles."""

from __future__ import annotations

import json
import os

import pytest
import torch

from core_model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from core_model.config import preset
from core_model.model import CaptionModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return CaptionModel(preset("tiny")).eval()


def test_round_trip_is_bit_exact(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "ckpt", provenance={"step": 7})
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    loaded, meta = load_checkpoint(path)
    assert meta["provenance"] == {"step": 7}
    assert meta["tokenizer"] == {"name": "gpt2-bpe", "vocab_size": 50257}
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    pixels = torch.randn(2, 3, 160, 160)
    assert model.generate(pixels, num_beams=2) == loaded.generate(pixels, num_beams=2)


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(model, tmp_path):
    save_checkpoint(model, tmp_path / "ckpt", provenance={"v": 1})
    save_checkpoint(model, tmp_path / "ckpt", provenance={"v": 2})
    assert os.listdir(tmp_path) == ["ckpt"]
    assert load_checkpoint(tmp_path / "ckpt")[1]["provenance"] == {"v": 2}


def test_failed_save_keeps_the_old_checkpoint(model, tmp_path, monkeypatch):
    save_checkpoint(model, tmp_path / "ckpt", provenance={"v": 1})

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError):
        save_checkpoint(model, tmp_path / "ckpt", provenance={"v": 2})
    assert os.listdir(tmp_path) == ["ckpt"]
    assert load_checkpoint(tmp_path / "ckpt")[1]["provenance"] == {"v": 1}


def test_tampered_weights_are_refused(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "ckpt")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the digest"):
        load_checkpoint(path)


def test_pickle_checkpoint_is_refused(model, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)


def test_pickle_renamed_to_safetensors_is_refused(model, tmp_path):
    """A pickle dressed as model.safetensors, with a matching digest, still never unpickles."""
    import hashlib

    path = save_checkpoint(model, tmp_path / "ckpt")
    torch.save(model.state_dict(), path / "model.safetensors")
    meta = json.loads((path / "config.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot read model.safetensors"):
        load_checkpoint(path)


def test_missing_and_malformed_checkpoints_have_clear_errors(model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    path = save_checkpoint(model, tmp_path / "ckpt")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config_are_refused(model, tmp_path):
    import hashlib

    path = save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())
    meta["model_config"]["n_prefix_tokens"] = 3
    (path / "config.json").write_text(json.dumps(meta))
    assert (
        meta["weights_sha256"]
        == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    )
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)
