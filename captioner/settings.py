"""Runtime configuration: one `Settings` object read from `CAPTIONER_*` environment variables.

Every default is the embedded one (an SQLite file and a local object directory under `data_dir`),
so nothing needs configuring to start on one machine. Each field's description is the
documentation: the config table in the docs is generated from `Settings.model_fields`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# PIL's own default decompression-bomb threshold (1024 * 1024 * 1024 // 4 // 3); we keep it
# as ours so an operator sees one number, and we enforce it ourselves before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# The session key a fresh checkout runs with. Only `captioner run` (which replaces it with a key
# kept in its data dir) serves with it unchanged; every other server refuses to start.
DEFAULT_SECRET_KEY = "dev-insecure-change-me"


class Settings(BaseSettings):
    """All configuration of the application; see each field's description."""

    model_config = SettingsConfigDict(
        env_prefix="CAPTIONER_",
        env_file=None,
        extra="ignore",
        validate_default=True,
    )

    data_dir: Path = Field(
        default=Path("./var"),
        description="Directory for embedded state: the SQLite database, local objects, checkpoints.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy database URL. Empty means `sqlite:///<data_dir>/captioner.db`; "
        "use `postgresql+psycopg://user@host/db` in production.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis URL used as the Celery broker (it only wakes workers; SQL holds the work).",
    )
    storage_url: str = Field(
        default="",
        description="Object storage: `s3://bucket/prefix` or `file:///dir`. Empty means "
        "`file://<data_dir>/objects`.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Custom S3 API endpoint (MinIO, other S3 services); unset means AWS.",
    )
    s3_region: str = Field(default="us-east-1", description="S3 region name.")
    s3_access_key_id: str | None = Field(
        default=None,
        description="S3 access key id; unset means boto3's default credential chain.",
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret access key; unset means boto3's default chain."
    )
    s3_max_attempts: int = Field(
        default=5,
        ge=1,
        description="Attempts per S3 request (botocore retries with backoff on 5xx and throttling).",
    )
    s3_retry_mode: Literal["standard", "adaptive"] = Field(
        default="standard", description="botocore retry mode for S3 requests."
    )
    batch_size: int = Field(
        default=32, ge=1, description="Images per Celery message and per model batch."
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        description="Images with more pixels (width x height, read from the header) are rejected "
        "before decoding, to stop decompression bombs.",
    )
    max_image_bytes: int = Field(
        default=50 * 1024 * 1024,
        ge=1,
        description="Largest accepted image file, in bytes.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Times an image may be claimed before it is marked failed.",
    )
    lease_seconds: int = Field(
        default=300,
        ge=1,
        description="How long a worker's claim on an image lasts before the sweeper re-queues it.",
    )
    queued_timeout_seconds: int = Field(
        default=600,
        ge=1,
        description="An image queued longer than this is re-published by the sweeper.",
    )
    secret_key: SecretStr = Field(
        default=SecretStr(DEFAULT_SECRET_KEY),
        description="Flask session signing key: a long random string. `captioner serve` and "
        "gunicorn refuse to start with the built-in default; `captioner run` generates one into "
        "its data directory (`secret_key`, mode 0600) and reuses it.",
    )
    device: str = Field(
        default="auto",
        description="Inference device: `auto` (CUDA if available, else CPU), `cpu`, or `cuda:N`.",
    )
    checkpoint_dir: Path | None = Field(
        default=None,
        description="Where model checkpoints are written. Empty means `<data_dir>/checkpoints`.",
    )
    active_model: str | None = Field(
        default=None,
        description="Pin this model version name instead of the one marked active in the database.",
    )
    # --- workers (issue 5) ---
    model_checkpoint: Path | None = Field(
        default=None,
        description="Checkpoint directory workers caption with while no model version is active "
        "in the database. Empty means `<checkpoint_dir>/default`.",
    )
    caption_max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Caption length cap in workers; empty means the model's own.",
    )
    caption_num_beams: int = Field(
        default=3,
        ge=1,
        le=8,
        description="Beam width in workers for jobs that do not choose one (1 = greedy).",
    )
    caption_n_best: int = Field(
        default=3,
        ge=1,
        le=8,
        description="Candidates kept per image for jobs that do not choose (at most the beams).",
    )
    gpu_decode: bool = Field(
        default=True,
        description="On a CUDA worker, decode plain RGB/greyscale JPEGs on the GPU (nvJPEG) in "
        "batches; other images, and any the GPU cannot decode, take the CPU path.",
    )
    fetch_threads: int = Field(
        default=8,
        ge=1,
        description="Threads a worker uses to fetch one batch's images from storage.",
    )
    worker_pipeline_depth: int | None = Field(
        default=None,
        ge=1,
        le=8,
        description="Caption batches one `captioner worker` process works on at once (Celery "
        "`threads` pool, one model shared): the next batch is fetched and decoded, and the last "
        "one saved, while the model runs; the model step itself is one batch at a time. Empty "
        "means 2 on CUDA and 1 (`solo` pool) on the CPU, where decoding and the model compete "
        "for the same cores.",
    )
    task_max_retries: int = Field(
        default=5,
        ge=0,
        description="Retries (with exponential backoff) of a batch after a transient storage, "
        "database or model error; each image's attempts are capped by `max_attempts` as well.",
    )
    task_soft_time_limit_seconds: int = Field(
        default=1800,
        ge=1,
        description="Soft time limit of one caption batch (enforced by pools that support it).",
    )
    task_time_limit_seconds: int = Field(
        default=2100,
        ge=1,
        description="Hard time limit of one caption batch (enforced by pools that support it).",
    )
    broker_visibility_timeout_seconds: int = Field(
        default=7200,
        ge=1,
        description="Seconds before Redis re-delivers an unacknowledged message; keep it longer "
        "than the longest task.",
    )
    sweep_interval_seconds: float = Field(
        default=60.0, gt=0, description="How often Celery beat runs the sweeper."
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of a worker's Prometheus metrics endpoint; 0 turns it off.",
    )

    # --- dashboard: submission limits, URL fetching, webhooks, rate limits ---
    max_upload_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1,
        description="Largest accepted HTTP request body (all files of one upload), in bytes; "
        "a larger upload is refused with 413.",
    )
    max_submit_items: int = Field(
        default=100_000,
        ge=1,
        description="Most images (files, zip members, object keys or URLs) in one submission.",
    )
    zip_max_members: int = Field(
        default=10_000, ge=1, description="Most members a submitted zip archive may contain."
    )
    zip_max_total_bytes: int = Field(
        default=2 * 1024 * 1024 * 1024,
        ge=1,
        description="Largest total uncompressed size of a submitted zip archive, in bytes.",
    )
    zip_max_ratio: float = Field(
        default=200.0,
        gt=1,
        description="Largest uncompressed/compressed size ratio of a zip member (zip bombs).",
    )
    url_fetch_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        description="Total time limit for fetching one submitted image URL (connect, every "
        "redirect and the body).",
    )
    url_fetch_max_redirects: int = Field(
        default=5, ge=0, description="Redirects followed (each re-checked) when fetching a URL."
    )
    source_prefixes: list[str] = Field(
        default_factory=list,
        description="Object-store key prefixes every submitter may submit keys and prefixes "
        'within, e.g. `["shared/"]` (`[""]`: the whole store). Admins grant more per user '
        "(`PATCH /api/v1/users/<id>`); nobody reads the system's own uploads/, urls/, models/ "
        "or exports/ this way.",
    )
    url_allow_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDR networks an operator trusts for submitted image URLs although "
        'they are private or loopback, e.g. `["10.0.0.0/8", "images.internal"]`. Every '
        "submitter may fetch from them; webhooks have their own list.",
    )
    webhook_allow_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDR networks an operator trusts as webhook receivers although "
        'they are private or loopback, e.g. `["hooks.internal"]`. Not used for URL submission.',
    )
    webhook_max_attempts: int = Field(
        default=6, ge=1, description="Delivery attempts per webhook event before it is failed."
    )
    webhook_backoff_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Delay before the first webhook retry; doubled after each failed attempt.",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Total time limit of one webhook delivery request (connect, send and reply).",
    )
    webhook_secret_grace_hours: float = Field(
        default=24.0,
        ge=0,
        description="After a webhook secret is rotated, hours during which deliveries carry a "
        "second signature made with the previous secret; 0 stops it at once.",
    )
    interactive_max_images: int = Field(
        default=16,
        ge=1,
        description="Most images an `interactive` submission may hold (it jumps the bulk queue); "
        "a larger one, or a prefix (its size is unknown when submitted), is refused with 422.",
    )
    submit_rate_limit: str = Field(
        default="60/minute",
        description="Rate limit per user on submission endpoints (flask-limiter syntax).",
    )
    login_rate_limit: str = Field(
        default="20/minute", description="Rate limit per client address on the login form."
    )
    rate_limit_storage_url: str = Field(
        default="memory://",
        description="Where rate-limit counters live: `memory://` (one process) or a "
        "`redis://` URL shared by all web processes.",
    )
    session_lifetime_hours: float = Field(
        default=12.0,
        gt=0,
        description="A dashboard login lasts this long (hours from logging in, however active); "
        "logout, a password change and an admin's disable end every session of that user at once.",
    )
    review_claim_seconds: int = Field(
        default=120,
        ge=5,
        le=3600,
        description="A reviewer's claim on the item they are looking at lasts this long (renewed "
        "while it stays on screen): other reviewers' queues leave the item out meanwhile. Claims "
        "live in Redis; without it reviewing goes on unclaimed.",
    )
    public_url: str = Field(
        default="",
        description="The address users reach the dashboard at, e.g. `https://captions.example.com`. "
        "When it is https, session cookies are `Secure` and responses carry HSTS; empty means "
        "plain http (cookies sent without `Secure`).",
    )
    trusted_proxy_hops: int = Field(
        default=0,
        ge=0,
        le=10,
        description="Reverse proxies (load balancers) in front of the dashboard whose "
        "`X-Forwarded-For` / `X-Forwarded-Proto` are trusted, so rate limits key on the real "
        "client address; 0 trusts none (the headers are ignored).",
    )

    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token that reads `/metrics` and the details of `/health` from "
        "another machine; unset means only loopback callers (without `X-Forwarded-For`) may. "
        "Anonymous `/health` answers only ok or unavailable.",
    )

    # --- running it: the embedded stack (`captioner run`), logs (issue 8) ---
    dashboard_host: str = Field(
        default="127.0.0.1",
        description="Address the dashboard of `captioner run` / `captioner serve` listens on; "
        "`0.0.0.0` makes it reachable from other machines.",
    )
    dashboard_port: int = Field(
        default=5000,
        ge=1,
        le=65535,
        description="Port the dashboard of `captioner run` / `captioner serve` listens on.",
    )
    embedded_redis_port: int = Field(
        default=6390,
        ge=1,
        le=65535,
        description="Port of the private Redis that `captioner run` starts for itself (it must "
        "differ from any other Redis on the machine); ignored by deployments.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines as plain text or as one JSON object per line (with `job_id` and "
        "`image_id` when a line is about them).",
    )
    log_level: str = Field(
        default="INFO", description="Lowest level logged: DEBUG, INFO, WARNING or ERROR."
    )

    # --- the learning loop: retraining, the evaluation gate, the model registry (issue 7) ---
    retrain_schedule: str = Field(
        default="0 2 * * *",
        description="When Celery beat checks whether to retrain: a crontab line (minute hour "
        "day-of-month month day-of-week, UTC). Default: nightly at 02:00.",
    )
    min_new_reviews: int = Field(
        default=100,
        ge=1,
        description="A scheduled run starts only when at least this many reviews arrived since "
        'the last finished run ("retrain now" ignores it).',
    )
    holdout_share: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="Share of newly reviewed images put, by a hash of their id, into the frozen "
        "held-out evaluation set (never trained on).",
    )
    holdout_max_images: int = Field(
        default=2000, ge=1, description="Most held-out images a run evaluates on (oldest first)."
    )
    max_reviewer_share: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="No single reviewer may supply more than this share of a run's reviewed "
        "training examples; the excess (their oldest reviews) is left out.",
    )
    retrain_max_examples: int = Field(
        default=20_000, ge=1, description="Most reviewed examples one run trains on (newest first)."
    )
    promote_margin: float = Field(
        default=0.01,
        ge=0.0,
        description="The candidate is promoted only if its held-out score beats the active "
        "version's by at least this much.",
    )
    anchor_tolerance: float = Field(
        default=0.02,
        ge=0.0,
        description="The candidate is promoted only if its anchor-set score is at most this "
        "much below the active version's (the regression guard).",
    )
    gate_metric: Literal["exact_match", "cider", "bleu_4", "rouge_l"] = Field(
        default="exact_match", description="The metric the evaluation gate compares."
    )
    anchor_data: str = Field(
        default="",
        description="Anchor (regression guard) examples besides the held-out approvals: a data "
        "spec (`synthetic`, `jsonl:PATH`, `csv:PATH`, `karpathy:PATH`); empty means none.",
    )
    anchor_split: str = Field(default="test", description="Split of `anchor_data` used.")
    anchor_size: int = Field(default=300, ge=1, description="Most anchor examples evaluated.")
    replay_data: str = Field(
        default="",
        description="Original training data replayed during fine-tuning against forgetting "
        "(a data spec like `anchor_data`); empty means only reviews are trained on.",
    )
    replay_ratio: float = Field(
        default=1.0,
        ge=0.0,
        description="Replayed original examples per reviewed training example.",
    )
    finetune_steps: int = Field(
        default=0,
        ge=0,
        description="Optimizer steps of a fine-tuning run; 0 means `finetune_epochs` decide.",
    )
    finetune_epochs: int = Field(
        default=3, ge=1, description="Passes over the training examples of a fine-tuning run."
    )
    finetune_lr: float = Field(default=3e-4, gt=0, description="Peak learning rate of fine-tuning.")
    finetune_batch_size: int = Field(default=32, ge=1, description="Examples per fine-tuning step.")
    finetune_warmup_steps: int = Field(
        default=10, ge=0, description="Linear warmup steps of fine-tuning."
    )
    training_device: str = Field(
        default="",
        description="Device of the training worker (`cpu`, `cuda`, `cuda:N`); empty means CUDA "
        "when available.",
    )
    training_run_timeout_seconds: int = Field(
        default=6 * 3600,
        ge=60,
        description="An open run older than this is marked failed (its worker was lost), so "
        "the next one can start.",
    )

    @property
    def public_url_is_https(self) -> bool:
        """True when users reach the dashboard over https (`public_url`): Secure cookies, HSTS."""
        return self.public_url.lower().startswith("https://")

    @property
    def uses_default_secret_key(self) -> bool:
        """True while `secret_key` is the built-in default (no server but `captioner run` may
        start with it)."""
        return self.secret_key.get_secret_value() == DEFAULT_SECRET_KEY

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value):
        return None if value in ("", None) else value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        if value and not value.lower().startswith(("http://", "https://")):
            raise ValueError(f"public_url must start with http:// or https://, not {value!r}")
        return value.rstrip("/")

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        if value and not value.startswith(("s3://", "file://")):
            raise ValueError(f"storage_url must start with s3:// or file://, not {value!r}")
        return value

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        # Derived defaults live here (not in Field defaults) so they follow a changed data_dir.
        data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{data_dir / 'captioner.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{data_dir / 'objects'}"
        if self.checkpoint_dir is None:
            self.checkpoint_dir = data_dir / "checkpoints"
        if self.model_checkpoint is None:
            self.model_checkpoint = self.checkpoint_dir / "default"
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings, so the next `get_settings()` re-reads the environment (tests)."""
    get_settings.cache_clear()
