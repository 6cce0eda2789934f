"""The model a worker process captions with: loaded lazily, once, and swapped on promotion.

A worker asks `ModelRuntime.current(session)` before every batch. That is one small SELECT:
which model version is active (or pinned by `Settings.active_model`)? If it is the one already
loaded, nothing else happens; if a newer version was promoted, its checkpoint is loaded and
replaces the old one, between batches, without restarting the process. When the database has
no active version, the checkpoint named by `Settings.model_checkpoint` is used, registered as a
(non-active) `ModelVersion` row so its captions have a version to belong to.

torch is imported here, never at the import of `workers.tasks`, so the sweeper and beat run
without it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from captioner.models import ModelStatus, ModelVersion
from captioner.registry import local_checkpoint

if TYPE_CHECKING:
    from captioner.settings import Settings
    from core_model.inference import ImageCaptioner

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """No usable model: no active version and no checkpoint at `Settings.model_checkpoint`."""


@dataclass(frozen=True)
class LoadedModel:
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


class ModelRuntime:
    """One per worker process. Thread-safe enough for a solo pool (one batch at a time)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loaded: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def wanted(self, session: Session) -> tuple[int, str, str]:
        """(version id, name, checkpoint uri) of the model that should caption now."""
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
            return row[0], row[1], row[2]
        row = session.execute(query.where(ModelVersion.status == ModelStatus.ACTIVE)).first()
        if row is not None:
            return row[0], row[1], row[2]
        checkpoint = Path(self.settings.model_checkpoint or "")
        if not (checkpoint / "config.json").exists():
            raise ModelUnavailable(
                f"no active model version in the database and no checkpoint at {checkpoint} "
                "(set CAPTIONER_MODEL_CHECKPOINT, or promote a model version)"
            )
        version = register_checkpoint(session, checkpoint)
        return version.id, version.name, str(checkpoint)

    def current(self, session: Session) -> LoadedModel:
        """The model to caption the next batch with, (re)loading it if the active one changed."""
        return self.ensure(self.wanted(session))

    def ensure(self, wanted: tuple[int, str, str]) -> LoadedModel:
        """Load the model `wanted` (from `wanted()`) unless it is the one already loaded.

        Separate from `wanted` so a caller can end its transaction before a slow load.
        """
        version_id, name, uri = wanted
        with self._lock:
            loaded = self._loaded
            if loaded is not None and loaded.version_id == version_id:
                return loaded
            self._loaded = self._load(version_id, name, uri)
            if loaded is None:
                log.info("model loaded: version %s (%s) from %s", name, version_id, uri)
            else:
                log.info(
                    "model switched: version %s (%s) -> %s (%s), without restart",
                    loaded.version_name,
                    loaded.version_id,
                    name,
                    version_id,
                )
            return self._loaded

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

    def decode_options(self) -> Any:
        from core_model.inference import DecodeOptions

        s = self.settings
        return DecodeOptions(
            num_beams=s.caption_num_beams,
            n_best=min(s.caption_n_best, s.caption_num_beams),
            max_new_tokens=s.caption_max_new_tokens,
        )
