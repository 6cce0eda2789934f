"""Operating signals: `/metrics` (computed from SQL and Redis at scrape time), `/health`
(database, Redis, storage; 503 when one fails) and JSON log lines with job and image ids."""

from __future__ import annotations

import io
import json
import logging
import math
import socket

import pytest
import redis
from dashboard_helpers import fake_caption, make_user, png
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from captioner.logging import JsonFormatter, TextFormatter, log_context, make_handler
from captioner.state import images, jobs
from captioner.state.db import session_scope
from captioner.state.models import Caption, Review, ReviewDecision, TrainingRun, TrainingStatus


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def samples(body: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def ops_redis(redis_dbs):
    url = redis_dbs.flushed("main")
    client = redis.Redis.from_url(url)
    yield url, client
    client.flushdb()
    client.close()


@pytest.fixture
def ops_app(dashboard_settings, publisher, ops_redis):
    from dashboard import create_app

    app = create_app(
        dashboard_settings.model_copy(update={"redis_url": ops_redis[0]}), publisher=publisher
    )
    app.config["TESTING"] = True
    yield app
    app.extensions["captioner"].engine.dispose()


def submit(client, account, n: int, green: int) -> int:
    """A job of `n` distinct images (distinct across jobs too: same bytes would be reused)."""
    data = {
        "files": [(io.BytesIO(png((10 * i, green, 0))), f"{i}.png") for i in range(n)],
        "name": "m",
    }
    r = client.post(
        "/api/v1/jobs/upload",
        data=data,
        headers=account.headers,
        content_type="multipart/form-data",
    )
    assert r.status_code == 202, r.json
    return r.json["id"]


def test_metrics_expose_queue_throughput_latency_failures_reviews_training(ops_app, ops_redis):
    client = ops_app.test_client()
    admin = make_user(ops_app, "admin@example.com", "admin")
    captioned_job = submit(client, admin, 3, green=0)
    ids = fake_caption(ops_app, captioned_job)
    failing_job = submit(client, admin, 2, green=100)
    sessions = ops_app.extensions["captioner"].sessionmaker
    with session_scope(sessions) as session:
        failing = images.claim_images(session, worker_id="w", lease_seconds=60, job_id=failing_job)
        images.fail_image(session, failing[0], "image file not found in storage")
        images.fail_image(session, failing[1], "could not prepare the image for the model: boom")
        caption = session.query(Caption).filter_by(image_id=ids[0]).one()
        session.add(
            Review(
                image_id=ids[0],
                caption_id=caption.id,
                reviewer_id=admin.id,
                decision=ReviewDecision.APPROVED,
                text=caption.text,
            )
        )
        session.add(
            Review(
                image_id=ids[1],
                reviewer_id=admin.id,
                decision=ReviewDecision.CORRECTED,
                text="a red square",
            )
        )
        session.add(TrainingRun(status=TrainingStatus.PROMOTED))
        session.add(TrainingRun(status=TrainingStatus.FAILED, error="out of memory"))
        jobs.finish_completed_jobs(session)
    # Three messages waiting in the bulk queue, one in a priority sibling list kombu uses.
    ops_redis[1].lpush("caption", "a", "b")
    ops_redis[1].lpush("caption\x06\x163", "c")

    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    got = samples(r.get_data(as_text=True))

    assert got[("captioner_queue_depth", (("queue", "caption"),))] == 3
    assert got[("captioner_queue_depth", (("queue", "train"),))] == 0
    assert got[("captioner_images", (("status", "captioned"),))] == 3
    assert got[("captioner_images", (("status", "failed"),))] == 2
    assert got[("captioner_images", (("status", "queued"),))] == 0
    assert got[("captioner_images_finished_total", (("status", "captioned"),))] == 3
    assert got[("captioner_images_per_second", ())] == pytest.approx(3 / 300)
    # Latency histogram over the captioned images: every one is counted in +Inf.
    assert got[("captioner_caption_latency_seconds_gcount", ())] == 3
    assert got[("captioner_caption_latency_seconds_bucket", (("le", "+Inf"),))] == 3
    assert got[("captioner_images_failed", (("reason", "not_found"),))] == 1
    assert got[("captioner_images_failed", (("reason", "preprocess"),))] == 1
    assert got[("captioner_reviews_total", (("decision", "approved"),))] == 1
    assert got[("captioner_reviews_total", (("decision", "corrected"),))] == 1
    assert got[("captioner_reviews_last_hour", ())] == 2
    assert got[("captioner_training_runs", (("status", "promoted"),))] == 1
    assert got[("captioner_training_runs", (("status", "failed"),))] == 1
    assert got[("captioner_jobs", (("status", "finished"),))] == 2
    assert got[("captioner_model_versions", (("status", "active"),))] == 1
    assert got[("captioner_metrics_source_up", (("source", "database"),))] == 1
    assert got[("captioner_metrics_source_up", (("source", "redis"),))] == 1

    # Computed at scrape time: a new caption shows up in the next scrape.
    fake_caption(ops_app, submit(client, admin, 1, green=200))
    again = samples(client.get("/metrics").get_data(as_text=True))
    assert again[("captioner_images", (("status", "captioned"),))] == 4


def test_metrics_match_a_recount_of_the_rows_after_work(ops_app):
    """Image series come from the job counters, the rest from the summary: after claims,
    failures, retries and reviews both equal what the rows say."""
    from sqlalchemy import func, select

    from captioner.state import reviews as review_state
    from captioner.state.models import Image, ImageStatus

    client = ops_app.test_client()
    admin = make_user(ops_app, "admin@example.com", "admin")
    clock = [0.0]
    ops_app.extensions["captioner_metrics_collector"].clock = lambda: clock[0]
    first = submit(client, admin, 4, green=10)
    second = submit(client, admin, 3, green=20)
    sessions = ops_app.extensions["captioner"].sessionmaker
    with session_scope(sessions) as session:
        claimed = images.claim_images(session, worker_id="w", lease_seconds=60, job_id=second)
        images.fail_image(session, claimed[0], "image file not found in storage")
        images.fail_image(session, claimed[1], "gave up after 3 attempts")
    ids = fake_caption(ops_app, first)
    with session_scope(sessions) as session:
        jobs.retry_failed(session, second)  # both failures back to queued
        images.fail_image(session, claimed[1], "not an image")
        review_state.add_review(session, image_id=ids[0], decision="rejected", reviewer_id=admin.id)
        review_state.add_review(
            session, image_id=ids[1], decision="corrected", text="a dog", reviewer_id=admin.id
        )
        review_state.undo_review(session, ids[1], admin.id)

    def rows_say():
        with session_scope(sessions) as session:
            by_status = dict(
                session.execute(select(Image.status, func.count()).group_by(Image.status)).all()
            )
            by_decision = dict(
                session.execute(
                    select(Review.decision, func.count()).group_by(Review.decision)
                ).all()
            )
        return by_status, by_decision

    got = samples(client.get("/metrics").get_data(as_text=True))
    by_status, by_decision = rows_say()
    for status in ImageStatus:
        assert got[("captioner_images", (("status", status.value),))] == by_status.get(status, 0)
    for decision in ReviewDecision:
        key = ("captioner_reviews_total", (("decision", decision.value),))
        assert got[key] == by_decision.get(decision, 0)
    assert by_status[ImageStatus.CAPTIONED] == 4 and by_status[ImageStatus.RUNNING] == 1
    assert by_status[ImageStatus.QUEUED] == 1 and by_status[ImageStatus.FAILED] == 1
    assert got[("captioner_images_failed", (("reason", "not_an_image"),))] == 1
    assert ("captioner_images_failed", (("reason", "not_found"),)) not in got  # retried
    assert got[("captioner_reviews_last_hour", ())] == 3
    assert got[("captioner_caption_latency_seconds_gcount", ())] == 4

    # The summary is reused until it is due; the counters are read at every scrape.
    with session_scope(sessions) as session:
        images.fail_image(session, claimed[0], "image file not found in storage")
        review_state.add_review(
            session, image_id=ids[2], decision="approved", text="ok", reviewer_id=admin.id
        )
    got = samples(client.get("/metrics").get_data(as_text=True))
    assert got[("captioner_images", (("status", "failed"),))] == 2
    assert ("captioner_images_failed", (("reason", "not_found"),)) not in got
    assert got[("captioner_reviews_total", (("decision", "approved"),))] == 0
    clock[0] += 30.0
    got = samples(client.get("/metrics").get_data(as_text=True))
    assert got[("captioner_images_failed", (("reason", "not_found"),))] == 1
    assert got[("captioner_reviews_total", (("decision", "approved"),))] == 1
    assert got[("captioner_reviews_last_hour", ())] == 4


def test_metrics_still_answer_when_redis_is_down(dashboard_settings, publisher):
    from dashboard import create_app

    settings = dashboard_settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{closed_port()}/0"}
    )
    app = create_app(settings, publisher=publisher)
    try:
        r = app.test_client().get("/metrics")
        assert r.status_code == 200
        got = samples(r.get_data(as_text=True))
        assert math.isnan(got[("captioner_queue_depth", (("queue", "caption"),))])
        assert got[("captioner_metrics_source_up", (("source", "redis"),))] == 0
        assert got[("captioner_metrics_source_up", (("source", "database"),))] == 1
        assert got[("captioner_images", (("status", "queued"),))] == 0
    finally:
        app.extensions["captioner"].engine.dispose()


