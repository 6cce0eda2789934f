"""Property-based API testing: schemathesis generates requests from `/api/openapi.json` and calls
the app in-process (WSGI), authenticated as an admin with a personal API token, over a database
that holds a finished job with captions and reviews, an export, a webhook and a training run.

Every response must not be a server error (5xx), must have a status the document lists for the
operation, and must match the schema the document declares for that status. Examples per
operation are bounded to keep the run short. The statuses seen per operation are counted: every
operation must reach its logic (some answer other than 401, 403 or 422), and job creation's
generated bodies, which follow the document's oneOf, must pass validation too (a 2xx, not only
422s). Where success needs content a generator does not make (an image file, a stored key, a
receiver URL the settings allow, an import row naming a stored key) the operation also gets
one request made by hand (`HAND_MADE`), checked the same way.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from dashboard import MAX_ID
from tests.dashboard_helpers import fake_caption, make_user, png

MAX_EXAMPLES = 8
REFUSED = "refused by validation"  # a 422 from the input schemas, not from the logic
NOT_THE_LOGIC = {401, 403, 422, REFUSED}  # answers that do not show the logic was reached
Statuses = defaultdict[str, Counter]  # operation label -> status code (or REFUSED) -> responses


@dataclass
class Seeded:
    token: str
    ids: dict[str, int]  # a real value for each path parameter


@pytest.fixture
def seeded(app):
    """An admin (whose token authenticates every request) owning a captioned job, a webhook, a
    finished export and a spare token; a submitter to edit. `ids` pins path parameters to these
    rows, so the success paths are generated too, not only 404s. The store is shared with every
    submitter and webhooks may go to loopback, so keys and receivers can be accepted."""
    from captioner.state import jobs
    from captioner.state.db import session_scope
    from captioner.state.models import ApiToken, Export, ExportStatus, Webhook

    ext = app.extensions["captioner"]
    ext.settings = ext.settings.model_copy(
        update={"source_prefixes": [""], "webhook_allow_hosts": ["127.0.0.1"]}
    )
    admin = make_user(app, "admin@example.com", "admin")
    other = make_user(app, "sub@example.com", "submitter")
    ext.store.put("exports/seed.jsonl", b'{"caption": "a seed"}\n')
    with session_scope(ext.sessionmaker) as s:
        job = jobs.create_job(s, "seed", owner_id=admin.id)
        jobs.submit_images(s, job.id, [f"seed/{i}.png" for i in range(3)])
        _, spare = ApiToken.issue(admin.id, "spare")
        hook = Webhook(owner_id=admin.id, url="https://hooks.example.com/x", secret="s", events=[])
        done = Export(
            owner_id=admin.id,
            job_id=job.id,
            format="jsonl",
            status=ExportStatus.DONE,
            object_key="exports/seed.jsonl",
            size_bytes=22,
        )
        s.add_all([spare, hook, done])
        s.flush()
        ids = {
            "job_id": job.id,
            "token_id": spare.id,
            "webhook_id": hook.id,
            "user_id": other.id,
            "export_id": done.id,
        }
    for i in range(3):
        ext.store.put(f"seed/{i}.png", png((i, 40, 80)))
    ids["image_id"] = fake_caption(app, ids["job_id"])[0]
    with session_scope(ext.sessionmaker) as s:  # the learning loop's rows
        from captioner.state.models import ModelVersion, TrainingRun

        ids["version_id"] = s.query(ModelVersion.id).order_by(ModelVersion.id).first()[0]
        run = TrainingRun(params={"trigger": "manual"})
        s.add(run)
        s.flush()
        ids["run_id"] = run.id
    return Seeded(admin.token, ids)


# --- requests made by hand ----------------------------------------------------------------


def _images_upload(operation):
    """Two real image files and one that is not: a job of two, the third listed as refused."""
    body = {"name": "by hand", "files": [png((7, 70, 140)), png((9, 90, 180)), b"not an image"]}
    return operation.Case(body=body, media_type="multipart/form-data")


def _one_image(operation):
    return operation.Case(body={"file": png((11, 110, 210))}, media_type="multipart/form-data")


def _loopback_receiver(operation):
    return operation.Case(body={"url": "http://127.0.0.1:9/hook"}, media_type="application/json")


def _rows_of_stored_keys(operation):
    rows = [{"key": "seed/1.png", "caption": "an imported caption", "score": -0.5}]
    return operation.Case(body={"name": "imported", "rows": rows}, media_type="application/json")


# Operations whose success needs content a generator does not make (an image file, a receiver
# URL the settings allow, a row naming a stored key): each also gets this request, checked
# like the generated ones.
HAND_MADE: dict[str, Callable] = {
    "POST /api/v1/jobs/upload": _images_upload,
    "POST /api/v1/try": _one_image,
    "POST /api/v1/webhooks": _loopback_receiver,
    "POST /api/v1/imports": _rows_of_stored_keys,
}


def _check(operation, case, headers: dict[str, str], statuses: Statuses) -> None:
    """Send one case, count its status, and run the checks (raises when one fails)."""
    response = case.call(headers=headers)
    statuses[operation.label][_outcome(response)] += 1
    case.validate_response(
        response,
        checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
    )


def _hand_made_failures(operation, headers: dict[str, str], statuses: Statuses) -> list[str]:
    try:
        _check(operation, HAND_MADE[operation.label](operation), headers, statuses)
    except Exception as exc:  # a failed check, or an error the app raised (TESTING)
        return [f"{operation.label} by hand: {type(exc).__name__}: {exc}"]
    return []


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
            _check(operation, case, headers, statuses)
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
        if op.label in HAND_MADE:
            failures += _hand_made_failures(op, headers, statuses)
    assert not failures, "\n\n".join(failures)
    # Every operation reached its logic: some answer was not 401, 403 or 422.
    unreached = {
        label: dict(seen) for label, seen in statuses.items() if set(seen) <= NOT_THE_LOGIC
    }
    assert not unreached, unreached
    assert {op.label for op in operations} <= set(statuses)
    # Generated job bodies follow the document's oneOf, so validation lets every one through to
    # the submission logic, which accepts some.
    created = statuses["POST /api/v1/jobs"]
    assert created.total() >= MAX_EXAMPLES and REFUSED not in created, dict(created)
    assert any(isinstance(code, int) and 200 <= code < 300 for code in created), dict(created)
    uploaded = statuses["POST /api/v1/jobs/upload"]
    assert any(isinstance(code, int) and 200 <= code < 300 for code in uploaded), dict(uploaded)


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
