"""Property-based API testing: schemathesis generates requests from `/api/openapi.json` and calls
the app in-process (WSGI), authenticated as an admin with a personal API token, over a database
that holds a finished job with captions and reviews.

Every response must not be a server error (5xx) and must match the schema the document
declares for its status code. Examples per operation are bounded to keep the run short. The
statuses seen per operation are counted: generated bodies that pass the document's schema must
pass validation too and reach the logic (job creation: a 2xx, not only 422s).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from dashboard import MAX_ID
from tests.dashboard_helpers import fake_caption, make_user

MAX_EXAMPLES = 8
REFUSED = "refused by validation"  # a 422 from the input schemas, not from the logic
Statuses = defaultdict[str, Counter]  # operation label -> status code (or REFUSED) -> responses


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


def _outcome(response) -> int | str:
    if response.status_code == 422 and response.json().get("message") == "Validation error":
        return REFUSED
    return response.status_code


def _failures_for(
    operation, headers: dict[str, str], statuses: Statuses, path_parameters=None
) -> list[str]:
    """Run bounded generated cases against one operation; the failures found, described. Each
    response's status is counted in `statuses`."""
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
            response = case.call(headers=headers)
            statuses[operation.label][_outcome(response)] += 1
            case.validate_response(
                response, checks=[not_a_server_error, response_schema_conformance]
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
    statuses: Statuses = defaultdict(Counter)
    for op in operations:
        failures += _failures_for(op, headers, statuses)
        names = {p.name for p in op.iter_parameters() if p.location == "path"}
        if names:
            # Again with real ids: the success paths (deletes last, so the rows exist before).
            failures += _failures_for(op, headers, statuses, {n: seeded.ids[n] for n in names})
    assert not failures, "\n\n".join(failures)
    # Generated job bodies follow the document's oneOf, so validation lets every one through to
    # the submission logic, which accepts some.
    created = statuses["POST /api/v1/jobs"]
    assert created.total() >= MAX_EXAMPLES and REFUSED not in created, dict(created)
    assert any(isinstance(code, int) and 200 <= code < 300 for code in created), dict(created)


def test_document_covers_the_api(client):
    spec = client.get("/api/openapi.json").get_json()
    paths = spec["paths"]
    assert "/api/v1/jobs" in paths and "/api/v1/jobs/upload" in paths
    assert "/api/v1/review/queue" in paths and "/api/v1/webhooks" in paths
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_document_states_what_validation_enforces(client):
    spec = client.get("/api/openapi.json").get_json()
    id_parameters = [
        parameter
        for operations in spec["paths"].values()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "path"
    ]
    assert len(id_parameters) >= 15
    for parameter in id_parameters:
        assert parameter["schema"] == {"type": "integer", "minimum": 1, "maximum": MAX_ID}

    body = spec["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    shapes = [
        spec["components"]["schemas"][ref["$ref"].split("/")[-1]] for ref in body["schema"]["oneOf"]
    ]
    sources = {"keys", "prefix", "urls"}
    assert [shape["required"] for shape in shapes] == [["keys"], ["prefix"], ["urls"]]
    for shape in shapes:
        assert shape["additionalProperties"] is False  # so a body matches exactly one shape
        assert len(sources & set(shape["properties"])) == 1
        assert {"name", "priority", "num_beams", "n_best"} <= set(shape["properties"])


@pytest.mark.parametrize("id_", ["0", str(MAX_ID + 1), "2199023255551", "9" * 5000])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/images/{}"),
        ("GET", "/api/v1/images/{}/reviews"),
        ("POST", "/api/v1/jobs/{}/cancel"),
    ],
)
def test_ids_out_of_range_answer_404(app, client, method, path, id_):
    """404 in the API's error shape, authenticated as an admin: never 405 (a rule for another
    method on the same path) nor 500 (an id the database integer cannot hold)."""
    headers = {"Authorization": f"Bearer {make_user(app, 'admin@example.com', 'admin').token}"}
    response = client.open(path.format(id_), method=method, headers=headers)
    assert response.status_code == 404
    assert response.get_json() == {"message": "Not Found", "detail": {}}
