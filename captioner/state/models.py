"""The SQL schema: the single source of truth shared by the dashboard, workers and retraining.

Typed SQLAlchemy 2.0 models. Statuses are Python `StrEnum`s stored as short strings with a
CHECK constraint (non-native enums: adding a value never needs an `ALTER TYPE`). All times are
timezone-aware UTC. Reviews are append-only: an edit is a new row, the current review of an
image is the one with the highest id.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from captioner.state.db import metadata


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zone type and hands back naive values; this normalises binds to UTC
    and marks loaded values as UTC, so comparisons like `lease_until < now` mean the same
    thing on SQLite and PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC datetime")
        value = value.astimezone(UTC)
        # SQLite compares datetimes as text: store them all in one offset-free form.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _status(enum_cls: type[enum.Enum], name: str) -> Enum:
    """A non-native enum column type: VARCHAR plus a named CHECK constraint."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [m.value for m in members],
    )


class JobStatus(enum.StrEnum):
    QUEUED = "queued"  # submitted, no image claimed yet
    RUNNING = "running"  # at least one image claimed
    FINISHED = "finished"  # every image captioned or failed
    CANCELLED = "cancelled"


class ImageStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"  # claimed by a worker until lease_until
    CAPTIONED = "captioned"
    FAILED = "failed"  # failure_reason says why


class Split(enum.StrEnum):
    """Which side of the train / held-out line an image's reviews fall on."""

    TRAIN = "train"
    HOLDOUT = "holdout"  # frozen evaluation set: never used for fine-tuning


class ReviewDecision(enum.StrEnum):
    APPROVED = "approved"  # the caption is right as written
    CORRECTED = "corrected"  # the reviewer wrote the right text
    REJECTED = "rejected"  # unusable image or caption; not trained on
    UNDONE = "undone"  # the reviewer took back their last decision and no earlier one remains