def test_health_reports_each_check_and_is_200_when_all_pass(ops_app):
    r = ops_app.test_client().get("/health")
    assert r.status_code == 200, r.json
    assert r.json["status"] == "ok"
    assert set(r.json["checks"]) == {"database", "redis", "storage"}
    assert all(check["ok"] for check in r.json["checks"].values())
    assert r.json["checks"]["database"]["detail"] == "sqlite"


def test_health_is_503_naming_redis_when_redis_is_unreachable(dashboard_settings, publisher):
    from dashboard import create_app

    port = closed_port()
    settings = dashboard_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    app = create_app(settings, publisher=publisher)
    try:
        r = app.test_client().get("/health")
        assert r.status_code == 503
        checks = r.json["checks"]
        assert r.json["status"] == "failing"
        assert checks["redis"]["ok"] is False and "Connection" in checks["redis"]["error"]
        assert checks["database"]["ok"] is True and checks["storage"]["ok"] is True
    finally:
        app.extensions["captioner"].engine.dispose()


def test_health_is_503_when_the_database_is_unreachable(dashboard_settings, publisher, ops_redis):
    from dashboard import create_app

    url = f"postgresql+psycopg://nobody@127.0.0.1:{closed_port()}/none?connect_timeout=2"
    settings = dashboard_settings.model_copy(
        update={"database_url": url, "redis_url": ops_redis[0]}
    )
    app = create_app(settings, publisher=publisher)
    try:
        r = app.test_client().get("/health")
        assert r.status_code == 503
        assert r.json["checks"]["database"]["ok"] is False
        assert r.json["checks"]["redis"]["ok"] is True
        metrics = samples(app.test_client().get("/metrics").get_data(as_text=True))
        assert metrics[("captioner_metrics_source_up", (("source", "database"),))] == 0
    finally:
        app.extensions["captioner"].engine.dispose()


