"""`captioner.client` against the dashboard served over HTTP (werkzeug in a thread): submit,
wait and export; review and undo; iterating pages of images and of the review queue; each error
type with its reasons."""

from __future__ import annotations

import csv
import io
import json
import threading
from collections import Counter
from urllib.parse import urlsplit

import pytest
import requests

from captioner.client import (
    AuthError,
    CaptionerClient,
    CaptionerError,
    Job,
    NotFound,
    Refused,
    ServerUnreachable,
    SubmitOptions,
    WaitTimeout,
)
from captioner.state.models import ImageStatus, JobStatus, ReviewDecision
from tests.conftest import free_port
from tests.dashboard_helpers import fake_caption, make_user, make_zip, png


class Served:
    """The test app on a loopback port, with an account per role."""

    def __init__(self, app) -> None:
        from werkzeug.serving import make_server

        self.app = app
        self.tokens = {
            role: make_user(app, f"client-{role}@example.com", role).token
            for role in ("admin", "reviewer", "submitter")
        }
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        # Requests per API path, counted by a response hook of the clients' shared session.
        self.calls: Counter[str] = Counter()
        self.http = requests.Session()
        self.http.hooks["response"].append(self._count)

    def _count(self, response, *args, **kwargs):
        self.calls[urlsplit(response.url).path] += 1

    def client(self, role: str = "admin") -> CaptionerClient:
        return CaptionerClient(self.url, self.tokens[role], timeout=30, session=self.http)

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(10)
        self.http.close()


@pytest.fixture
def served(app):
    server = Served(app)
    yield server
    server.close()


def _folder(tmp_path, n: int):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i in range(n):
        sub = folder / "nested" if i % 2 else folder
        (sub / f"img-{i}.png").write_bytes(png((i * 20, 40, 90)))
    (folder / "notes.txt").write_text("not an image")  # left out of the upload
    return folder


def _captioned_job(served, tmp_path, n: int, scores=None) -> Job:
    job = served.client().submit_folder(_folder(tmp_path, n), SubmitOptions(name="pages"))
    fake_caption(served.app, job.id, scores=scores)
    return job