class ModelStatus(enum.StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"  # exactly one at a time (partial unique index)
    RETIRED = "retired"


class TrainingStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PROMOTED = "promoted"  # candidate measured better and became active
    REJECTED = "rejected"  # candidate measured no better
    FAILED = "failed"


class ExportStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"  # the file is in the object store at object_key
    FAILED = "failed"  # error says why


class CaptionSource(enum.StrEnum):
    MODEL = "model"  # written by a worker; model_version_id names the model
    IMPORT = "import"  # brought in by a caption import; model_version_id is NULL


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class UserRole(enum.StrEnum):
    ADMIN = "admin"  # everything, including accounts
    REVIEWER = "reviewer"  # sees every job, reviews captions
    SUBMITTER = "submitter"  # submits jobs and sees only their own


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A salted, stretched hash (werkzeug.security); NULL means password login is disabled.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[UserRole] = mapped_column(
        _status(UserRole, "user_role"), default=UserRole.SUBMITTER, server_default="submitter"
    )
    # Set by an admin: this reviewer's reviews are left out of future training runs (and of the
    # held-out evaluation set); NULL means they count.
    training_excluded_at: Mapped[datetime | None]
    # Key prefixes in the object store this user may submit by key or prefix, granted by an
    # admin (beside CAPTIONER_SOURCE_PREFIXES, which every submitter may read).
    source_prefixes: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    # Login sessions carry the epoch they began in; bumping it (logout, a password change, a
    # disable) ends every session of this user at once, wherever its cookie was copied.
    session_epoch: Mapped[int] = mapped_column(default=0, server_default="0")
    # Set by an admin: the user can neither log in nor use a token; NULL means enabled.
    disabled_at: Mapped[datetime | None]

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")


class ApiToken(Base):
    """An API token. Only its SHA-256 is stored; the plain token is shown once, at creation."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(back_populates="tokens")

    @staticmethod
    def hash(raw_token: str) -> str:
        # Tokens are 256 random bits, so a fast unsalted hash is enough (no password stretching).
        return hashlib.sha256(raw_token.encode("utf-8")).hexdigest()

    @classmethod
    def issue(cls, user_id: int, name: str = "") -> tuple[str, ApiToken]:
        """A new token row and the plain token to hand to the user (not stored anywhere)."""
        raw = "cap_" + secrets.token_urlsafe(32)
        return raw, cls(user_id=user_id, name=name, token_sha256=cls.hash(raw))


class Job(Base):
    """A submitted collection of images."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # Where the collection came from, for people: "upload", "zip:photos.zip", "s3://b/p", "urls".
    source: Mapped[str] = mapped_column(Text, default="")
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    priority: Mapped[int] = mapped_column(default=0)
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[JobStatus] = mapped_column(
        _status(JobStatus, "job_status"), default=JobStatus.QUEUED, index=True
    )
    # Counters, kept by captioner.state in the same transaction as every status change they
    # count (UPDATE ... SET x = x + n, never read-modify-write): image_count is every image of
    # the job, the next four split it by image status, unreviewed_count is the images waiting
    # for review (review_score not NULL). `captioner db check` recounts them from the rows.
    image_count: Mapped[int] = mapped_column(default=0)
    queued_count: Mapped[int] = mapped_column(default=0, server_default="0")
    running_count: Mapped[int] = mapped_column(default=0, server_default="0")
    captioned_count: Mapped[int] = mapped_column(default=0)
    failed_count: Mapped[int] = mapped_column(default=0)
    unreviewed_count: Mapped[int] = mapped_column(default=0, server_default="0")
    # Why the job ended early (a background step that failed for good), for people.
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    owner: Mapped[User | None] = relationship()
    images: Mapped[list[Image]] = relationship(back_populates="job", passive_deletes=True)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        # Submitting the same object twice to a job is a no-op, not a second image.
        UniqueConstraint("job_id", "storage_key"),
        # A job's images by status (claims, failures) and a job's pages in id order, from the
        # index alone.
        Index("ix_images_job_id_status_id", "job_id", "status", "id"),
        Index("ix_images_job_id_id", "job_id", "id"),
        # The sweeper looks for running images with an expired lease...
        Index("ix_images_status_lease_until", "status", "lease_until"),
        # ...and for images queued for too long, or queued after too many attempts.
        Index("ix_images_status_queued_at", "status", "queued_at"),
        Index("ix_images_status_attempts", "status", "attempts"),
        # The review queue, "unreviewed, least confident first", walked by keyset: over every
        # job, and within one job. Partial: only the images waiting for review are in them.
        Index(
            "ix_images_review_score_id",
            "review_score",
            "id",
            sqlite_where=text("review_score IS NOT NULL"),
            postgresql_where=text("review_score IS NOT NULL"),
        ),
        Index(
            "ix_images_job_id_review_score_id",
            "job_id",
            "review_score",
            "id",
            sqlite_where=text("review_score IS NOT NULL"),
            postgresql_where=text("review_score IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    storage_key: Mapped[str] = mapped_column(String(1024))
    original_name: Mapped[str] = mapped_column(String(1024), default="")
    # The submitter's own id for the image (given at submission or import), carried into exports.
    external_id: Mapped[str | None] = mapped_column(String(512))
    content_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int | None]
    width: Mapped[int | None]
    height: Mapped[int | None]
    status: Mapped[ImageStatus] = mapped_column(
        _status(ImageStatus, "image_status"), default=ImageStatus.QUEUED
    )
    failure_reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None]
    split: Mapped[Split] = mapped_column(_status(Split, "image_split"), default=Split.TRAIN)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When the image was last (re-)published to the queue; the sweeper re-publishes stale ones.
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    # The review queue's key: the score of the newest caption while the image waits for review
    # (it has a caption, and no current review or the current one is `undone`); NULL otherwise.
    # Kept by the caption saves (captioner.state.images) and by captioner.state.reviews.
    review_score: Mapped[float | None] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="images")
    captions: Mapped[list[Caption]] = relationship(back_populates="image", passive_deletes=True)
    reviews: Mapped[list[Review]] = relationship(
        back_populates="image", order_by="Review.id", passive_deletes=True
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        # At most one active version: a unique index over the rows whose status is 'active'.
        Index(
            "uq_model_versions_one_active",
            "status",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    checkpoint_uri: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[ModelStatus] = mapped_column(
        _status(ModelStatus, "model_status"), default=ModelStatus.CANDIDATE
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None]
    retired_at: Mapped[datetime | None]

    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])


