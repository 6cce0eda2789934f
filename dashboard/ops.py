"""Operating signals of the dashboard: Prometheus `/metrics` and `/health`.

`/metrics` is computed from the database (and Redis, for queue depth) at scrape time by a custom
collector, so any number of web processes report the same truth and nothing is kept in memory:

| series | type | what |
|---|---|---|
| `captioner_queue_depth{queue}` | gauge | messages waiting in each Redis queue (NaN if Redis is down) |
| `captioner_images{status}` | gauge | images by status (queued, running, captioned, failed) |
| `captioner_images_finished_total{status}` | counter | images finished (captioned / failed); `rate()` gives images/s |
| `captioner_images_per_second` | gauge | images captioned per second over the last `RATE_WINDOW` |
| `captioner_caption_latency_seconds` | gauge histogram | submission -> caption, images finished in the last `LATENCY_WINDOW` |
| `captioner_images_failed{reason}` | gauge | failed images by kind of reason (a small fixed label set) |
| `captioner_reviews_total{decision}` | counter | reviews by decision; `rate()` gives review throughput |
| `captioner_reviews_last_hour` | gauge | reviews made in the last hour |
| `captioner_jobs{status}` | gauge | jobs by status |
| `captioner_training_runs{status}` | gauge | training runs by status |
| `captioner_model_versions{status}` | gauge | model versions by status |
| `captioner_metrics_source_up{source}` | gauge | 1 if the database / Redis answered this scrape |

Workers export their own per-process series (batch and model time, failures as they happen) on
`CAPTIONER_METRICS_PORT`; see `workers/metrics.py`.

`/health` checks the database, Redis and object storage, each with a short time limit, and
answers 200 when all pass and 503 otherwise, with one entry per check.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, current_app
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select, text

from captioner.state.models import (
    Image,
    ImageStatus,
    Job,
    JobStatus,
    ModelStatus,
    ModelVersion,
    Review,
    ReviewDecision,
    TrainingRun,
    TrainingStatus,
    utcnow,
)

log = logging.getLogger(__name__)

bp = Blueprint("ops", __name__)

RATE_WINDOW = timedelta(minutes=5)
LATENCY_WINDOW = timedelta(minutes=15)
LATENCY_SAMPLE_LIMIT = 20_000
LATENCY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
HEALTH_TIMEOUT_SECONDS = 2.0

# Failure reasons are free text for people; metrics label them by kind. First match wins.
FAILURE_KINDS = (
    ("image file not found", "not_found"),
    ("invalid storage key", "invalid_key"),
    ("could not read the image from storage", "storage"),
    ("could not prepare the image", "preprocess"),
    ("gave up after", "lease_exhausted"),
    ("the model produced no caption", "no_caption"),
    ("too large", "too_large"),
    ("too many pixels", "too_large"),
    ("larger than", "too_large"),
    ("truncated", "truncated"),
    ("not an image", "not_an_image"),
    ("unsupported", "unsupported_format"),
    ("cancel", "cancelled"),
)


def failure_kind(reason: str | None) -> str:
    """A short, fixed label for a free-text failure reason."""
    lowered = (reason or "").lower()
    for needle, kind in FAILURE_KINDS:
        if needle in lowered:
            return kind
    return "other"


class DatabaseCollector:
    """Reads every series from SQL (and Redis) when Prometheus scrapes."""

    def __init__(self, app) -> None:
        self.app = app

    def describe(self):  # no samples at registration time (that would query the database)
        return []

    def collect(self):
        state = self.app.extensions["captioner"]
        up = GaugeMetricFamily(
            "captioner_metrics_source_up",
            "1 if the source answered this scrape, else 0.",
            labels=["source"],
        )
        yield from self._queue_depths(state.settings, up)
        try:
            with state.sessionmaker() as session:
                families = list(self._from_database(session))
        except Exception:  # the database is down: say so, keep the scrape valid
            log.warning("metrics: database unavailable", exc_info=True)
            up.add_metric(["database"], 0)
        else:
            up.add_metric(["database"], 1)
            yield from families
        yield up

    def _queue_depths(self, settings, up):
        from captioner.tasks import ALL_QUEUES, queue_depths

        depth = GaugeMetricFamily(
            "captioner_queue_depth",
            "Messages waiting in a queue (read from Redis).",
            labels=["queue"],
        )
        try:
            depths = queue_depths(settings)
        except Exception:
            log.warning("metrics: Redis unavailable", exc_info=True)
            depths = {}
        up.add_metric(["redis"], 1 if depths else 0)
        for queue in ALL_QUEUES:
            depth.add_metric([queue], float(depths.get(queue, math.nan)))
        yield depth

    def _from_database(self, session):
        now = utcnow()
        by_status = dict(
            session.execute(select(Image.status, func.count()).group_by(Image.status)).all()
        )
        images = GaugeMetricFamily("captioner_images", "Images by status.", labels=["status"])
        for status in ImageStatus:
            images.add_metric([status.value], by_status.get(status, 0))
        yield images

        finished = CounterMetricFamily(
            "captioner_images_finished",
            "Images finished, by outcome (rate() of captioned gives images/s).",
            labels=["status"],
        )
        for status in (ImageStatus.CAPTIONED, ImageStatus.FAILED):
            finished.add_metric([status.value], by_status.get(status, 0))
        yield finished

        recent = session.scalar(
            select(func.count()).where(
                Image.status == ImageStatus.CAPTIONED, Image.finished_at >= now - RATE_WINDOW
            )
        )
        yield GaugeMetricFamily(
            "captioner_images_per_second",
            f"Images captioned per second over the last {int(RATE_WINDOW.total_seconds())} s.",
            value=(recent or 0) / RATE_WINDOW.total_seconds(),
        )

        yield self._latency(session, now)

        failed = GaugeMetricFamily(
            "captioner_images_failed", "Failed images by kind of reason.", labels=["reason"]
        )
        kinds: dict[str, int] = {}
        rows = session.execute(
            select(Image.failure_reason, func.count())
            .where(Image.status == ImageStatus.FAILED)
            .group_by(Image.failure_reason)
        )
        for reason, count in rows:
            kind = failure_kind(reason)
            kinds[kind] = kinds.get(kind, 0) + count
        for kind, count in sorted(kinds.items()):
            failed.add_metric([kind], count)
        yield failed

        reviews = CounterMetricFamily(
            "captioner_reviews",
            "Reviews by decision (rate() gives review throughput).",
            labels=["decision"],
        )
        by_decision = dict(
            session.execute(select(Review.decision, func.count()).group_by(Review.decision)).all()
        )
        for decision in ReviewDecision:
            reviews.add_metric([decision.value], by_decision.get(decision, 0))
        yield reviews
        yield GaugeMetricFamily(
            "captioner_reviews_last_hour",
            "Reviews made in the last hour.",
            value=session.scalar(
                select(func.count()).where(Review.created_at >= now - timedelta(hours=1))
            )
            or 0,
        )

        yield self._by_status(session, Job, JobStatus, "captioner_jobs", "Jobs by status.")
        yield self._by_status(
            session,
            TrainingRun,
            TrainingStatus,
            "captioner_training_runs",
            "Training runs by status.",
        )
        yield self._by_status(
            session,
            ModelVersion,
            ModelStatus,
            "captioner_model_versions",
            "Model versions by status.",
        )

    @staticmethod
    def _by_status(session, model, enum_cls, name: str, doc: str) -> GaugeMetricFamily:
        counts = dict(
            session.execute(select(model.status, func.count()).group_by(model.status)).all()
        )
        family = GaugeMetricFamily(name, doc, labels=["status"])
        for status in enum_cls:
            family.add_metric([status.value], counts.get(status, 0))
        return family

    @staticmethod
    def _latency(session, now) -> GaugeHistogramMetricFamily:
        rows = session.execute(
            select(Image.created_at, Image.finished_at)
            .where(Image.status == ImageStatus.CAPTIONED, Image.finished_at >= now - LATENCY_WINDOW)
            .order_by(Image.finished_at.desc())
            .limit(LATENCY_SAMPLE_LIMIT)
        ).all()
        seconds = [
            max(0.0, (done - created).total_seconds()) for created, done in rows if done and created
        ]
        buckets = [(str(float(b)), sum(1 for s in seconds if s <= b)) for b in LATENCY_BUCKETS]
        buckets.append(("+Inf", len(seconds)))
        return GaugeHistogramMetricFamily(
            "captioner_caption_latency_seconds",
            f"Seconds from submission to caption, images captioned in the last "
            f"{int(LATENCY_WINDOW.total_seconds())} s.",
            buckets=buckets,
            gsum_value=sum(seconds),
        )


def init_app(app) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(app))
    app.extensions["captioner_metrics_registry"] = registry
    app.register_blueprint(bp)


@bp.get("/metrics")
def metrics() -> Response:
    registry = current_app.extensions["captioner_metrics_registry"]
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def _check(fn) -> dict[str, Any]:
    start = time.monotonic()
    try:
        detail = fn()
    except Exception as exc:
        log.warning("health check failed: %s", exc)
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:300],
            "seconds": round(time.monotonic() - start, 4),
        }
    result: dict[str, Any] = {"ok": True, "seconds": round(time.monotonic() - start, 4)}
    if detail:
        result["detail"] = detail
    return result


def check_database() -> str:
    engine = current_app.extensions["captioner"].engine
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return engine.dialect.name


def check_redis() -> str:
    import redis

    settings = current_app.extensions["captioner"].settings
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=HEALTH_TIMEOUT_SECONDS,
        socket_connect_timeout=HEALTH_TIMEOUT_SECONDS,
    )
    try:
        client.ping()
    finally:
        client.close()
    return "pong"


def check_storage() -> str:
    import os

    store = current_app.extensions["captioner"].store
    root = getattr(store, "root", None)
    if root is not None and not (root.is_dir() and os.access(root, os.W_OK | os.X_OK)):
        raise OSError(f"{root} is not a writable directory")
    # A listing touches the bucket (S3) or directory (file://) without needing any object.
    next(iter(store.list("health/")), None)
    return repr(store)


CHECKS = {"database": check_database, "redis": check_redis, "storage": check_storage}


@bp.get("/health")
def health():
    checks = {name: _check(fn) for name, fn in CHECKS.items()}
    ok = all(c["ok"] for c in checks.values())
    return {"status": "ok" if ok else "failing", "checks": checks}, 200 if ok else 503
