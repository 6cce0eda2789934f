"""Property-based API testing: schemathesis generates requests from `/api/openapi.json` and calls
the app in-process (WSGI), authenticated as an admin with a personal API token, over a database
that holds a finished job with captions and reviews.

Every response must not be a server error (5xx) and must match the schema the document
declares for its status code. Examples per operation are bounded to keep the run short.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.dashboard_helpers import fake_caption, make_user

MAX_EXAMPLES = 8


@dataclass
class Seeded:
    token: str
    ids: dict[str, int]  # a real value for each path parameter


@pytest.fixture
def seeded(app):
    """An admin (whose token authenticates every request) owning a captioned job, a webhook and
    a spare token; a submitter to edit. `ids` pins path parameters to these rows, so the
    success paths are generated too, not only 404s."""
    from captioner.state import jobs
    from captioner.state.db import session_scope
    from captioner.state.models import ApiToken, Webhook

    admin = make_user(app, "admin@example.com", "admin")
    other = make_user(app, "sub@example.com", "submitter")
    with session_scope(app.extensions["captioner"].sessionmaker) as s:
        job = jobs.create_job(s, "seed", owner_id=admin.id)
        jobs.submit_images(s, job.id, [f"seed/{i}.png" for i in range(3)])
        _, spare = ApiToken.issue(admin.id, "spare")
        hook = Webhook(owner_id=admin.id, url="https://hooks.example.com/x", secret="s", events=[])
        s.add_all([spare, hook])
        s.flush()
        ids = {"job_id": job.id, "token_id": spare.id, "webhook_id": hook.id, "user_id": other.id}
    ids["image_id"] = fake_caption(app, ids["job_id"])[0]
    with session_scope(app.extensions["captioner"].sessionmaker) as s:  # the learning loop's rows
        from captioner.state.models import ModelVersion, TrainingRun

        ids["version_id"] = s.query(ModelVersion.id).order_by(ModelVersion.id).first()[0]
        run = TrainingRun(params={"trigger": "manual"})
        s.add(run)
        s.flush()
        ids["run_id"] = run.id
    return Seeded(admin.token, ids)


def _failures_for(operation, headers: dict[str, str], path_parameters=None) -> list[str]:
    """Run bounded generated cases against one operation; the failures found, described."""
    found: list[str] = []
    strategy = (
        operation.as_strategy(path_parameters=path_parameters)
        if path_parameters
        else operation.as_strategy()
    )

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    def run(case):
        try:
            case.call_and_validate(
                headers=headers, checks=[not_a_server_error, response_schema_conformance]
            )
        except Exception as exc:  # a failed check, or an error the app raised (TESTING)
            found.append(f"{operation.label} {path_parameters or ''}: {type(exc).__name__}: {exc}")
            raise

    try:
        run()
    except Exception:  # recorded in `found`; go on to the next operation
        pass
    return found


def test_api_conforms_to_its_openapi_document(app, seeded):
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
    headers = {"Authorization": f"Bearer {seeded.token}"}
    operations = sorted(
        (result.ok() for result in schema.get_all_operations()),
        key=lambda op: op.method.upper() == "DELETE",
    )
    labels = {op.label for op in operations}
    # The run covers the whole API, not a part that happened to load.
    assert {"POST /api/v1/jobs", "POST /api/v1/jobs/upload", "GET /api/v1/review/queue"} <= labels
    assert len(operations) >= 20
    failures = []
    for op in operations:
        failures += _failures_for(op, headers)
        names = {p.name for p in op.iter_parameters() if p.location == "path"}
        if names:
            # Again with real ids: the success paths (deletes last, so the rows exist before).
            failures += _failures_for(op, headers, {n: seeded.ids[n] for n in names})
    assert not failures, "\n\n".join(failures)


def test_document_covers_the_api(client):
    spec = client.get("/api/openapi.json").get_json()
    paths = spec["paths"]
    assert "/api/v1/jobs" in paths and "/api/v1/jobs/upload" in paths
    assert "/api/v1/review/queue" in paths and "/api/v1/webhooks" in paths
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
