"""The model registry: model versions, their checkpoints in the object store, promote and rollback.

A `ModelVersion` row names a checkpoint (`checkpoint_uri`: `s3://...` or `file://...` in the
object store), the version it was fine-tuned from (`parent`), its metrics and a status:
candidate (registered, never or not yet live), active (exactly one: workers caption with it from
their next batch, see `workers.model_runtime`) or retired (was active once).

    version = register(session, Path("var/models/demo"), name="demo", store=store)
    promote(session, version.id)          # the old active version is retired
    rollback(session)                     # the parent (or the previous active) is active again

Functions take a session and never commit (the caller owns the transaction). `promote` and
`rollback` serialise on a database lock (PostgreSQL advisory transaction lock; SQLite has one
writer at a time), retire the old active row and activate the new one in the same transaction,
and the partial unique index `uq_model_versions_one_active` is the last guard: a reader never
sees zero or two active versions. No torch here: the web process uses this module.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from captioner.state.models import ModelStatus, ModelVersion, utcnow

if TYPE_CHECKING:
    from captioner.settings import Settings
    from captioner.storage import ObjectStore

MODELS_PREFIX = "models"
# Any fixed number: the key of the PostgreSQL advisory lock promote/rollback hold.
_PROMOTE_LOCK_KEY = 7_470_001
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class RegistryError(ValueError):
    """A registry call that cannot apply; `status` is the HTTP status it maps to."""

    status = 409


class VersionNotFound(RegistryError):
    status = 404


@dataclass(frozen=True)
class VersionInfo:
    id: int
    name: str
    status: str
    parent_id: int | None
    checkpoint_uri: str
    metrics: dict[str, Any]
    created_at: Any
    promoted_at: Any
    retired_at: Any


def info(version: ModelVersion) -> VersionInfo:
    return VersionInfo(
        id=version.id,
        name=version.name,
        status=ModelStatus(version.status).value,
        parent_id=version.parent_id,
        checkpoint_uri=version.checkpoint_uri,
        metrics=dict(version.metrics or {}),
        created_at=version.created_at,
        promoted_at=version.promoted_at,
        retired_at=version.retired_at,
    )


# --- reading --------------------------------------------------------------------------------


def list_versions(session: Session) -> list[ModelVersion]:
    """Every version, newest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())))


def active_version(session: Session) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.status == ModelStatus.ACTIVE)
    ).first()


def get_version(session: Session, ref: int | str) -> ModelVersion:
    """A version by id or by name; VersionNotFound otherwise."""
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        row = session.get(ModelVersion, int(ref))
        if row is None and isinstance(ref, str):
            row = session.scalars(select(ModelVersion).where(ModelVersion.name == ref)).first()
    else:
        row = session.scalars(select(ModelVersion).where(ModelVersion.name == ref)).first()
    if row is None:
        raise VersionNotFound(f"no model version {ref!r}")
    return row


# --- registering ----------------------------------------------------------------------------


