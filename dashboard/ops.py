"""Operating signals of the dashboard: Prometheus `/metrics` and `/health`.

`/metrics` is computed from the database (and Redis, for queue depth) at scrape time by a custom
collector, so any number of web processes report the same truth. No scrape reads a table that
grows with the collection: image counts are sums of the job counters (one row per job), and the
series that need rows (failure reasons, latency, reviews) come from a summary each process
recomputes at most every `SUMMARY_SECONDS`, each part over a bounded, indexed range:

| series | type | what |
|---|---|---|
| `captioner_queue_depth{queue}` | gauge | messages waiting in each Redis queue (NaN if Redis is down) |
| `captioner_images{status}` | gauge | images by status (queued, running, captioned, failed): job counters |
| `captioner_images_finished_total{status}` | counter | images finished (captioned / failed); `rate()` gives images/s |
| `captioner_images_per_second` | gauge | images captioned per second over the last `RATE_WINDOW` (summary) |
| `captioner_caption_latency_seconds` | gauge histogram | submission -> caption, images finished in the last `LATENCY_WINDOW` (summary) |
| `captioner_images_failed{reason}` | gauge | failed images by kind of reason, a small fixed label set (summary) |
| `captioner_reviews_total{decision}` | counter | reviews by decision; `rate()` gives review throughput (summary) |
| `captioner_reviews_last_hour` | gauge | reviews made in the last hour (summary) |
| `captioner_jobs{status}` | gauge | jobs by status |
| `captioner_training_runs{status}` | gauge | training runs by status |
| `captioner_model_versions{status}` | gauge | model versions by status |
| `captioner_metrics_source_up{source}` | gauge | 1 if the database / Redis answered this scrape |

| `captioner_http_request_duration_seconds{method,endpoint,status}` | histogram | dashboard request latency; `endpoint` is Flask's endpoint name, never the path |

The HTTP histogram is the one series kept by the web process itself (before/after request
hooks). Under gunicorn each process counts its own requests: with `PROMETHEUS_MULTIPROC_DIR`
set (an empty directory, emptied before the server starts) the processes write to files there
and every scrape sums them (prometheus_client's multiprocess mode); without it a scrape sees
only the process that answered it.

Workers export their own per-process series (batch and model time, failures as they happen) on
`CAPTIONER_METRICS_PORT`; see `workers/metrics.py`.

`/health` checks the database (`SELECT 1`), Redis (PING) and object storage (a listing of one
small prefix), each with a short time limit, and answers 200 when all pass and 503 otherwise.
An anonymous caller from another machine gets only `{"status": "ok"}` or `{"status":
"unavailable"}`; the entry per check (with backend errors and the storage location) and
`/metrics` are for a trusted caller: one with `Authorization: Bearer <CAPTIONER_METRICS_TOKEN>`,
or one on loopback whose request no proxy forwarded (no `X-Forwarded-For`), such as a
container's own health check.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select, text

from captioner.state.jobs import STATUS_COUNTERS
from captioner.state.models import (
    Caption,
    CaptionSource,
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
# Latency and rate are read from the images of the newest captions (by id, the primary key):
# this many at most, whatever the size of the table.
LATENCY_SAMPLE_LIMIT = 20_000
LATENCY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
# How long a process reuses its summary of the series that need rows.
SUMMARY_SECONDS = 30.0
# Reviews older than this are settled: counted once into a process's running totals, which
# then only read the reviews added since (reviews are appended, never changed).
REVIEW_SETTLE = timedelta(minutes=1)
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


# --- the summary: series that need rows, recomputed at most every SUMMARY_SECONDS ---------


@dataclass
class ReviewTally:
    """Reviews by decision, kept per process: reviews up to `settled_id` (older than
    `REVIEW_SETTLE` when counted) are summed once into `settled`; each recount reads only the
    reviews after it, a range of the primary key. The first recount of a process reads them
    all. `hour_id` is the newest review known to be more than an hour old, the start of the
    range that "reviews in the last hour" counts."""

    settled_id: int = 0
    settled: dict[ReviewDecision, int] = field(default_factory=dict)
    hour_id: int = 0

    def totals(self, session, now: datetime) -> dict[ReviewDecision, int]:
        newest_settled = session.scalar(
            select(func.max(Review.id)).where(
                Review.id > self.settled_id, Review.created_at < now - REVIEW_SETTLE
            )
        )
        if newest_settled is not None:
            span = (Review.id > self.settled_id, Review.id <= newest_settled)
            _add_counts(self.settled, _by_decision(session, *span))
            self.settled_id = newest_settled
        totals = dict(self.settled)
        _add_counts(totals, _by_decision(session, Review.id > self.settled_id))
        return totals

    def last_hour(self, session, now: datetime) -> int:
        hour_ago = now - timedelta(hours=1)
        older = session.scalar(
            select(func.max(Review.id)).where(
                Review.id > self.hour_id, Review.created_at < hour_ago
            )
        )
        self.hour_id = older or self.hour_id
        return (
            session.scalar(
                select(func.count()).where(Review.id > self.hour_id, Review.created_at >= hour_ago)
            )
            or 0
        )


def _by_decision(session, *where) -> dict[ReviewDecision, int]:
    rows = session.execute(
        select(Review.decision, func.count()).where(*where).group_by(Review.decision)
    )
    return {decision: n for decision, n in rows}


def _add_counts(into: dict, counts: dict) -> None:
    for key, n in counts.items():
        into[key] = into.get(key, 0) + n


@dataclass
class Summary:
    """The series that need rows, as of one recount."""

    failure_kinds: dict[str, int]
    latencies: list[float]  # seconds from submission to caption, recent captioned images
    per_second: float
    reviews: dict[ReviewDecision, int]
    reviews_last_hour: int


def failure_kinds(session) -> dict[str, int]:
    """Failed images by kind of reason: only the failed images of jobs whose counter says they
    have any, found through the (job_id, status) index."""
    failing_jobs = select(Job.id).where(Job.failed_count > 0)
    rows = session.execute(
        select(Image.failure_reason, func.count())
        .where(Image.job_id.in_(failing_jobs), Image.status == ImageStatus.FAILED)
        .group_by(Image.failure_reason)
    )
    kinds: dict[str, int] = {}
    for reason, count in rows:
        _add_counts(kinds, {failure_kind(reason): count})
    return kinds


def recent_latencies(session, now: datetime) -> tuple[list[float], float]:
    """(latency of each image captioned in the last `LATENCY_WINDOW`, images captioned per
    second over the last `RATE_WINDOW`), read from the images of the newest
    `LATENCY_SAMPLE_LIMIT` captions. When that many captions were made within the rate window,
    the rate is taken over the span they cover instead."""
    sample = (
        select(Caption.image_id, Caption.created_at)
        .where(Caption.source == CaptionSource.MODEL)  # imported captions took no worker time
        .order_by(Caption.id.desc())
        .limit(LATENCY_SAMPLE_LIMIT)
        .subquery("newest_captions")
    )
    sampled, oldest = session.execute(select(func.count(), func.min(sample.c.created_at))).one()
    rows = session.execute(
        select(Image.created_at, Image.finished_at).where(
            Image.id.in_(select(sample.c.image_id)),
            Image.status == ImageStatus.CAPTIONED,
            Image.finished_at >= now - LATENCY_WINDOW,
        )
    ).all()
    seconds = [max(0.0, (done - created).total_seconds()) for created, done in rows]
    in_rate_window = sum(1 for _, done in rows if done >= now - RATE_WINDOW)
    span = RATE_WINDOW.total_seconds()
    if sampled >= LATENCY_SAMPLE_LIMIT and oldest is not None and oldest > now - RATE_WINDOW:
        span = max((now - oldest).total_seconds(), 1.0)
    return seconds, in_rate_window / span


class DatabaseCollector:
    """Reads every series from SQL (and Redis) when Prometheus scrapes."""

    def __init__(self, app, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.clock = clock  # when the summary is due again (tests pass their own)
        self._lock = threading.Lock()
        self._summary: Summary | None = None
        self._summary_at = -math.inf
        self._reviews = ReviewTally()

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

    def summary(self, session) -> Summary:
        """The summary, recounted when it is older than `SUMMARY_SECONDS` (one recount at a
        time per process)."""
        with self._lock:
            if self._summary is None or self.clock() - self._summary_at >= SUMMARY_SECONDS:
                now = utcnow()
                seconds, per_second = recent_latencies(session, now)
                self._summary = Summary(
                    failure_kinds=failure_kinds(session),
                    latencies=seconds,
                    per_second=per_second,
                    reviews=self._reviews.totals(session, now),
                    reviews_last_hour=self._reviews.last_hour(session, now),
                )
                self._summary_at = self.clock()
            return self._summary

    def _from_database(self, session):
        by_status = image_counts(session)
        images = GaugeMetricFamily("captioner_images", "Images by status.", labels=["status"])
        for status in ImageStatus:
            images.add_metric([status.value], by_status[status])
        yield images

        finished = CounterMetricFamily(
            "captioner_images_finished",
            "Images finished, by outcome (rate() of captioned gives images/s).",
            labels=["status"],
        )
        for status in (ImageStatus.CAPTIONED, ImageStatus.FAILED):
            finished.add_metric([status.value], by_status[status])
        yield finished

        summary = self.summary(session)
        yield GaugeMetricFamily(
            "captioner_images_per_second",
            f"Images captioned per second over the last {int(RATE_WINDOW.total_seconds())} s.",
            value=summary.per_second,
        )
        yield self._latency(summary.latencies)

        failed = GaugeMetricFamily(
            "captioner_images_failed", "Failed images by kind of reason.", labels=["reason"]
        )
        for kind, count in sorted(summary.failure_kinds.items()):
            failed.add_metric([kind], count)
        yield failed

        reviews = CounterMetricFamily(
            "captioner_reviews",
            "Reviews by decision (rate() gives review throughput).",
            labels=["decision"],
        )
        for decision in ReviewDecision:
            reviews.add_metric([decision.value], summary.reviews.get(decision, 0))
        yield reviews
        yield GaugeMetricFamily(
            "captioner_reviews_last_hour",
            "Reviews made in the last hour.",
            value=summary.reviews_last_hour,
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
        """A small table (jobs, training runs, model versions) counted by status."""
        counts = dict(
            session.execute(select(model.status, func.count()).group_by(model.status)).all()
        )
        family = GaugeMetricFamily(name, doc, labels=["status"])
        for status in enum_cls:
            family.add_metric([status.value], counts.get(status, 0))
        return family

    @staticmethod
    def _latency(seconds: list[float]) -> GaugeHistogramMetricFamily:
        buckets = [(str(float(b)), sum(1 for s in seconds if s <= b)) for b in LATENCY_BUCKETS]
        buckets.append(("+Inf", len(seconds)))
        return GaugeHistogramMetricFamily(
            "captioner_caption_latency_seconds",
            f"Seconds from submission to caption, images captioned in the last "
            f"{int(LATENCY_WINDOW.total_seconds())} s.",
            buckets=buckets,
            gsum_value=sum(seconds),
        )


def image_counts(session) -> dict[ImageStatus, int]:
    """Images by status over every job: sums of the job counters, one row per job read."""
    statuses = list(STATUS_COUNTERS)
    row = session.execute(
        select(*(func.coalesce(func.sum(getattr(Job, STATUS_COUNTERS[s])), 0) for s in statuses))
    ).one()
    return {status: int(n) for status, n in zip(statuses, row, strict=True)}


def init_app(app) -> None:
    registry = CollectorRegistry(auto_describe=False)
    collector = DatabaseCollector(app)
    registry.register(collector)
    app.extensions["captioner_metrics_registry"] = registry
    app.extensions["captioner_metrics_collector"] = collector
    _time_requests(app, registry)
    app.register_blueprint(bp)


# --- HTTP request latency -------------------------------------------------------------------

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_HTTP_NAME = "captioner_http_request_duration_seconds"
_HTTP_DOC = "Dashboard request latency in seconds, by method, Flask endpoint and status."
_HTTP_LABELS = ("method", "endpoint", "status")


def _multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@functools.cache
def _shared_http_histogram() -> Histogram:
    """Multiprocess mode: one histogram per process, its values in the shared directory's
    files (two objects of one name in a process would overwrite each other's counts)."""
    return Histogram(_HTTP_NAME, _HTTP_DOC, _HTTP_LABELS, buckets=HTTP_BUCKETS, registry=None)


def _http_histogram(registry: CollectorRegistry) -> Histogram:
    """The request histogram, exposed through `registry`: this app's own in one process, or
    the sum of every process's files under `PROMETHEUS_MULTIPROC_DIR`."""
    path = _multiprocess_dir()
    if path is None:
        return Histogram(
            _HTTP_NAME, _HTTP_DOC, _HTTP_LABELS, buckets=HTTP_BUCKETS, registry=registry
        )
    from prometheus_client.multiprocess import MultiProcessCollector

    MultiProcessCollector(registry, path=path)
    return _shared_http_histogram()


def _time_requests(app: Flask, registry: CollectorRegistry) -> None:
    """Time every request: the clock starts in the first before-request hook (ahead of any
    hook that answers early, such as a login redirect) and stops when the response is made.
    Labels stay bounded: the endpoint name (`unmatched` for a 404 no route answered), one of
    the usual methods or `other`, the status code."""
    histogram = _http_histogram(registry)

    def start() -> None:
        g.captioner_request_started = time.perf_counter()

    def observe(response: Response) -> Response:
        started = g.pop("captioner_request_started", None)
        if started is not None:
            method = request.method if request.method in HTTP_METHODS else "other"
            endpoint = request.endpoint or "unmatched"
            histogram.labels(method, endpoint, str(response.status_code)).observe(
                time.perf_counter() - started
            )
        return response

    app.before_request_funcs.setdefault(None, []).insert(0, start)
    app.after_request(observe)


def trusted_caller() -> bool:
    """The metrics token as a Bearer token, or a loopback caller no proxy forwarded."""
    token = current_app.extensions["captioner"].settings.metrics_token
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    if token is not None and scheme.lower() == "bearer" and sent.strip():
        return hmac.compare_digest(sent.strip().encode(), token.get_secret_value().encode())
    return _loopback(request.remote_addr) and "X-Forwarded-For" not in request.headers


def _loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False


@bp.get("/metrics")
def metrics() -> Response:
    if not trusted_caller():
        return Response(
            "metrics need the metrics token or a loopback caller\n",
            status=401,
            mimetype="text/plain",
            headers={"WWW-Authenticate": 'Bearer realm="captioner-metrics"'},
        )
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
    code = 200 if ok else 503
    if not trusted_caller():
        return {"status": "ok" if ok else "unavailable"}, code
    return {"status": "ok" if ok else "failing", "checks": checks}, code
