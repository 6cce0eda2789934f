"""Training: AdamW, linear warmup then cosine decay (set every optimizer step), gradient
clipping, bf16 autocast on CUDA, validation each epoch, best-checkpoint keeping, exact resume.

    trainer = Trainer(model, train_records, val_records, TrainConfig(out_dir="runs/x", max_steps=1000))
    summary = trainer.fit()

The output directory holds
    best/                the checkpoint with the best validation metric (core_model.checkpoint format)
    last/                the latest checkpoint plus optimizer.safetensors and trainer_state.json,
                         everything `resume` needs (tensors in safetensors, the rest JSON; no pickle)
    metrics.jsonl        one JSON object per logged train step and per validation

With a frozen encoder the encoder's features for every training and validation image are
computed once before the first step and kept, so no epoch runs the encoder again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from .config import from_fields
from .datasets import CaptionDataset, Collate, ReadBytes, examples_to_records
from .inference import resolve_device
from .model import CaptionModel
from .preprocess import Preprocessor
from .tokenizer import CaptionTokenizer

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainConfig:
    """How to train. Saved with every checkpoint's provenance."""

    out_dir: str = "var/models/run"  # best/, last/ and metrics.jsonl go here
    epochs: int = 1  # passes over the training pairs (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps in all (0 = epochs decide)
    batch_size: int = 64  # pairs per optimizer step
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps
    weight_decay: float = (
        0.05  # AdamW decay on weight matrices (not biases, norms, embeddings' 1-d)
    )
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.98
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    num_workers: int = 0  # DataLoader worker processes decoding images
    seed: int = 0  # data order and initial RNG
    val_max_images: int = 500  # validation images (loss and greedy captions scored)
    eval_every: int = 0  # also validate every N steps (0 = once per epoch only)
    log_every: int = 10  # steps between metrics.jsonl lines
    best_metric: str = (
        "val_loss"  # "val_loss" (lower is better) or "exact_match" / "cider" (higher)
    )
    cache_features: bool = True  # frozen encoder: compute features once, reuse every epoch
    feature_cache_max_gb: float = (
        4.0  # run the encoder every step instead when the cache would be bigger
    )
    progress: bool = True  # tqdm progress bar
    device: str = ""  # "" = cuda when available, else cpu (never MPS on a CUDA machine)

    def __post_init__(self) -> None:
        if self.best_metric not in ("val_loss", "exact_match", "cider"):
            raise ValueError(
                f"best_metric must be val_loss, exact_match or cider, not {self.best_metric!r}"
            )
        if self.batch_size < 1 or self.epochs < 1 or self.max_steps < 0:
            raise ValueError("batch_size and epochs must be >= 1 and max_steps >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return from_fields(cls, d, "TrainConfig")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: warmup, then cosine."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step + 1 - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - floor)