def test_submit_a_folder_wait_and_export_round_trip(served, tmp_path, publisher):
    client = served.client()
    options = SubmitOptions(name="round trip", num_beams=2, n_best=2)
    job = client.submit_folder(_folder(tmp_path, 3), options)
    assert isinstance(job, Job) and job.name == "round trip" and job.image_count == 3
    assert job.status == JobStatus.QUEUED and job.options["num_beams"] == 2
    assert len(publisher.ids_for(job.id)) == 3

    with pytest.raises(WaitTimeout) as waited:
        client.wait(job.id, timeout=0, poll=0.01)
    assert waited.value.job.progress.queued == 3 and not waited.value.job.ended

    fake_caption(served.app, job.id)
    seen: list[Job] = []
    done = client.wait(job.id, timeout=30, poll=0.01, progress=seen.append)
    assert done.status == JobStatus.FINISHED and done.ended and done.finished_at is not None
    assert (done.progress.captioned, done.progress.failed, done.progress.total) == (3, 0, 3)
    assert seen[-1] == done

    out = tmp_path / "captions.jsonl"
    written = client.export("jsonl", job_id=job.id, to=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == out.stat().st_size
    assert sorted(r["file_name"] for r in rows) == ["img-0.png", "img-1.png", "img-2.png"]
    assert all(r["model_caption"] == f"a photo of {r['file_name']}" for r in rows)

    buffer = io.BytesIO()
    assert client.export("csv", job_id=job.id, which="model", to=buffer) == len(buffer.getvalue())
    table = list(csv.DictReader(io.StringIO(buffer.getvalue().decode())))
    assert sorted(r["model_caption"] for r in table) == sorted(r["model_caption"] for r in rows)

    assert [j.id for j in client.jobs()] == [job.id]
    assert client.job(job.id) == done


def test_submit_files_zip_keys_prefix_and_urls(served, tmp_path, publisher):
    client = served.client()
    one = tmp_path / "one.png"
    one.write_bytes(png())
    by_file = client.submit_files([one], SubmitOptions(name="file", interactive=True))
    assert by_file.image_count == 1 and by_file.options["interactive"] is True
    assert len(publisher.ids_for(by_file.id)) == 1

    archive = tmp_path / "batch.zip"
    archive.write_bytes(make_zip({"a.png": png((1, 2, 3)), "b.png": png((4, 5, 6))}))
    assert client.submit_zip(archive).image_count == 2

    keys = client.submit_keys(["photos/a.jpg", "photos/b.jpg"], SubmitOptions(priority=5))
    assert keys.image_count == 2 and keys.priority == 5 and keys.name == "untitled"

    publisher.tasks.clear()
    prefix = client.submit_prefix("photos/2024/", SubmitOptions(name="prefix"))
    assert prefix.image_count == 0
    urls = client.submit_urls(["https://example.com/a.jpg"], SubmitOptions(recaption=True))
    assert urls.options["recaption"] is True
    assert publisher.tasks == [
        ("captioner.enumerate_prefix", (prefix.id,)),
        ("captioner.fetch_urls", (urls.id,)),
    ]


def test_iterates_more_than_one_page_of_images(served, tmp_path):
    client = served.client()
    job = _captioned_job(served, tmp_path, 5)
    path = f"/api/v1/jobs/{job.id}/images"

    images = list(client.images(job.id, page_size=2))
    assert served.calls[path] == 3
    assert [i.id for i in images] == sorted(i.id for i in images) and len(images) == 5
    assert all(i.status == ImageStatus.CAPTIONED and i.caption for i in images)
    assert images[0].caption.candidates[1].text == images[0].caption.text + " again"

    served.calls.clear()
    assert list(client.images(job.id, status=ImageStatus.FAILED, page_size=2)) == []
    assert served.calls[path] == 1


def test_iterates_more_than_one_page_of_the_review_queue(served, tmp_path):
    scores = [-0.5, -3.0, -1.0, -2.0, -4.0]
    job = _captioned_job(served, tmp_path, 5, scores=scores)
    reviewer = served.client("reviewer")

    queue = list(reviewer.review_queue(job_id=job.id, page_size=2))
    assert served.calls["/api/v1/review/queue"] == 3
    assert [i.caption.score for i in queue] == sorted(scores)
    assert len({i.id for i in queue}) == 5

    few = list(reviewer.review_queue(job_id=job.id, max_score=-2.0, page_size=10))
    assert [i.caption.score for i in few] == [-4.0, -3.0, -2.0]


def test_review_and_undo(served, tmp_path):
    job = _captioned_job(served, tmp_path, 2)
    reviewer = served.client("reviewer")
    first, second = list(reviewer.images(job.id))

    approved = reviewer.review(first.id, ReviewDecision.APPROVED)
    assert approved.decision == ReviewDecision.APPROVED and approved.image_id == first.id
    assert approved.reviewer == "client-reviewer@example.com"
    corrected = reviewer.review(second.id, "corrected", "a red square")
    assert corrected.decision == ReviewDecision.CORRECTED and corrected.text == "a red square"
    assert reviewer.image(second.id).review == corrected
    assert [i.id for i in reviewer.review_queue(job_id=job.id)] == []

    undone = reviewer.undo(second.id)
    assert undone.decision == ReviewDecision.UNDONE and undone.undoes_id == corrected.id
    assert [r.decision for r in reviewer.reviews(second.id)] == [
        ReviewDecision.CORRECTED,
        ReviewDecision.UNDONE,
    ]
    assert [i.id for i in reviewer.review_queue(job_id=job.id)] == [second.id]

    with pytest.raises(CaptionerError) as nothing_to_undo:
        reviewer.undo(second.id)
    assert nothing_to_undo.value.status == 409 and type(nothing_to_undo.value) is CaptionerError


def test_server_unreachable():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable) as error:
        CaptionerClient(url, "token").job(1)
    assert str(error.value) == f"cannot reach the server at {url}" and error.value.status is None


def test_auth_errors(served, tmp_path):
    with pytest.raises(AuthError) as bad_token:
        CaptionerClient(served.url, "not-a-token", session=served.http).job(1)
    assert bad_token.value.status == 401 and str(bad_token.value).startswith("401: ")

    job = _captioned_job(served, tmp_path, 1)
    image = next(served.client().images(job.id))
    with pytest.raises(AuthError) as wrong_role:
        served.client("submitter").review(image.id, "approved")
    assert wrong_role.value.status == 403


def test_not_found(served):
    client = served.client()
    with pytest.raises(NotFound) as error:
        client.job(999_999)
    assert error.value.status == 404 and "999999" in error.value.message
    with pytest.raises(NotFound):
        list(client.images(999_999))
    with pytest.raises(NotFound):
        client.undo(999_999)


def test_refused_with_the_api_message_and_reasons_per_field(served, tmp_path):
    client = served.client()
    one = tmp_path / "one.png"
    one.write_bytes(png())
    with pytest.raises(Refused) as invalid:
        client.submit_files([one], SubmitOptions(num_beams=0, n_best=20))
    error = invalid.value
    assert error.status == 422 and error.message == "Validation error"
    assert set(error.reasons) == {"num_beams", "n_best"}
    assert str(error).startswith("422: Validation error: ") and "num_beams: " in str(error)

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"<html>not an image</html>")
    with pytest.raises(Refused) as unreadable:
        client.submit_files([junk])
    assert unreadable.value.status == 422 and "junk.png" in unreadable.value.message

    with pytest.raises(Refused) as prefix:
        client.submit_prefix("", SubmitOptions(interactive=True))
    assert prefix.value.status == 422

    with pytest.raises(Refused) as no_source:
        client.request("POST", "/jobs", json={"name": "nothing"})
    assert no_source.value.reasons == {"_schema": ["give exactly one of keys, prefix or urls"]}
