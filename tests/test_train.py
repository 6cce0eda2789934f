"""The training loop: exact resume, feature caching, per-step LR schedule, fine_tune, overfitting."""

import json

import pytest
import torch

from core_model import train as train_mod
from core_model.checkpoint import load_checkpoint
from core_model.config import preset
from core_model.inference import resolve_device
from core_model.model import CaptionModel
from core_model.synthetic import SyntheticWorld
from core_model.train import TrainConfig, Trainer, fine_tune, lr_at


def tiny_cfg(**changes):
    """A tiny captioner on 32 px images with a 2,048-token vocabulary: fast on a CPU."""
    cfg = preset("tiny").replace(
        encoder_kwargs=dict(img_size=32, depth=2),
        decoder=dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=2048),
        dropout=0.1,
    )
    return cfg.replace(**changes)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not stall on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld()


def make_trainer(tmp_path, world, model=None, n_train=24, n_val=4, **cfg):
    torch.manual_seed(0)
    model = model or CaptionModel(tiny_cfg(freeze_encoder=False))
    defaults = dict(
        out_dir=str(tmp_path),
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        progress=False,
        log_every=1,
        val_max_images=n_val,
    )
    tc = TrainConfig(**{**defaults, **cfg})
    return Trainer(
        model, world.split("train", n_train), world.split("val", n_val), tc, log=lambda s: None
    )


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_continues_from_the_saved_step_with_identical_state(tmp_path, world):
    straight = make_trainer(tmp_path / "a", world, max_steps=6)
    straight.fit()

    first = make_trainer(tmp_path / "b", world, max_steps=6)
    first.fit(stop_at=3)  # pause half way; the schedule still spans 6 steps
    saved = json.loads((tmp_path / "b" / "last" / "trainer_state.json").read_text())
    assert saved["step"] == 3

    resumed = make_trainer(tmp_path / "b", world, max_steps=6)
    resumed.load_state(tmp_path / "b")  # the run directory or its last/ both work
    assert resumed.step == 3
    got, want = resumed.optimizer.state_dict()["state"], first.optimizer.state_dict()["state"]
    assert set(got) == set(want)
    for pid in want:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[pid][key], want[pid][key])
    resumed.fit()
    assert resumed.step == 6
    ws, wr = weights(straight.model), weights(resumed.model)
    for k in ws:
        assert torch.allclose(ws[k], wr[k], atol=1e-6), k
    steps = [
        json.loads(line)["step"]
        for line in open(tmp_path / "b" / "metrics.jsonl")
        if '"train"' in line
    ]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resumed run continued at step 4, not 1


def test_resume_refuses_foreign_or_incomplete_state(tmp_path, world):
    t = make_trainer(tmp_path, world, max_steps=1)
    t.fit()
    (tmp_path / "last" / "trainer_state.json").unlink()
    with pytest.raises(train_mod.CheckpointError, match="trainer_state"):
        make_trainer(tmp_path, world, max_steps=2).load_state(tmp_path / "last")


def test_feature_cache_gives_the_same_loss_and_skips_the_encoder(tmp_path, world):
    torch.manual_seed(0)
    model = CaptionModel(tiny_cfg(freeze_encoder=True, dropout=0.0))
    t = make_trainer(tmp_path, world, model=model, max_steps=4)
    batch_ids = t.batches(0)[0]
    with_pixels = t.train_set.__class__.__getitem__
    items = [with_pixels(t.train_set, i) for i in batch_ids]
    batch = train_mod.Collate(t.tokenizer.eos_id)(items)
    model.eval()
    with torch.no_grad():
        loss_encoder = t.loss(batch).item()
        t.cache_features()
        assert set(t.features) == {"train", "val"}
        model.eval()
        loss_cached = t.loss(batch).item()
    assert loss_cached == pytest.approx(loss_encoder, rel=1e-5, abs=1e-6)

    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    orig = model.encoder.forward_features

    def counting(x):
        calls.append(1)
        return orig(x)

    model.encoder.forward_features = counting
    t.cfg.epochs = 3
    t.total_steps = 3 * t.steps_per_epoch
    summary = t.fit()
    assert summary["steps"] == 9 and calls == []  # three epochs and validation, no encoder run


def test_lr_schedule_steps_within_an_epoch(tmp_path, world):
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # cosine decay, every step
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)

    t = make_trainer(tmp_path, world, n_train=48, epochs=1, warmup_steps=2)
    assert t.steps_per_epoch == 6
    t.fit()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_lrs = [r["lr"] for r in rows if r["event"] == "train" and r["epoch"] == 0]
    assert len(train_lrs) == 6 and len(set(train_lrs)) == 6
    assert train_lrs == pytest.approx([lr_at(s, 6, t.cfg) for s in range(6)])
    val = [r for r in rows if r["event"] == "val"]
    assert len(val) == 1 and {"val_loss", "exact_match", "cider", "bleu_4"} <= set(val[0])
    assert (tmp_path / "best" / "model.safetensors").exists()


def test_fine_tune_returns_a_loadable_checkpoint_and_metrics(tmp_path, world):
    base = make_trainer(tmp_path / "base", world, max_steps=2)
    base.fit()
    examples = [(ex.image, ex.caption) for ex in world.split("concept", 6)]  # PIL images
    examples.append((examples[0][0].tobytes() and _png_bytes(examples[0][0]), examples[0][1]))
    cfg = TrainConfig(
        out_dir=str(tmp_path / "ft"),
        epochs=2,
        batch_size=4,
        lr=1e-3,
        warmup_steps=1,
        progress=False,
    )
    path, metrics = fine_tune(tmp_path / "base" / "best", examples, cfg)
    model, meta = load_checkpoint(path)
    assert meta["provenance"]["fine_tuned_from"] == str(tmp_path / "base" / "best")
    assert meta["provenance"]["examples"] == 7
    assert metrics["examples"] == 7 and metrics["steps"] == 2 * (7 // 4)
    assert metrics["val_source"] == "train_examples"
    assert {"val_loss", "exact_match", "cider"} <= set(metrics["after"]) and metrics["before"]
    assert model.cfg == base.model.cfg


def _png_bytes(im) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_tiny_model_overfits_a_few_synthetic_examples(tmp_path, world):
    torch.manual_seed(0)
    model = CaptionModel(tiny_cfg(freeze_encoder=False, dropout=0.0))
    records = world.split("train", 2)
    assert records[0].caption != records[1].caption
    train = [(ex.image, ex.caption) for ex in records] * 16
    tc = TrainConfig(
        out_dir=str(tmp_path),
        max_steps=120,
        batch_size=4,
        lr=1e-2,
        warmup_steps=10,
        progress=False,
        log_every=20,
        val_max_images=2,
        best_metric="exact_match",
    )
    summary = Trainer(model, train, records, tc, log=lambda s: None).fit()
    # below log(2) / caption length: the model must read the image to tell the two apart
    assert summary["train_loss"] < 0.02
    assert summary["val"]["exact_match"] == 1.0  # greedy captions reproduce both captions


def test_device_selection_never_picks_mps_on_a_cuda_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("").type == "cuda"
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("").type == "cpu"
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cpu").type == "cpu"