def make_optimizer(model: CaptionModel, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class Trainer:
    def __init__(
        self,
        model: CaptionModel,
        train_records: Sequence,  # CaptionRecord / SyntheticExample / (image, caption)
        val_records: Sequence | None,  # None or empty: no validation (best = last)
        cfg: TrainConfig,
        read_bytes: ReadBytes | None = None,  # object-store getter for image keys
        provenance: dict[str, Any] | None = None,  # extra facts saved with every checkpoint
        log: Callable[[str], None] = print,  # where one-line notices go
    ):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.tokenizer = CaptionTokenizer(model.cfg.decoder_config.vocab_size)
        self.preprocess = Preprocessor.for_encoder(model.encoder)
        self.out = Path(cfg.out_dir)
        self.provenance = dict(provenance or {})
        self.log = log
        mk = lambda recs: CaptionDataset(  # noqa: E731
            recs, self.tokenizer, self.preprocess, model.cfg.max_caption_tokens, read_bytes
        )
        self.train_set = mk(train_records)
        if len(self.train_set) == 0:
            raise ValueError("no training examples")
        self.val_records = list(val_records[: cfg.val_max_images]) if val_records else []
        self.val_set = mk(self.val_records) if self.val_records else None
        self.optimizer = make_optimizer(self.model, cfg)
        self.step = 0  # optimizer steps done
        self._saved_step = -1  # step of the latest last/ save
        self.best: dict[str, Any] | None = None  # validation metrics of best/
        self.features: dict[
            str, torch.Tensor
        ] = {}  # "train"/"val" -> (N_images, ...) cached features
        B = cfg.batch_size
        n = len(self.train_set)
        self.steps_per_epoch = n // B if n >= B else 1
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

    # --- data ---------------------------------------------------------------------------------

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches of dataset indices: a permutation seeded by (seed, epoch)."""
        n, B = len(self.train_set), self.cfg.batch_size
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        if n < B:
            return [perm]
        return [perm[k * B : (k + 1) * B] for k in range(self.steps_per_epoch)]

    def loader(self, dataset: CaptionDataset, batch_sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=Collate(self.tokenizer.eos_id),
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def cache_features(self) -> None:
        """Frozen encoder: encode every train/val image once; items then skip decoding."""
        if not (self.model.cfg.freeze_encoder and self.cfg.cache_features) or self.features:
            return
        self.model.eval()
        for name, ds in (("train", self.train_set), ("val", self.val_set)):
            if ds is None:
                continue
            n_images = len(ds.records)
            first = self.model.encode(self.preprocess(ds.image(0))[None].to(self.device))
            size_gb = first.numel() * 4 * n_images / 1e9
            if size_gb > self.cfg.feature_cache_max_gb:
                self.log(
                    f"feature cache for {name} would take {size_gb:.1f} GB "
                    f"(> {self.cfg.feature_cache_max_gb}); running the encoder every step"
                )
                self.features.clear()
                return
            feats = torch.empty((n_images, *first.shape[1:]), dtype=torch.float32)
            images = _ImagesOnly(ds)
            loader = DataLoader(
                images, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers
            )
            k = 0
            for pixels in _progress(loader, self.cfg.progress, f"caching {name} features"):
                with self.autocast():
                    f = self.model.encode(pixels.to(self.device))
                feats[k : k + len(f)] = f.float().cpu()
                k += len(f)
            self.features[name] = feats
        for ds in (self.train_set, self.val_set):
            if ds is not None:
                ds.load_pixels = False
        self.model.train()

    def loss(self, batch: dict[str, Any], split: str = "train") -> torch.Tensor:
        ids = batch["input_ids"].to(self.device)
        lengths = batch["lengths"].to(self.device)
        with self.autocast():
            if split in self.features:
                feats = self.features[split][batch["image_index"]].to(self.device)
                _, loss = self.model(ids, lengths, features=feats)
            else:
                _, loss = self.model(ids, lengths, pixels=batch["pixels"].to(self.device))
        return loss

    # --- training -----------------------------------------------------------------------------

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until total_steps (or pause after step `stop_at`, resumable; the schedule still
        spans total_steps); validate each epoch; keep best/ and last/. Returns a summary."""
        cfg = self.cfg
        end = min(self.total_steps, stop_at or self.total_steps)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache_features()
        self.model.train()
        t0 = time.perf_counter()
        bar = _bar(self.total_steps, self.step, cfg.progress)
        last_loss = float("nan")
        smooth = None
        val: dict[str, Any] = {}
        while self.step < end:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            for batch in self.loader(self.train_set, self.batches(epoch)[offset:]):
                lr = lr_at(self.step, self.total_steps, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss = self.loss(batch)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                last_loss = loss.item()
                smooth = last_loss if smooth is None else 0.9 * smooth + 0.1 * last_loss
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{smooth:.3f}", lr=f"{lr:.2e}", epoch=epoch)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self.write_metrics(
                        event="train",
                        step=self.step,
                        epoch=epoch,
                        loss=last_loss,
                        loss_smooth=smooth,
                        lr=lr,
                        elapsed_s=round(time.perf_counter() - t0, 3),
                    )
                end_of_epoch = (
                    self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                )
                if end_of_epoch or (cfg.eval_every and self.step % cfg.eval_every == 0):
                    val = self.validate_and_keep(epoch)
                if self.step >= end:
                    break
        if bar is not None:
            bar.close()
        if self.step < self.total_steps and self._saved_step != self.step:
            self.save_state(self.out / "last", val)  # paused between validations
        elapsed = time.perf_counter() - t0
        return {
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "train_loss": last_loss,
            "train_loss_smooth": smooth,
            "val": val,
            "best": self.best,
            "best_path": str(self.out / "best"),
            "last_path": str(self.out / "last"),
            "elapsed_s": elapsed,
        }

    def validate_and_keep(self, epoch: int) -> dict[str, Any]:
        """Validate, save last/ (with resume state) and best/ when the metric improved."""
        val = self.validate() if self.val_set is not None else {}
        self.write_metrics(event="val", step=self.step, epoch=epoch, **val)
        self.save_state(self.out / "last", val)
        key = self.cfg.best_metric
        lower = key == "val_loss"
        if not val:
            better = True  # nothing to compare: best is the latest
        elif self.best is None or key not in self.best:
            better = True
        else:
            better = val[key] < self.best[key] if lower else val[key] > self.best[key]
        if better:
            self.best = {"step": self.step, **val}
            save_checkpoint(self.model, self.out / "best", self.provenance_now(val))
        self.model.train()
        return val

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Teacher-forced loss and greedy-caption scores on the validation images."""
        from .evaluate import score_captions

        assert self.val_set is not None
        self.model.eval()
        total, count = 0.0, 0
        preds: dict[str, str] = {}
        n_images = len(self.val_records)
        batches = [
            list(range(i, min(i + self.cfg.batch_size, len(self.val_set))))
            for i in range(0, len(self.val_set), self.cfg.batch_size)
        ]
        for batch in self.loader(self.val_set, batches):
            loss = self.loss(batch, "val")
            n_tok = int(batch["lengths"].sum())
            total += loss.item() * n_tok
            count += n_tok
        # greedy captions, one per image (from the cached features when there are some)
        if "val" in self.features:
            chunks = self.features["val"].split(self.cfg.batch_size)
        else:
            images = _ImagesOnly(self.val_set)
            chunks = DataLoader(
                images, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers
            )
        k = 0
        for chunk in chunks:
            with self.autocast():
                if "val" in self.features:
                    hyps = self.model.generate(features=chunk.to(self.device))
                else:
                    hyps = self.model.generate(pixels=chunk.to(self.device))
            for h in hyps:
                preds[str(k)] = self.tokenizer.decode(h[0].tokens)
                k += 1
        refs = {str(i): list(_captions_of(self.val_records[i])) for i in range(n_images)}
        scores = score_captions(preds, refs)
        self.model.train()
        return {"val_loss": total / max(1, count), **scores}

    # --- state --------------------------------------------------------------------------------

    def provenance_now(self, val: dict[str, Any]) -> dict[str, Any]:
        return {
            **self.provenance,
            "step": self.step,
            "val": val,
            "train_config": self.cfg.to_dict(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def write_metrics(self, **row: Any) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")

    def save_state(self, path: Path, val: dict[str, Any] | None = None) -> Path:
        """Checkpoint + optimizer tensors (safetensors) + step, best and RNG (JSON/safetensors)."""
        from safetensors.torch import save_file

        save_checkpoint(self.model, path, self.provenance_now(val or {}))
        sd = self.optimizer.state_dict()
        tensors = {
            f"state.{pid}.{k}": v.detach().cpu().contiguous()
            for pid, st in sd["state"].items()
            for k, v in st.items()
        }
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        _atomic(path / OPTIMIZER_FILE, lambda p: save_file(tensors, str(p)))
        state = {
            "step": self.step,
            "best": self.best,
            "param_groups": sd["param_groups"],
            "train_config": self.cfg.to_dict(),
            "weights_sha256": read_meta(path)["weights_sha256"],
        }
        _atomic(
            path / STATE_FILE, lambda p: p.write_text(json.dumps(state, indent=2), encoding="utf-8")
        )
        self._saved_step = self.step
        return path

    def load_state(self, path: str | Path) -> None:
        """Restore weights, optimizer, step, best and RNG from a last/ directory."""
        from safetensors.torch import load_file

        path = Path(path)
        if (path / "last").is_dir() and not (path / STATE_FILE).exists():
            path = path / "last"  # accept the run directory too
        try:
            state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(
                f"{path} has no {STATE_FILE}: not a resumable training checkpoint"
            ) from None
        model, meta = load_checkpoint(path, self.device)
        if meta["weights_sha256"] != state["weights_sha256"]:
            raise CheckpointError(
                f"{path}: {STATE_FILE} belongs to other weights (interrupted save?)"
            )
        if model.cfg.to_dict() != self.model.cfg.to_dict():
            raise CheckpointError(f"{path}: the checkpoint's model config differs from this run's")
        self.model.load_state_dict(model.state_dict())
        tensors = load_file(str(path / OPTIMIZER_FILE))
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            if name.startswith("state."):
                _, pid, key = name.split(".", 2)
                opt_state.setdefault(int(pid), {})[key] = t
        groups = state["param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        opt_state = dict(sorted(opt_state.items()))
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.step = int(state["step"])
        self.best = state["best"]


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def train(
    model: CaptionModel,
    train_records: Sequence,
    val_records: Sequence | None,
    cfg: TrainConfig,
    resume: str | Path | None = None,
    read_bytes: ReadBytes | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model` (resuming from a last/ checkpoint when given). Returns fit()'s summary."""
    trainer = Trainer(model, train_records, val_records, cfg, read_bytes, provenance)
    if resume is not None:
        trainer.load_state(resume)
    return trainer.fit()


def fine_tune(
    base_checkpoint: str | Path,
    examples: Sequence[tuple[Any, str]],
    config: TrainConfig | dict[str, Any] | None = None,
    val_examples: Sequence[tuple[Any, str]] | None = None,
    read_bytes: ReadBytes | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the checkpoint at `base_checkpoint` on (image, caption) examples.

    image: PIL image, bytes, or a path / object-store key (with read_bytes). Validation uses
    `val_examples`, or the training examples when none are given (the metrics say which).
    Returns (path of the best checkpoint, metrics). The retraining loop compares candidate and
    active models on its own frozen held-out set; these metrics describe the run itself.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    cfg = config or TrainConfig(out_dir="var/models/finetune", epochs=3, lr=1e-4, warmup_steps=10)
    if not examples:
        raise ValueError("fine_tune needs at least one example")
    model, meta = load_checkpoint(base_checkpoint, resolve_device(cfg.device))
    records = examples_to_records(examples)
    val = examples_to_records(val_examples) if val_examples else records
    provenance = {
        "fine_tuned_from": str(base_checkpoint),
        "base_weights_sha256": meta["weights_sha256"],
        "examples": len(records),
    }
    trainer = Trainer(model, records, val, cfg, read_bytes, provenance, log=lambda s: None)
    before = trainer.validate() if trainer.val_set is not None else {}
    summary = trainer.fit()
    metrics = {
        "examples": len(records),
        "steps": summary["steps"],
        "train_loss": summary["train_loss"],
        "val_source": "val_examples" if val_examples else "train_examples",
        "before": before,
        "after": summary["best"],
        "elapsed_s": summary["elapsed_s"],
    }
    return Path(summary["best_path"]), metrics


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class _ImagesOnly(torch.utils.data.Dataset):
    """Pixels of each distinct image of a CaptionDataset, in record order."""

    def __init__(self, ds: CaptionDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds.records)

    def __getitem__(self, r: int) -> torch.Tensor:
        return self.ds.preprocess(self.ds.image(r))


def _captions_of(record: Any) -> tuple[str, ...]:
    if isinstance(record, tuple):
        return (record[1],) if isinstance(record[1], str) else tuple(record[1])
    return tuple(record.captions)


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="batch", leave=False)


# --------------------------------------------------------------------------------------------
# A whole run from a data spec (the `captioner train` command and bench/demo_quality.py)
# --------------------------------------------------------------------------------------------

# Training recipes per preset: TrainConfig fields used unless the caller overrides them.
RECIPES: dict[str, dict[str, Any]] = {
    # small batches: on the synthetic world more updates beat bigger ones at equal samples
    "demo": dict(max_steps=2400, batch_size=24, lr=7e-4, warmup_steps=50, val_max_images=300),
    "tiny": dict(max_steps=200, batch_size=16, lr=3e-3, warmup_steps=10, val_max_images=50),
    "base": dict(epochs=5, batch_size=64, lr=2e-5, warmup_steps=500),
}


def run_training(
    model_cfg,  # ModelConfig for a fresh model (ignored with init)
    data: str,  # load_records spec: synthetic | karpathy:PATH | jsonl:PATH | csv:PATH | folder:PATH
    out: str | Path,  # the final checkpoint (best by validation) is written here
    cfg: TrainConfig,  # cfg.out_dir holds best/, last/ and metrics.jsonl
    init: str | Path | None = None,  # start from this checkpoint's weights instead
    resume: bool = False,  # continue from cfg.out_dir/last
    image_root: str | Path | None = None,
    read_bytes: ReadBytes | None = None,
    world_cfg=None,  # synthetic.WorldConfig (default world when None)
    synthetic_sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Load data, train, copy the best checkpoint to `out`. Returns fit()'s summary + paths."""
    import dataclasses as dc

    from .datasets import load_records
    from .synthetic import SyntheticWorld, WorldConfig

    world = SyntheticWorld(world_cfg or WorldConfig()) if data == "synthetic" else None
    train_records = load_records(data, "train", image_root, synthetic_sizes, world)
    val_records = load_records(data, "val", image_root, synthetic_sizes, world)
    if init is not None:
        model, _ = load_checkpoint(init)
    else:
        torch.manual_seed(cfg.seed)
        model = CaptionModel(model_cfg)
    provenance: dict[str, Any] = {"data": data, "init": str(init) if init else None}
    if world is not None:
        provenance["world"] = dc.asdict(world.cfg)
    trainer = Trainer(model, train_records, val_records, cfg, read_bytes, provenance)
    if resume:
        trainer.load_state(Path(cfg.out_dir) / "last")
    summary = trainer.fit()
    best, meta = load_checkpoint(summary["best_path"])
    save_checkpoint(best, out, meta["provenance"])
    summary["checkpoint"] = str(out)
    return summary