def test_failure_reasons_become_a_small_label_set():
    from dashboard.ops import failure_kind

    assert failure_kind("image file not found in storage") == "not_found"
    assert (
        failure_kind("gave up after 3 attempts (worker lost or timed out each time)")
        == "lease_exhausted"
    )
    assert (
        failure_kind("could not read the image from storage after 5 attempts: timeout") == "storage"
    )
    assert failure_kind("something nobody foresaw") == "other"
    assert failure_kind(None) == "other"


def test_json_log_lines_carry_job_and_image_ids():
    stream = io.StringIO()
    logger = logging.getLogger("captioner.test_ops")
    handler = make_handler("json", stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with log_context(job_id=7, image_ids=[1, 2]):
            logger.info("batch %s done", "x", extra={"image_id": 2})
        logger.info("no context")
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "batch x done" and first["level"] == "INFO"
    assert first["job_id"] == 7 and first["image_id"] == 2 and first["image_ids"] == [1, 2]
    assert first["logger"] == "captioner.test_ops" and first["ts"].endswith("Z")
    assert "job_id" not in second and "image_id" not in second
    assert "ValueError: bad" in third["exc"]
    assert isinstance(JsonFormatter(), logging.Formatter) and isinstance(
        TextFormatter(), logging.Formatter
    )


def test_text_log_lines_name_the_job():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    record.job_id = 5
    assert TextFormatter().format(record).endswith("hello [job=5]")


REMOTE = {"REMOTE_ADDR": "203.0.113.7"}


def test_anonymous_health_from_elsewhere_says_only_ok(ops_app):
    client = ops_app.test_client()
    r = client.get("/health", environ_base=REMOTE)
    assert r.status_code == 200 and r.json == {"status": "ok"}
    # Behind a proxy the loopback address is the proxy's: a forwarded request is not local.
    r = client.get("/health", headers={"X-Forwarded-For": "203.0.113.7"})
    assert r.json == {"status": "ok"}
    # The loopback caller (the container's own health check) gets the details.
    assert set(client.get("/health").json["checks"]) == {"database", "redis", "storage"}


def test_anonymous_health_hides_errors_and_storage_location(dashboard_settings, publisher):
    from dashboard import create_app

    settings = dashboard_settings.model_copy(
        update={
            "redis_url": f"redis://127.0.0.1:{closed_port()}/0",
            "metrics_token": SecretStr("m-token"),
        }
    )
    app = create_app(settings, publisher=publisher)
    try:
        client = app.test_client()
        r = client.get("/health", environ_base=REMOTE)
        assert r.status_code == 503 and r.json == {"status": "unavailable"}
        body = r.get_data(as_text=True)
        assert "Connection" not in body and "objects" not in body and "redis" not in body
        # With the metrics token, the details (and the raw error) are there.
        auth = {"Authorization": "Bearer m-token"}
        r = client.get("/health", environ_base=REMOTE, headers=auth)
        assert r.status_code == 503 and r.json["status"] == "failing"
        assert "Connection" in r.json["checks"]["redis"]["error"]
    finally:
        app.extensions["captioner"].engine.dispose()


def test_metrics_need_the_token_or_a_loopback_caller(dashboard_settings, publisher, ops_redis):
    from dashboard import create_app

    settings = dashboard_settings.model_copy(
        update={"redis_url": ops_redis[0], "metrics_token": SecretStr("m-token")}
    )
    app = create_app(settings, publisher=publisher)
    try:
        client = app.test_client()
        r = client.get("/metrics", environ_base=REMOTE)
        assert r.status_code == 401 and b"captioner_" not in r.data
        r = client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"})
        assert r.status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.get("/metrics", environ_base=REMOTE, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer m-token"}
        r = client.get("/metrics", environ_base=REMOTE, headers=right)
        assert r.status_code == 200 and b"captioner_images" in r.data
        assert client.get("/metrics").status_code == 200  # loopback
    finally:
        app.extensions["captioner"].engine.dispose()


def test_without_a_metrics_token_only_loopback_reads_metrics(ops_app):
    client = ops_app.test_client()
    assert client.get("/metrics", environ_base=REMOTE).status_code == 401
    r = client.get("/metrics", environ_base=REMOTE, headers={"Authorization": "Bearer "})
    assert r.status_code == 401
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200


# --- HTTP request latency ---------------------------------------------------------------------

HTTP = "captioner_http_request_duration_seconds"


def request_counts(body: str) -> dict[tuple[str, str, str], float]:
    """(method, endpoint, status) -> requests counted by the latency histogram."""
    return {
        (s.labels["method"], s.labels["endpoint"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == f"{HTTP}_count"
    }


def test_request_latency_histogram_counts_requests_by_endpoint(ops_app):
    client = ops_app.test_client()
    admin = make_user(ops_app, "admin@example.com", "admin")
    for _ in range(2):
        assert client.get("/health").status_code == 200
    for job_id in (987_001, 987_002):  # two paths, one route
        assert client.get(f"/api/v1/jobs/{job_id}", headers=admin.headers).status_code == 404
    assert client.get("/no/such/page").status_code == 404
    odd_method = client.open("/health", method="BREW").status_code
    assert odd_method >= 400

    body = client.get("/metrics").get_data(as_text=True)
    got = request_counts(body)
    job_endpoint = ops_app.url_map.bind("localhost").match("/api/v1/jobs/1")[0]
    assert got[("GET", "ops.health", "200")] == 2
    assert got[("GET", job_endpoint, "404")] == 2
    assert got[("GET", "unmatched", "404")] == 1
    assert got[("other", "unmatched", str(odd_method))] == 1
    assert "987_001" not in body and "/api/v1/jobs" not in body and "/no/such" not in body
    # Every observation lands in the +Inf bucket and the sum is a duration.
    buckets = samples(body)
    inf = (("endpoint", "ops.health"), ("le", "+Inf"), ("method", "GET"), ("status", "200"))
    assert buckets[(f"{HTTP}_bucket", inf)] == 2
    health_sum = (("endpoint", "ops.health"), ("method", "GET"), ("status", "200"))
    assert 0 < buckets[(f"{HTTP}_sum", health_sum)] < 60
    # The scrape itself is counted once it is answered.
    assert (
        request_counts(client.get("/metrics").get_data(as_text=True))[("GET", "ops.metrics", "200")]
        == 1
    )


SCRAPE_AFTER_REQUESTS = """
import sys
from dashboard import create_app
client = create_app().test_client()
for _ in range(int(sys.argv[1])):
    assert client.get("/static/favicon.svg").status_code == 200
if sys.argv[2] == "scrape":
    sys.stdout.write(client.get("/metrics").get_data(as_text=True))
"""


def test_with_a_multiprocess_directory_every_process_counts_into_one_histogram(
    dashboard_settings, tmp_path
):
    """Two processes (as under gunicorn): the second one's scrape sums both."""
    import os
    import subprocess
    import sys

    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(shared),
        "CAPTIONER_DATA_DIR": str(dashboard_settings.data_dir),
        "CAPTIONER_DATABASE_URL": dashboard_settings.database_url,
        "CAPTIONER_STORAGE_URL": dashboard_settings.storage_url,
        "CAPTIONER_REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0",
        "CAPTIONER_SECRET_KEY": "multiprocess-test",
    }

    def run(n: int, then: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", SCRAPE_AFTER_REQUESTS, str(n), then],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    run(3, "exit")
    got = request_counts(run(2, "scrape"))
    assert got[("GET", "static", "200")] == 5
    assert any(shared.iterdir())


def test_grafana_dashboard_queries_only_series_the_metrics_endpoint_exposes(ops_app):
    """deploy/grafana/captioner.json parses, and every metric its PromQL names is one a scrape
    of /metrics returns (family or sample name), for each series the dashboard must show."""
    import re
    from pathlib import Path

    dashboard = json.loads(
        (Path(__file__).resolve().parents[1] / "deploy/grafana/captioner.json").read_text()
    )
    client = ops_app.test_client()
    assert client.get("/health").status_code == 200
    body = client.get("/metrics").get_data(as_text=True)
    exposed = set()
    for family in text_string_to_metric_families(body):
        exposed.add(family.name)
        exposed.update(s.name for s in family.samples)

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    exprs = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    assert exprs
    named = set()
    for expr in exprs:
        names = set(re.findall(r"\b(captioner_[a-z0-9_]+)", expr))
        assert names, f"no captioner series in {expr!r}"
        assert names <= exposed, f"{expr!r}: not exposed: {sorted(names - exposed)}"
        named |= names
    for series in (
        "captioner_queue_depth",
        "captioner_images",
        "captioner_images_finished_total",
        "captioner_caption_latency_seconds_bucket",
        "captioner_images_failed",
        "captioner_reviews_total",
        f"{HTTP}_count",
        f"{HTTP}_bucket",
        "captioner_training_runs",
    ):
        assert series in named, series
    assert {"uid", "title", "schemaVersion"} <= set(dashboard)