def upload_checkpoint(store: ObjectStore, checkpoint: Path, name: str) -> str:
    """Copy a checkpoint directory to `models/<name>/` in the store; returns its URI.

    The weights go first and config.json last, so a reader that finds config.json finds a
    whole checkpoint.
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise RegistryError(f"{checkpoint} is not a checkpoint directory (no config.json)")
    files = sorted(p for p in checkpoint.iterdir() if p.is_file() and not p.name.startswith("."))
    files.sort(key=lambda p: p.name == "config.json")
    for path in files:
        store.put(f"{MODELS_PREFIX}/{name}/{path.name}", path.read_bytes())
    return store.uri(f"{MODELS_PREFIX}/{name}")


def register(
    session: Session,
    checkpoint: Path,
    *,
    name: str,
    store: ObjectStore | None,
    parent_id: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """A new candidate version for a local checkpoint, uploaded to the store first (or, with
    `store=None`, referenced where it is)."""
    if not _NAME.match(name):
        raise RegistryError(f"invalid version name {name!r}: letters, digits, '.', '_', '-'")
    if session.scalars(select(ModelVersion.id).where(ModelVersion.name == name)).first():
        raise RegistryError(f"a model version named {name!r} exists")
    checkpoint = Path(checkpoint)
    try:
        meta = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{checkpoint} is not a checkpoint directory: {exc}") from None
    uri = (
        upload_checkpoint(store, checkpoint, name)
        if store is not None
        else str(checkpoint.resolve())
    )
    version = ModelVersion(
        name=name,
        parent_id=parent_id,
        checkpoint_uri=uri,
        config=meta.get("model_config", {}),
        metrics={"weights_sha256": meta.get("weights_sha256"), **(metrics or {})},
        status=ModelStatus.CANDIDATE,
    )
    session.add(version)
    session.flush()
    return version


def local_checkpoint(uri: str, settings: Settings, name: str) -> Path:
    """A local directory holding the checkpoint at `uri` (downloaded once for s3:// URIs)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if uri.startswith("s3://"):
        from captioner.storage import open_store

        target = Path(settings.checkpoint_dir or ".") / ".cache" / name
        if (target / "config.json").exists():
            return target
        store = open_store(uri, settings)
        tmp = target.with_name(f"{target.name}.partial")
        for key in store.list(""):
            path = tmp / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(store.get(key))
        tmp.rename(target)
        return target
    return Path(uri)


# --- promote and rollback -------------------------------------------------------------------


def _lock(session: Session) -> None:
    """Serialise promote/rollback. PostgreSQL: an advisory lock held until the transaction ends.
    SQLite: take the write lock now (an empty UPDATE), so the read below is current."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PROMOTE_LOCK_KEY})
    else:
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.id == -1)
            .values(status=ModelVersion.status)
            .execution_options(synchronize_session=False)
        )


def _activate(
    session: Session, version_id: int, *, rolled_back_from: int | None = None
) -> ModelVersion:
    now = utcnow()
    current = active_version(session)
    if current is not None and current.id == version_id:
        return current
    # Retire first, then activate: the unique index never sees two active rows.
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == ModelStatus.ACTIVE)
        .values(status=ModelStatus.RETIRED, retired_at=now)
        .execution_options(synchronize_session=False)
    )
    done = session.execute(
        update(ModelVersion)
        .where(ModelVersion.id == version_id, ModelVersion.status != ModelStatus.ACTIVE)
        .values(status=ModelStatus.ACTIVE, promoted_at=now, retired_at=None)
        .returning(ModelVersion.id)
        .execution_options(synchronize_session=False)
    ).first()
    if done is None:
        raise VersionNotFound(f"no model version {version_id}")
    session.expire_all()
    version = session.get(ModelVersion, version_id)
    assert version is not None
    if rolled_back_from is not None:
        version.metrics = {**(version.metrics or {}), "rolled_back_from": rolled_back_from}
        session.flush()
    return version


def promote(session: Session, ref: int | str) -> ModelVersion:
    """Make the version `ref` (id or name) the one active version; the old one is retired."""
    _lock(session)
    version = get_version(session, ref)
    return _activate(session, version.id)


def rollback_target(session: Session, current: ModelVersion) -> ModelVersion | None:
    """What `rollback` would activate: the active version's parent, else the version that
    was active most recently before it."""
    if current.parent_id is not None:
        parent = session.get(ModelVersion, current.parent_id)
        if parent is not None:
            return parent
    return session.scalars(
        select(ModelVersion)
        .where(
            ModelVersion.id != current.id,
            ModelVersion.status == ModelStatus.RETIRED,
            ModelVersion.promoted_at.is_not(None),
        )
        .order_by(ModelVersion.retired_at.desc(), ModelVersion.id.desc())
        .limit(1)
    ).first()


def rollback(session: Session) -> ModelVersion:
    """Re-activate the active version's parent (or the previous active one); returns it."""
    _lock(session)
    current = active_version(session)
    if current is None:
        raise RegistryError("no active model version to roll back")
    target = rollback_target(session, current)
    if target is None:
        raise RegistryError(
            f"version {current.name} has no parent or earlier version to go back to"
        )
    return _activate(session, target.id, rolled_back_from=current.id)


def settings_checkpoint_name(checkpoint: Path) -> str | None:
    """The version name the settings checkpoint is registered under (by its weights digest,
    as `workers.model_runtime.register_checkpoint` names it); None without a checkpoint there."""
    if not (checkpoint / "config.json").is_file():
        return None
    meta = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    return f"checkpoint-{str(meta.get('weights_sha256', ''))[:16]}"


def baseline_version(session: Session, settings: Settings) -> ModelVersion | None:
    """The version a new run fine-tunes from: the active one; without one, the checkpoint
    workers fall back to (`Settings.model_checkpoint`), registered in place as a candidate."""
    active = active_version(session)
    if active is not None:
        return active
    checkpoint = Path(settings.model_checkpoint or "")
    name = settings_checkpoint_name(checkpoint)
    if name is None:
        return None
    row = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).first()
    if row is None:
        row = register(session, checkpoint, name=name, store=None)
    return row


class ServingSource:
    """Where the model workers caption with comes from (`Serving.source`)."""

    ACTIVE = "active"  # the active registry version
    PINNED = "pinned"  # Settings.active_model names a version
    SETTINGS_CHECKPOINT = "settings_checkpoint"  # no active version: Settings.model_checkpoint
    NONE = "none"  # nothing to caption with


@dataclass(frozen=True)
class Serving:
    """What workers caption with now, as the Models page shows it: the version (None when the
    settings checkpoint was not registered yet), where it comes from, the checkpoint path for
    a settings checkpoint, and the version a rollback would re-activate (None: nothing to roll
    back to)."""

    version: ModelVersion | None
    source: str
    checkpoint: str | None = None
    rollback_to: ModelVersion | None = None


def serving(session: Session, settings: Settings) -> Serving:
    """What workers caption with now (read only: nothing is registered here)."""
    active = active_version(session)
    rollback_to = rollback_target(session, active) if active is not None else None
    if settings.active_model:
        pinned = session.scalars(
            select(ModelVersion).where(ModelVersion.name == settings.active_model)
        ).first()
        return Serving(pinned, ServingSource.PINNED, rollback_to=rollback_to)
    if active is not None:
        return Serving(active, ServingSource.ACTIVE, rollback_to=rollback_to)
    checkpoint = Path(settings.model_checkpoint or "")
    name = settings_checkpoint_name(checkpoint)
    if name is None:
        return Serving(None, ServingSource.NONE)
    row = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).first()
    return Serving(row, ServingSource.SETTINGS_CHECKPOINT, checkpoint=str(checkpoint))