class Caption(Base):
    """A model's caption of an image: one row per (image, model version), upserted."""

    __tablename__ = "captions"
    __table_args__ = (
        UniqueConstraint("image_id", "model_version_id"),
        # The review queue walks one model version's captions by ascending score.
        Index("ix_captions_model_version_id_score", "model_version_id", "score"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    # NULL for a caption brought in by an import (source = "import").
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="RESTRICT")
    )
    source: Mapped[CaptionSource] = mapped_column(
        _status(CaptionSource, "caption_source"),
        default=CaptionSource.MODEL,
        server_default=CaptionSource.MODEL.value,
    )
    text: Mapped[str] = mapped_column(Text)
    # The confidence that `text` is right, in [0, 1] (core_model.confidence; captions saved
    # before it existed hold their mean token log-probability, at most 0). Imports: as given.
    score: Mapped[float] = mapped_column(Float)
    # The n-best list: [{"text": ..., "score": ...}, ...], best first.
    candidates: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    image: Mapped[Image] = relationship(back_populates="captions")
    model_version: Mapped[ModelVersion | None] = relationship()


class Review(Base):
    """A reviewer's decision on an image. Append-only: the newest row (highest id) is current."""

    __tablename__ = "reviews"
    __table_args__ = (
        # Latest review per image: max(id) grouped by image_id.
        Index("ix_reviews_image_id_id", "image_id", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    caption_id: Mapped[int | None] = mapped_column(
        ForeignKey("captions.id", ondelete="SET NULL"), index=True
    )
    reviewer_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    decision: Mapped[ReviewDecision] = mapped_column(_status(ReviewDecision, "review_decision"))
    # The caption as the reviewer settled it (approved: the model's text; corrected: theirs;
    # rejected: NULL).
    text: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set on a row written by "undo": the review it took back (its own content restores the
    # decision before that one, or is UNDONE when none remains).
    undoes_id: Mapped[int | None] = mapped_column(ForeignKey("reviews.id", ondelete="SET NULL"))

    image: Mapped[Image] = relationship(back_populates="reviews")
    caption: Mapped[Caption | None] = relationship()
    reviewer: Mapped[User | None] = relationship()


class TrainingRun(Base):
    """One fine-tuning run: which reviews it used, what it produced, and how it measured."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[TrainingStatus] = mapped_column(
        _status(TrainingStatus, "training_status"), default=TrainingStatus.QUEUED, index=True
    )
    base_model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    candidate_model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    # The dataset snapshot: review ids trained on, and the held-out review ids evaluated on.
    train_review_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    holdout_review_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    # High-water mark: the next run snapshots reviews with a larger id.
    max_review_id: Mapped[int | None]
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    log: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # 1 while the run is queued or running, NULL once it ended. UNIQUE, so a second open run
    # cannot be inserted (NULLs never conflict): one run at a time, however many beat
    # processes or "retrain now" clicks race (captioner.learning.runs.maybe_start_run).
    open_lock: Mapped[int | None] = mapped_column(unique=True)

    base_model_version: Mapped[ModelVersion | None] = relationship(
        foreign_keys=[base_model_version_id]
    )
    candidate_model_version: Mapped[ModelVersion | None] = relationship(
        foreign_keys=[candidate_model_version_id]
    )


class WebhookStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for its (next) attempt
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # out of attempts, or the URL is not allowed


class Webhook(Base):
    """A URL a user registered to receive signed events about their jobs."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    # The HMAC-SHA256 key for the X-Captioner-Signature header (needed in plain to sign).
    secret: Mapped[str] = mapped_column(String(200))
    # After a rotation the previous secret still signs deliveries until it expires.
    previous_secret: Mapped[str | None] = mapped_column(String(200))
    previous_secret_expires_at: Mapped[datetime | None]
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    owner: Mapped[User] = relationship()


class WebhookDelivery(Base):
    """One event for one webhook (an outbox row): retried with backoff until delivered."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # One event of a kind per (webhook, job): recording it twice is a no-op.
        UniqueConstraint("webhook_id", "event", "job_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[WebhookStatus] = mapped_column(
        _status(WebhookStatus, "webhook_status"), default=WebhookStatus.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    response_status: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]

    webhook: Mapped[Webhook] = relationship()


class Export(Base):
    """A file of captions written in the background to the object store (one job, one format)."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    # jsonl, csv, coco, parquet, imagefolder, webdataset
    format: Mapped[str] = mapped_column(String(32))
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[ExportStatus] = mapped_column(
        _status(ExportStatus, "export_status"), default=ExportStatus.QUEUED
    )
    rows_total: Mapped[int] = mapped_column(default=0)
    rows_done: Mapped[int] = mapped_column(default=0)
    object_key: Mapped[str | None] = mapped_column(String(1024))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    owner: Mapped[User] = relationship()
    job: Mapped[Job | None] = relationship()
