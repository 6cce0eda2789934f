"""The model a worker process captions with: loaded lazily, once, and swapped on promotion.

A worker asks `ModelRuntime.wanted(session)` before every batch, then captions inside
`ModelRuntime.use(wanted)`. The question is one small SELECT:
which model version is active (or pinned by `Settings.active_model`)? If it is the one already
loaded, nothing else happens; if a newer version was promoted, its checkpoint is loaded and
replaces the old one, between batches, without restarting the process. When the database has
no active version, the checkpoint named by `Settings.model_checkpoint` is used, registered as a
(non-active) `ModelVersion` row so its captions have a version to belong to.

A pipelined worker (`CAPTIONER_WORKER_PIPELINE_DEPTH` > 1, Celery `threads` pool) runs several
batches at once in one process, all sharing this runtime:

- `use(wanted)` hands a batch the model to caption with and holds it until the batch leaves the
  block. A switch to another version waits until no batch holds the current one, and batches
  wait while a model loads: two models never share the GPU, and no batch sees its model
  replaced under it. A batch whose `wanted` was read before the one that loaded the current
  model is stale and takes the current model instead of switching back.
- `model_lock`: one batch at a time does device work (nvJPEG decode, the host-to-device copy,
  the model). On CUDA the fast path captures CUDA graphs, during which no other thread may
  touch the device; on the CPU two batches would only fight over the same cores. Fetching,
  CPU decoding and saving are outside it, so they overlap with another batch's model run.

torch is imported here, never at the import of `workers.caption`, so the sweeper and beat run
without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from captioner.learning.registry import local_checkpoint
from captioner.state.models import ModelStatus, ModelVersion

if TYPE_CHECKING:
    from captioner.settings import Settings
    from core_model.inference import ImageCaptioner

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """No usable model: no active version and no checkpoint at `Settings.model_checkpoint`."""


class WantedModel(NamedTuple):
    """The model version that should caption now, as `ModelRuntime.wanted` read it."""

    version_id: int
    name: str
    checkpoint_uri: str


@dataclass(frozen=True)
class LoadedModel:
    """A model in memory, ready to caption, and the version it is."""

    version_id: int
    version_name: str
    checkpoint: str
    captioner: ImageCaptioner


def default_version_name(checkpoint: Path) -> str:
    """The ModelVersion name a settings checkpoint is registered under (by its weights digest)."""
    from core_model.checkpoint import read_meta

    meta = read_meta(checkpoint)
    return f"checkpoint-{str(meta.get('weights_sha256', ''))[:16]}"


def register_checkpoint(session: Session, checkpoint: Path) -> ModelVersion:
    """The ModelVersion row of a local checkpoint, created (not active) if missing."""
    from core_model.checkpoint import read_meta

    name = default_version_name(checkpoint)
    row = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).first()
    if row is not None:
        return row
    meta = read_meta(checkpoint)
    row = ModelVersion(
        name=name,
        checkpoint_uri=str(checkpoint.resolve()),
        config=meta.get("model_config", {}),
        metrics={},
        status=ModelStatus.CANDIDATE,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # another worker registered it first
        row = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).one()
    return row


class _Move(Enum):
    """What a batch asking for a model does next (`ModelRuntime._next_move`)."""

    USE = "use"  # the loaded model fits: hold it
    LOAD = "load"  # nobody holds the loaded model: load the wanted one
    WAIT = "wait"  # a load is in progress, or a switch goes first
    WAIT_TO_SWITCH = "wait_to_switch"  # another model is wanted: wait until nobody holds it


@dataclass(frozen=True)
class _Turn:
    """A batch's turn at the model: use the loaded one (`held`, now counted as a user) or load
    the wanted one (`_switching` is set for it)."""

    move: _Move  # USE or LOAD
    held: LoadedModel | None = None  # with USE: the model the batch holds


def _log_switch(previous: LoadedModel | None, new: LoadedModel, uri: str) -> None:
    """Log a load (`previous` None: the first model of this process) or a switch."""
    if previous is None:
        log.info("model loaded: version %s (%s) from %s", new.version_name, new.version_id, uri)
        return
    log.info(
        "model switched: version %s (%s) -> %s (%s), without restart",
        previous.version_name,
        previous.version_id,
        new.version_name,
        new.version_id,
    )


class ModelRuntime:
    """One per worker process, shared by the batches it runs at once (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loaded: LoadedModel | None = None
        self._loaded_as_of = float("-inf")  # when the `wanted` that chose `_loaded` was read
        self._cond = threading.Condition()
        self._users = 0  # batches inside `use()`, all holding `_loaded`
        self._switching = False  # a load is in progress (`_loaded` is None meanwhile)
        self._switches_waiting = 0  # batches waiting for the users to leave, to switch
        # One batch at a time runs device work and the model (see the module docstring).
        self.model_lock = threading.Lock()

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def wanted(self, session: Session) -> WantedModel:
        """The model version that should caption now."""
        query = select(ModelVersion.id, ModelVersion.name, ModelVersion.checkpoint_uri)
        if self.settings.active_model:
            row = session.execute(
                query.where(ModelVersion.name == self.settings.active_model)
            ).first()
            if row is None:
                raise ModelUnavailable(
                    f"model version {self.settings.active_model!r} (CAPTIONER_ACTIVE_MODEL) "
                    "is not in the database"
                )
            return WantedModel(row[0], row[1], row[2])
        row = session.execute(query.where(ModelVersion.status == ModelStatus.ACTIVE)).first()
        if row is not None:
            return WantedModel(row[0], row[1], row[2])
        checkpoint = Path(self.settings.model_checkpoint or "")
        if not (checkpoint / "config.json").exists():
            raise ModelUnavailable(
                f"no active model version in the database and no checkpoint at {checkpoint} "
                "(set CAPTIONER_MODEL_CHECKPOINT, or promote a model version)"
            )
        version = register_checkpoint(session, checkpoint)
        return WantedModel(version.id, version.name, str(checkpoint))

    def ensure(self, wanted: WantedModel, as_of: float | None = None) -> LoadedModel:
        """Load the model `wanted` (from `wanted()`) unless it is the one already loaded.

        Separate from `wanted` so a caller can end its transaction before a slow load. It does
        not hold the model: a batch that captions with it uses `use()`.
        """
        with self.use(wanted, as_of) as loaded:
            return loaded

    @contextmanager
    def use(self, wanted: WantedModel, as_of: float | None = None) -> Iterator[LoadedModel]:
        """The model `wanted` (loaded or switched to first if needed), held until the block ends.

        `as_of`: the `time.monotonic()` taken before `wanted` was read (default: now). If the
        loaded model was chosen by a later read, `wanted` is stale and the loaded model is used.
        """
        loaded = self._acquire(wanted, time.monotonic() if as_of is None else as_of)
        try:
            yield loaded
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def _acquire(self, wanted: WantedModel, as_of: float) -> LoadedModel:
        """The model `wanted`, held (one more user): the loaded one if it fits, else loaded
        here once no batch holds the old one."""
        version_id, name, uri = wanted
        turn = self._take_turn(version_id, as_of)
        if turn.move is _Move.USE and turn.held is not None:
            return turn.held
        previous = self._loaded
        new = self._load_in_turn(WantedModel(version_id, name, uri))
        self._install(new, as_of)
        _log_switch(previous, new, uri)
        return new

    def _fits(self, version_id: int, as_of: float) -> bool:
        """The loaded model serves a batch that wants `version_id` (read at `as_of`): it is that
        version, or it was chosen by a later read (the batch's `wanted` is stale)."""
        loaded = self._loaded
        return loaded is not None and (
            loaded.version_id == version_id or as_of < self._loaded_as_of
        )

    def _next_move(self, version_id: int, as_of: float, waiting_to_switch: bool) -> _Move:
        """What a batch does now; called under `_cond`."""
        if self._switching:
            return _Move.WAIT
        if self._fits(version_id, as_of):
            # A batch waiting to switch goes first (no new users of the old one).
            if waiting_to_switch or not self._switches_waiting:
                return _Move.USE
            return _Move.WAIT
        if self._users == 0:
            return _Move.LOAD
        return _Move.WAIT_TO_SWITCH

    def _take_turn(self, version_id: int, as_of: float) -> _Turn:
        """Wait until the loaded model fits (then hold it) or no batch holds it (then it is this
        batch's to load: `_switching` is set)."""
        waiting_to_switch = False
        with self._cond:
            try:
                while True:
                    move = self._next_move(version_id, as_of, waiting_to_switch)
                    if move is _Move.USE:
                        self._users += 1
                        return _Turn(_Move.USE, held=self._loaded)
                    if move is _Move.LOAD:
                        self._switching = True
                        return _Turn(_Move.LOAD)
                    if move is _Move.WAIT_TO_SWITCH and not waiting_to_switch:
                        waiting_to_switch = True
                        self._switches_waiting += 1
                    self._cond.wait()
            finally:
                if waiting_to_switch:
                    self._switches_waiting -= 1
                    self._cond.notify_all()  # batches held back for this switch look again

    def _load_in_turn(self, wanted: WantedModel) -> LoadedModel:
        """Load `wanted` in this batch's turn; a failed load ends the turn for the next batch."""
        try:
            return self._load(wanted.version_id, wanted.name, wanted.checkpoint_uri)
        except BaseException:
            with self._cond:
                self._switching = False
                self._cond.notify_all()
            raise

    def _install(self, new: LoadedModel, as_of: float) -> None:
        """Make `new` the loaded model, held by the batch that loaded it, and end the turn."""
        with self._cond:
            self._loaded, self._loaded_as_of = new, as_of
            self._switching = False
            self._users += 1
            self._cond.notify_all()

    def _load(self, version_id: int, name: str, uri: str) -> LoadedModel:
        import torch

        from core_model.inference import ImageCaptioner

        path = local_checkpoint(uri, self.settings, name)
        # Drop the old model before loading the new one, so two never share the GPU.
        self._loaded = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        captioner = ImageCaptioner.from_checkpoint(
            path, device=self.settings.device, batch_size=self.settings.batch_size
        )
        return LoadedModel(version_id, name, str(path), captioner)

    def decode_options(self, job_options: Mapping[str, Any] | None = None) -> Any:
        """How to decode one batch: the job's `num_beams` / `n_best` (a batch belongs to one
        job), else the settings' (`CAPTIONER_CAPTION_NUM_BEAMS` / `_N_BEST`, 3 and 3 unless
        set); both capped at `MAX_NUM_BEAMS`, and never more alternatives than beams."""
        from core_model.inference import DecodeOptions

        s = self.settings
        options = job_options or {}
        beams = _option(options.get("num_beams"), s.caption_num_beams)
        n_best = _option(options.get("n_best"), s.caption_n_best)
        return DecodeOptions(
            num_beams=beams,
            n_best=min(n_best, beams),
            max_new_tokens=s.caption_max_new_tokens,
        )


MAX_NUM_BEAMS = 8  # beams and alternatives per image, whatever a job asks for


def _option(value: Any, default: int) -> int:
    """A job's beam or n-best option as an int in [1, MAX_NUM_BEAMS]; `default` when the job
    has none or it is not a number."""
    try:
        n = int(value) if value is not None else int(default)
    except (TypeError, ValueError):
        n = int(default)
    return max(1, min(n, MAX_NUM_BEAMS))
