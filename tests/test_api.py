"""The JSON API with Flask's test client: every endpoint's success and its 4xx cases."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest
from dashboard_helpers import PASSWORD, fake_caption, image_ids, login, make_user, make_zip, png
from sqlalchemy import func, select

from captioner import tasks
from captioner.state.db import session_scope
from captioner.state.models import Image, ImageStatus, Job, Review, WebhookDelivery


@pytest.fixture
def users(app):
    return {
        "admin": make_user(app, "admin@example.com", "admin"),
        "reviewer": make_user(app, "rev@example.com", "reviewer"),
        "alice": make_user(app, "alice@example.com", "submitter"),
        "bob": make_user(app, "bob@example.com", "submitter"),
    }


def upload(client, account, files=(), archive=None, **form):
    data = {k: str(v) for k, v in form.items()}
    data["files"] = [(io.BytesIO(content), name) for name, content in files]
    if archive is not None:
        data["archive"] = (io.BytesIO(archive), "photos.zip")
    return client.post(
        "/api/v1/jobs/upload",
        data=data,
        headers=account.headers,
        content_type="multipart/form-data",
    )


def count(app, model) -> int:
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        return session.scalar(select(func.count()).select_from(model))


def stored_objects(app) -> list[str]:
    return list(app.extensions["captioner"].store.list(""))


def test_web_process_never_imports_torch():
    code = (
        "import sys\nfrom dashboard import create_app\ncreate_app()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')"
    )
    env = os.environ | {"CAPTIONER_SECRET_KEY": "test-secret"}  # the default is refused
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_bad_token_is_401_and_no_token_is_401(client, users):
    assert client.get("/api/v1/jobs").status_code == 401
    r = client.get("/api/v1/jobs", headers={"Authorization": "Bearer cap_nope"})
    assert r.status_code == 401 and "invalid" in r.json["message"]
    assert (
        client.get("/api/v1/me", headers=users["alice"].headers).json["email"]
        == "alice@example.com"
    )


def test_revoked_token_is_401(client, users):
    alice = users["alice"]
    created = client.post("/api/v1/tokens", json={"name": "laptop"}, headers=alice.headers)
    assert created.status_code == 201 and created.json["token"].startswith("cap_")
    new = {"Authorization": f"Bearer {created.json['token']}"}
    assert client.get("/api/v1/me", headers=new).status_code == 200
    listed = client.get("/api/v1/tokens", headers=alice.headers).json["items"]
    assert all("token" not in t for t in listed)  # shown once, never listed
    assert (
        client.delete(f"/api/v1/tokens/{created.json['id']}", headers=alice.headers).status_code
        == 204
    )
    assert client.get("/api/v1/me", headers=new).status_code == 401
    # Another user cannot revoke alice's token.
    assert (
        client.delete(f"/api/v1/tokens/{listed[0]['id']}", headers=users["bob"].headers).status_code
        == 404
    )


def test_upload_files_creates_job_and_publishes_after_commit(app, client, users, publisher):
    r = upload(
        client,
        users["alice"],
        files=[("a.png", png()), ("b.png", png((0, 0, 255)))],
        name="two",
        n_best=2,
    )
    assert r.status_code == 202, r.json
    job = r.json
    assert job["name"] == "two" and job["progress"]["queued"] == 2 and job["options"]["n_best"] == 2
    assert publisher.ids_for(job["id"]) == image_ids(app, job["id"])
    detail = client.get(f"/api/v1/jobs/{job['id']}", headers=users["alice"].headers).json
    assert detail["progress"]["total"] == 2


def test_zip_upload_and_progress_and_images(app, client, users):
    archive = make_zip(
        {"x/one.png": png(), "two.png": png((1, 2, 3)), "__MACOSX/._two.png": b"junk"}
    )
    r = upload(client, users["alice"], archive=archive)
    assert r.status_code == 202, r.json
    job_id = r.json["id"]
    assert r.json["source"] == "zip:photos.zip"
    fake_caption(app, job_id)
    detail = client.get(f"/api/v1/jobs/{job_id}", headers=users["alice"].headers).json
    assert detail["status"] == "finished" and detail["progress"]["percent"] == 100.0
    images = client.get(f"/api/v1/jobs/{job_id}/images", headers=users["alice"].headers).json
    assert {i["original_name"] for i in images["items"]} == {"one.png", "two.png"}
    first = images["items"][0]
    assert first["caption"]["text"].startswith("a photo of")
    content = client.get(first["content_url"], headers=users["alice"].headers)
    assert (
        content.status_code == 200
        and content.mimetype == "image/png"
        and content.data[:4] == b"\x89PNG"
    )


def test_other_submitters_job_is_404(app, client, users):
    job_id = upload(client, users["alice"], files=[("a.png", png())]).json["id"]
    [image_id] = image_ids(app, job_id)
    bob = users["bob"].headers
    for path in (
        f"/api/v1/jobs/{job_id}",
        f"/api/v1/jobs/{job_id}/images",
        f"/api/v1/images/{image_id}",
        f"/api/v1/images/{image_id}/content",
        f"/api/v1/images/{image_id}/reviews",
        f"/api/v1/export?job_id={job_id}",
    ):
        assert client.get(path, headers=bob).status_code == 404, path
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=bob).status_code == 404
    assert client.post(f"/api/v1/jobs/{job_id}/retry", headers=bob).status_code == 404
    assert client.get("/api/v1/jobs", headers=bob).json["total"] == 0
    # A reviewer sees every job.
    assert (
        client.get(f"/api/v1/jobs/{job_id}", headers=users["reviewer"].headers).status_code == 200
    )


def test_oversize_upload_is_413(app, client, users):
    settings = app.extensions["captioner"].settings
    app.config["MAX_CONTENT_LENGTH"] = 50_000
    r = upload(client, users["alice"], files=[("big.png", png() + b"\0" * 60_000)])
    assert r.status_code == 413
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    settings_small = settings.model_copy(update={"max_image_bytes": 20})
    app.extensions["captioner"].settings = settings_small
    r = upload(client, users["alice"], files=[("a.png", png())])
    assert r.status_code == 413 and "larger than 20 bytes" in r.json["message"]
    assert count(app, Job) == 0 and stored_objects(app) == []


def test_unsupported_file_is_422_with_reason(app, client, users, bad_inputs):
    pdf = bad_inputs["document.pdf.jpg"][0]
    r = upload(client, users["alice"], files=[("doc.jpg", pdf)])
    assert r.status_code == 422 and r.json["message"] == "doc.jpg: unsupported format PDF"
    assert r.json["detail"]["refused"] == [{"name": "doc.jpg", "reason": "unsupported format PDF"}]
    r = upload(client, users["alice"], files=[("bomb.png", bad_inputs["bomb_40000x40000.png"][0])])
    assert r.status_code == 422 and "image too large" in r.json["message"]
    assert count(app, Job) == 0 and count(app, Image) == 0 and stored_objects(app) == []


def _zip_with_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("link.png")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        z.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb.png", b"\0" * (20 * 1024 * 1024))
    return buf.getvalue()


@pytest.mark.parametrize(
    "archive, reason",
    [
        (lambda: make_zip({"../../evil.png": png()}), "path escapes"),
        (lambda: make_zip({"/abs/evil.png": png()}), "absolute path"),
        (_zip_with_symlink, "symbolic link"),
        (_zip_bomb, "compression ratio"),
        (lambda: b"PK\x03\x04 not really a zip", "not a valid zip"),
        (lambda: make_zip({"notes.txt": b"hello"}), "notes.txt: not an image"),
    ],
    ids=["zip-slip", "absolute", "symlink", "bomb", "corrupt", "not-image"],
)
def test_hostile_zips_are_422_and_store_nothing(app, client, users, archive, reason):
    r = upload(client, users["alice"], archive=archive())
    assert r.status_code == 422 and reason in r.json["message"], r.json
    assert count(app, Job) == 0 and count(app, Image) == 0 and stored_objects(app) == []


def test_zip_member_count_cap(app, client, users):
    app.extensions["captioner"].settings = app.extensions["captioner"].settings.model_copy(
        update={"zip_max_members": 2}
    )
    r = upload(
        client, users["alice"], archive=make_zip({f"{i}.png": png((i, 0, 0)) for i in range(3)})
    )
    assert r.status_code == 422 and "3 members > limit 2" in r.json["message"]


def test_bulk_keys_accepted_in_one_call(app, client, users, publisher):
    keys = [f"bulk/{i:05d}.jpg" for i in range(10_000)]
    r = client.post(
        "/api/v1/jobs", json={"name": "bulk", "keys": keys}, headers=users["alice"].headers
    )
    assert r.status_code == 202 and r.json["image_count"] == 10_000
    assert len(publisher.ids_for(r.json["id"])) == 10_000
    bad = client.post(
        "/api/v1/jobs", json={"keys": ["../etc/passwd"]}, headers=users["alice"].headers
    )
    assert bad.status_code == 422 and "invalid object key" in bad.json["message"]
    both = client.post(
        "/api/v1/jobs",
        json={"keys": ["a.jpg"], "urls": ["https://example.com/a.jpg"]},
        headers=users["alice"].headers,
    )
    assert both.status_code == 422


def test_prefix_is_enumerated_in_background(client, users, publisher):
    r = client.post("/api/v1/jobs", json={"prefix": "photos/2024/"}, headers=users["alice"].headers)
    assert r.status_code == 202 and r.json["image_count"] == 0
    assert publisher.tasks == [("captioner.enumerate_prefix", (r.json["id"],))]
    outside = client.post(
        "/api/v1/jobs", json={"prefix": "s3://other/x/"}, headers=users["alice"].headers
    )
    assert outside.status_code == 422


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.png",
        "http://localhost:8080/a.png",
        "file:///etc/passwd",
        "gopher://example.com/",
        "http://10.1.2.3/a.jpg",
    ],
)
def test_private_urls_refused_at_submit(app, client, users, url, publisher):
    r = client.post(
        "/api/v1/jobs",
        json={"urls": ["https://example.com/ok.jpg", url]},
        headers=users["alice"].headers,
    )
    assert r.status_code == 422 and "refused URL" in r.json["message"]
    assert count(app, Job) == 0 and publisher.tasks == []


def test_public_urls_go_to_background_fetch(client, users, publisher):
    r = client.post(
        "/api/v1/jobs", json={"urls": ["https://example.com/a.jpg"]}, headers=users["alice"].headers
    )
    assert r.status_code == 202 and "urls" not in r.json["options"]
    assert publisher.tasks == [("captioner.fetch_urls", (r.json["id"],))]


def test_cancel_and_retry(app, client, users, publisher):
    alice = users["alice"].headers
    job_id = upload(
        client, users["alice"], files=[("a.png", png()), ("b.png", png((5, 5, 5)))]
    ).json["id"]
    r = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=alice)
    assert (
        r.status_code == 200
        and r.json["status"] == "cancelled"
        and r.json["progress"]["failed"] == 2
    )
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=alice).status_code == 409
    images = client.get(f"/api/v1/jobs/{job_id}/images?status=failed", headers=alice).json["items"]
    assert {i["failure_reason"] for i in images} == {"job cancelled"}
    before = len(publisher.sent)
    r = client.post(f"/api/v1/jobs/{job_id}/retry", headers=alice)
    assert r.json["count"] == 2 and len(publisher.sent) == before + 1
    assert client.get(f"/api/v1/jobs/{job_id}", headers=alice).json["progress"]["queued"] == 2


def test_identical_images_reuse_the_active_models_caption(app, client, users, publisher):
    first = upload(client, users["alice"], files=[("a.png", png())]).json["id"]
    fake_caption(app, first, texts=["a red square"])
    again = upload(client, users["bob"], files=[("copy.png", png())]).json
    assert again["status"] == "finished" and again["progress"]["captioned"] == 1
    assert publisher.ids_for(again["id"]) == []
    [image] = client.get(f"/api/v1/jobs/{again['id']}/images", headers=users["bob"].headers).json[
        "items"
    ]
    assert image["caption"]["text"] == "a red square"
    forced = upload(client, users["bob"], files=[("copy.png", png())], recaption="true").json
    assert forced["progress"]["queued"] == 1 and len(publisher.ids_for(forced["id"])) == 1


def test_upload_finished_by_reused_captions_records_and_publishes_one_webhook(
    app, client, users, publisher
):
    hook = client.post(
        "/api/v1/webhooks", json={"url": "http://93.184.215.14/hook"}, headers=users["bob"].headers
    )
    assert hook.status_code == 201, hook.json
    first = upload(client, users["alice"], files=[("a.png", png())]).json["id"]
    fake_caption(app, first, texts=["a red square"])
    again = upload(client, users["bob"], files=[("copy.png", png())]).json
    assert again["status"] == "finished" and publisher.ids_for(again["id"]) == []
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        [delivery] = session.scalars(select(WebhookDelivery)).all()
        assert (delivery.job_id, delivery.webhook_id, delivery.event) == (
            again["id"],
            hook.json["id"],
            "job.completed",
        )
        assert delivery.payload["job"]["captioned_count"] == 1
    assert [t for t in publisher.tasks if t[0] == tasks.TASK_DELIVER_WEBHOOK] == [
        (tasks.TASK_DELIVER_WEBHOOK, (delivery.id,))
    ]


def _captioned_job(app, client, owner, n=3):
    files = [(f"img{i}.png", png((i * 40, 10, 10))) for i in range(n)]
    job_id = upload(client, owner, files=files).json["id"]
    fake_caption(
        app, job_id, texts=[f"caption {i}" for i in range(n)], scores=[-0.2, -2.0, -1.0][:n]
    )
    return job_id


def test_review_queue_order_filters_and_roles(app, client, users):
    job_id = _captioned_job(app, client, users["alice"])
    rev = users["reviewer"].headers
    queue = client.get("/api/v1/review/queue", headers=rev).json
    assert [i["caption"]["score"] for i in queue["items"]] == [-2.0, -1.0, -0.2]
    assert queue["total"] == 3
    ranged = client.get(
        f"/api/v1/review/queue?job_id={job_id}&min_score=-1.5&max_score=-0.5", headers=rev
    ).json
    assert [i["caption"]["text"] for i in ranged["items"]] == ["caption 2"]
    found = client.get("/api/v1/review/queue?q=caption%200", headers=rev).json
    assert [i["caption"]["text"] for i in found["items"]] == ["caption 0"]
    # A submitter cannot review.
    image_id = queue["items"][0]["id"]
    r = client.post(
        f"/api/v1/images/{image_id}/reviews",
        json={"decision": "approved"},
        headers=users["alice"].headers,
    )
    assert r.status_code == 403


def test_approve_correct_reject_history_and_undo(app, client, users):
    job_id = _captioned_job(app, client, users["alice"])
    rev = users["reviewer"].headers
    items = client.get(f"/api/v1/review/queue?job_id={job_id}", headers=rev).json["items"]
    a, b, c = (i["id"] for i in items)
    r = client.post(f"/api/v1/images/{a}/reviews", json={"decision": "approved"}, headers=rev)
    assert (
        r.status_code == 201
        and r.json["text"] == "caption 1"
        and r.json["reviewer"] == "rev@example.com"
    )
    r = client.post(
        f"/api/v1/images/{b}/reviews", json={"decision": "corrected", "text": "a dog"}, headers=rev
    )
    assert r.json["decision"] == "corrected" and r.json["text"] == "a dog"
    assert (
        client.post(f"/api/v1/images/{c}/reviews", json={"decision": "rejected"}, headers=rev).json[
            "text"
        ]
        is None
    )
    assert (
        client.post(
            f"/api/v1/images/{c}/reviews", json={"decision": "corrected"}, headers=rev
        ).status_code
        == 422
    )
    assert client.get("/api/v1/review/queue", headers=rev).json["total"] == 0
    assert (
        client.get("/api/v1/review/queue?status=corrected", headers=rev).json["items"][0]["id"] == b
    )
    # Correct again, then undo twice: back to the first correction, then to unreviewed.
    client.post(
        f"/api/v1/images/{b}/reviews",
        json={"decision": "corrected", "text": "a big dog"},
        headers=rev,
    )
    undo = client.post(f"/api/v1/images/{b}/reviews/undo", headers=rev)
    assert (
        undo.status_code == 201
        and undo.json["decision"] == "corrected"
        and undo.json["text"] == "a dog"
    )
    undo = client.post(f"/api/v1/images/{b}/reviews/undo", headers=rev)
    assert undo.json["decision"] == "undone"
    assert client.post(f"/api/v1/images/{b}/reviews/undo", headers=rev).status_code == 409
    history = client.get(f"/api/v1/images/{b}/reviews", headers=rev).json["items"]
    assert [h["decision"] for h in history] == ["corrected", "corrected", "corrected", "undone"]
    assert [h["text"] for h in history] == ["a dog", "a big dog", "a dog", None]
    assert [i["id"] for i in client.get("/api/v1/review/queue", headers=rev).json["items"]] == [b]


def test_bulk_approve_above_threshold(app, client, users):
    job_id = _captioned_job(app, client, users["alice"])
    rev = users["reviewer"].headers
    r = client.post(f"/api/v1/jobs/{job_id}/approve-above", json={"min_score": -1.0}, headers=rev)
    assert r.json["count"] == 2
    left = client.get("/api/v1/review/queue", headers=rev).json["items"]
    assert [i["caption"]["score"] for i in left] == [-2.0]
    assert (
        client.post(
            f"/api/v1/jobs/{job_id}/approve-above",
            json={"min_score": -1.0},
            headers=users["alice"].headers,
        ).status_code
        == 403
    )


def _scored_job(app, client, owner, scores, failed=()) -> list[int]:
    """A job of images (distinct from every other job's) captioned with these scores, except
    the positions in `failed`, which fail first; its image ids in upload order."""
    files = [(f"{i}.png", png((i, len(scores), 7 + len(failed)))) for i in range(len(scores))]
    job_id = upload(client, owner, files=files).json["id"]
    ids = image_ids(app, job_id)
    if failed:
        from captioner.state import images as image_state

        with session_scope(app.extensions["captioner"].sessionmaker) as session:
            image_state.claim_images(session, worker_id="w", lease_seconds=60, job_id=job_id)
            for n in failed:
                image_state.fail_image(session, ids[n], "image file not found in storage")
            image_state.requeue_images(session, ids, worker_id="w")
    texts = [f"caption {i}" for i in range(len(scores)) if i not in failed]
    kept = [score for i, score in enumerate(scores) if i not in failed]
    fake_caption(app, job_id, texts=texts, scores=kept)
    return ids


def _walk_queue(client, headers, limit, between_pages=None) -> list[dict]:
    """Every page of the unreviewed queue by cursor; `between_pages(n)` runs after page n."""
    items, after, pages = [], None, 0
    while True:
        url = f"/api/v1/review/queue?limit={limit}" + (f"&after={after}" if after else "")
        r = client.get(url, headers=headers)
        assert r.status_code == 200, r.json
        items += r.json["items"]
        pages += 1
        after = r.json["next_cursor"]
        if after is None:
            return items
        assert len(r.json["items"]) == limit
        if between_pages:
            between_pages(pages)


def test_review_queue_cursor_walks_every_unreviewed_item_once_in_order(app, client, users):
    # Ties on the score are broken by image id.
    scores = [-0.5, -3.0, -1.0, -1.0, -2.5, -0.1, -1.0, -4.0]
    ids = _scored_job(app, client, users["alice"], scores)
    rev = users["reviewer"].headers
    first = client.get("/api/v1/review/queue?limit=3", headers=rev).json
    assert first["total"] == 8 and first["total_exact"] is True
    assert first["next_cursor"]
    expected = [i for _, i in sorted(zip(scores, ids, strict=True))]

    walked = _walk_queue(client, rev, limit=3)
    assert [i["id"] for i in walked] == expected

    # Another reviewer works meanwhile: an item already shown is reviewed, and so is one ahead.
    def review_some(page: int) -> None:
        if page == 1:
            for image_id in (expected[0], expected[5]):
                client.post(
                    f"/api/v1/images/{image_id}/reviews", json={"decision": "approved"}, headers=rev
                )

    walked = _walk_queue(client, rev, limit=3, between_pages=review_some)
    shown = [i["id"] for i in walked]
    assert len(shown) == len(set(shown)), "an item was shown twice"
    assert shown == [i for i in expected if i != expected[5]]
    assert client.get("/api/v1/review/queue", headers=rev).json["total"] == 6


def test_review_queue_refuses_a_bad_cursor_and_an_offset_into_the_unreviewed_queue(
    app, client, users
):
    _scored_job(app, client, users["alice"], [-1.0, -2.0])
    rev = users["reviewer"].headers
    r = client.get("/api/v1/review/queue?after=not-a-cursor", headers=rev)
    assert r.status_code == 422 and "cursor" in r.json["message"]
    r = client.get("/api/v1/review/queue?offset=1", headers=rev)
    assert r.status_code == 422 and "after" in r.json["message"]
    # Other statuses still accept an offset.
    r = client.get("/api/v1/review/queue?status=any&offset=1", headers=rev)
    assert r.status_code == 200 and len(r.json["items"]) == 1 and r.json["total"] == 2


def test_job_images_page_by_id_with_totals_from_the_counters(app, client, users):
    ids = _scored_job(app, client, users["alice"], [-1.0] * 5, failed=(1, 3))
    alice = users["alice"].headers
    job_id = client.get("/api/v1/jobs", headers=alice).json["items"][0]["id"]
    walked, after, totals = [], None, set()
    while True:
        url = f"/api/v1/jobs/{job_id}/images?limit=2" + (f"&after={after}" if after else "")
        page = client.get(url, headers=alice).json
        walked += [i["id"] for i in page["items"]]
        totals.add(page["total"])
        after = page["next_after"]
        if after is None:
            break
        assert after == page["items"][-1]["id"]
    assert walked == sorted(ids) and totals == {5}
    failed = client.get(f"/api/v1/jobs/{job_id}/images?status=failed&limit=1", headers=alice).json
    assert [i["id"] for i in failed["items"]] == [ids[1]] and failed["total"] == 2
    assert failed["items"][0]["failure_reason"] == "image file not found in storage"
    rest = client.get(
        f"/api/v1/jobs/{job_id}/images?status=failed&after={failed['next_after']}", headers=alice
    ).json
    assert [i["id"] for i in rest["items"]] == [ids[3]] and rest["next_after"] is None
    # A small offset still works.
    offset = client.get(f"/api/v1/jobs/{job_id}/images?offset=3", headers=alice).json
    assert [i["id"] for i in offset["items"]] == sorted(ids)[3:]
    detail = client.get(f"/api/v1/jobs/{job_id}", headers=alice).json
    assert detail["progress"] | {"percent": None} == {
        "queued": 0,
        "running": 0,
        "captioned": 3,
        "failed": 2,
        "total": 5,
        "done": 5,
        "percent": None,
    }
    assert [f["id"] for f in detail["failures"]] == [ids[1], ids[3]]


def test_a_page_of_images_costs_the_same_statements_however_many_rows(app, client, users):
    """Captions and reviews of a page are loaded together, not one query per image."""
    from sqlalchemy import event

    rev = users["reviewer"].headers
    small = _scored_job(app, client, users["alice"], [-1.0, -2.0])
    large = _scored_job(app, client, users["bob"], [-1.0 - i / 10 for i in range(7)], failed=(6,))
    large = large[:6]
    for image_id in small + large:
        client.post(
            f"/api/v1/images/{image_id}/reviews", json={"decision": "approved"}, headers=rev
        )
    engine = app.extensions["captioner"].engine
    statements: list[str] = []

    def seen(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        counts = []
        for ids in (small, large):
            with session_scope(app.extensions["captioner"].sessionmaker) as session:
                job_id = session.get(Image, ids[0]).job_id
            statements.clear()
            page = client.get(f"/api/v1/jobs/{job_id}/images?status=captioned", headers=rev).json
            assert len(page["items"]) == len(ids)
            assert all(i["review"]["reviewer"] == "rev@example.com" for i in page["items"])
            counts.append(len(statements))
            statements.clear()
            queue = client.get("/api/v1/review/queue?status=approved&limit=500", headers=rev)
            assert queue.status_code == 200
        assert counts[0] == counts[1], counts
    finally:
        event.remove(engine, "before_cursor_execute", seen)


def test_export_formats_and_visibility(app, client, users):
    job_id = _captioned_job(app, client, users["alice"], n=2)
    rev = users["reviewer"].headers
    items = client.get("/api/v1/review/queue", headers=rev).json["items"]
    client.post(
        f"/api/v1/images/{items[0]['id']}/reviews",
        json={"decision": "corrected", "text": '=HYPERLINK("x")'},
        headers=rev,
    )
    alice = users["alice"].headers
    jsonl = client.get(f"/api/v1/export?job_id={job_id}&format=jsonl&which=both", headers=alice)
    rows = [json.loads(line) for line in jsonl.data.decode().splitlines()]
    assert jsonl.status_code == 200 and len(rows) == 2
    assert {r["reviewed_caption"] for r in rows} == {'=HYPERLINK("x")', None}
    csv_text = client.get(
        f"/api/v1/export?job_id={job_id}&format=csv&which=reviewed", headers=alice
    ).data.decode()
    assert "'=HYPERLINK" in csv_text and csv_text.count("\r\n") == 2
    coco = client.get("/api/v1/export?format=coco&which=model", headers=alice).json
    assert len(coco["images"]) == 2 and {a["caption"] for a in coco["annotations"]} == {
        "caption 0",
        "caption 1",
    }
    assert (
        client.get("/api/v1/export?format=coco", headers=users["bob"].headers).json["images"] == []
    )
    assert client.get("/api/v1/export?format=xml", headers=alice).status_code == 422


def test_users_admin_only(app, client, users):
    body = {"email": "new@example.com", "password": "long enough pw", "role": "reviewer"}
    assert (
        client.post("/api/v1/users", json=body, headers=users["alice"].headers).status_code == 403
    )
    r = client.post("/api/v1/users", json=body, headers=users["admin"].headers)
    assert r.status_code == 201 and r.json["role"] == "reviewer"
    assert (
        client.post("/api/v1/users", json=body, headers=users["admin"].headers).status_code == 409
    )
    r = client.patch(
        f"/api/v1/users/{r.json['id']}", json={"role": "submitter"}, headers=users["admin"].headers
    )
    assert r.json["role"] == "submitter"
    assert len(client.get("/api/v1/users", headers=users["admin"].headers).json["items"]) == 5


def test_webhook_registration_refuses_private_urls(client, users):
    alice = users["alice"].headers
    for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/", "ftp://example.com/"):
        r = client.post("/api/v1/webhooks", json={"url": url}, headers=alice)
        assert r.status_code == 422, url
    r = client.post("/api/v1/webhooks", json={"url": "http://93.184.215.14/hook"}, headers=alice)
    assert r.status_code == 201 and len(r.json["secret"]) > 20
    assert "secret" not in client.get("/api/v1/webhooks", headers=alice).json["items"][0]
    assert (
        client.delete(f"/api/v1/webhooks/{r.json['id']}", headers=users["bob"].headers).status_code
        == 404
    )
    assert client.delete(f"/api/v1/webhooks/{r.json['id']}", headers=alice).status_code == 204


def test_script_caption_is_json_text(app, client, users):
    job_id = _captioned_job(app, client, users["alice"], n=1)
    [image_id] = image_ids(app, job_id)
    rev = users["reviewer"].headers
    client.post(
        f"/api/v1/images/{image_id}/reviews",
        json={"decision": "corrected", "text": "<script>alert(1)</script>"},
        headers=rev,
    )
    r = client.get(f"/api/v1/images/{image_id}", headers=rev)
    assert (
        r.mimetype == "application/json" and r.json["review"]["text"] == "<script>alert(1)</script>"
    )


def test_submission_rate_limit(app, client, users):
    from captioner.settings import Settings

    settings: Settings = app.extensions["captioner"].settings
    app.extensions["captioner"].settings = settings.model_copy(
        update={"submit_rate_limit": "2/minute"}
    )
    codes = [
        client.post(
            "/api/v1/jobs", json={"keys": [f"k{i}.jpg"]}, headers=users["alice"].headers
        ).status_code
        for i in range(3)
    ]
    assert codes == [202, 202, 429]
    # The limit is per user: bob is not slowed down by alice.
    assert (
        client.post(
            "/api/v1/jobs", json={"keys": ["b.jpg"]}, headers=users["bob"].headers
        ).status_code
        == 202
    )


def test_session_api_calls_need_csrf(app, client, users):
    assert (
        client.post("/login", data={"email": "alice@example.com", "password": PASSWORD}).status_code
        == 400
    )
    assert login(client, "alice@example.com").status_code == 302
    assert client.post("/api/v1/jobs", json={"keys": ["a.jpg"]}).status_code == 403
    with client.session_transaction() as s:
        token = s["csrf"]
    r = client.post("/api/v1/jobs", json={"keys": ["a.jpg"]}, headers={"X-CSRF-Token": token})
    assert r.status_code == 202
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        assert session.scalar(select(Job.owner_id)) == users["alice"].id


def test_reviews_record_reviewer(app, client, users):
    job_id = _captioned_job(app, client, users["alice"], n=1)
    [image_id] = image_ids(app, job_id, ImageStatus.CAPTIONED)
    client.post(
        f"/api/v1/images/{image_id}/reviews",
        json={"decision": "approved"},
        headers=users["admin"].headers,
    )
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        assert session.scalar(select(Review.reviewer_id)) == users["admin"].id


def test_cli_submit_wait_and_export_through_a_live_server(app, users, tmp_path, monkeypatch):
    """`captioner submit DIR --wait` and `captioner export` against the app on a real socket."""
    import threading

    from click.testing import CliRunner
    from werkzeug.serving import make_server

    from captioner.cli import cli

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png((i, 9, 9)))
    monkeypatch.setenv("CAPTIONER_TOKEN", users["alice"].token)
    from dashboard_helpers import fake_caption as caption_now

    original = app.extensions["captioner"].publisher.captions

    def publish_and_caption(job_id, ids, interactive=False):  # a worker that answers at once
        original(job_id, ids, interactive=interactive)
        threading.Timer(0.3, caption_now, args=(app, job_id)).start()

    monkeypatch.setattr(app.extensions["captioner"].publisher, "captions", publish_and_caption)
    try:
        result = CliRunner().invoke(cli, ["submit", str(folder), "--server", url, "--wait"])
        assert result.exit_code == 0, result.output
        assert "3 captioned, 0 failed" in result.output
        job_id = int(result.output.split()[1])
        out = tmp_path / "e.jsonl"
        args = ["export", str(job_id), "--stream", "--format", "jsonl", "-o", str(out)]
        result = CliRunner().invoke(cli, [*args, "--server", url])
        assert result.exit_code == 0, result.output
        assert len(out.read_text().splitlines()) == 3
        bad = CliRunner().invoke(
            cli, ["export", "999", "--server", url], env={"CAPTIONER_TOKEN": "cap_wrong"}
        )
        assert bad.exit_code != 0 and "401" in bad.output
    finally:
        server.shutdown()


def test_cli_user_create(dashboard_settings, client):
    from click.testing import CliRunner

    from captioner.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "user",
            "create",
            "boss@example.com",
            "--role",
            "admin",
            "--password",
            "long password",
            "--url",
            dashboard_settings.database_url,
        ],
    )
    assert result.exit_code == 0, result.output
    assert login(client, "boss@example.com", "long password").status_code == 302


# --- inputs validated to what the database stores (issue 16) ---------------------------------


@pytest.mark.parametrize("prefix", ["./x", "a//b", "../x", "x/./y"])
def test_malformed_prefix_is_422_at_submit(app, client, users, publisher, prefix):
    r = client.post("/api/v1/jobs", json={"prefix": prefix}, headers=users["alice"].headers)
    assert r.status_code == 422 and "invalid prefix" in r.json["message"], r.json
    assert count(app, Job) == 0 and publisher.tasks == []


def test_url_longer_than_the_column_is_422_at_submit(app, client, users, publisher):
    limit = Image.__table__.c.original_name.type.length
    long_url = "https://example.com/" + "a" * limit
    r = client.post(
        "/api/v1/jobs",
        json={"urls": ["https://example.com/ok.jpg", long_url]},
        headers=users["alice"].headers,
    )
    assert r.status_code == 422 and "URL too long" in r.json["message"], r.json
    assert count(app, Job) == 0 and publisher.tasks == []


def test_webhook_registration_uses_the_webhook_allow_list(app, client, users, monkeypatch):
    ext = app.extensions["captioner"]
    alice = users["alice"].headers
    hook = {"url": "http://127.0.0.1:9/hook"}
    # Trusting a host for URL fetches does not trust it as a webhook receiver ...
    urls_only = ext.settings.model_copy(update={"url_allow_hosts": ["127.0.0.1"]})
    monkeypatch.setattr(ext, "settings", urls_only)
    assert client.post("/api/v1/webhooks", json=hook, headers=alice).status_code == 422
    # ... only the webhook allow-list does.
    hooks_only = ext.settings.model_copy(
        update={"url_allow_hosts": [], "webhook_allow_hosts": ["127.0.0.1"]}
    )
    monkeypatch.setattr(ext, "settings", hooks_only)
    assert client.post("/api/v1/webhooks", json=hook, headers=alice).status_code == 201


def test_only_the_owner_and_admins_cancel_or_retry_a_job(app, client, users):
    job_id = upload(client, users["alice"], files=[("a.png", png())]).json["id"]
    reviewer = users["reviewer"].headers
    # A reviewer sees the job but does not own it: 403, and nothing changes.
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=reviewer).status_code == 403
    assert client.post(f"/api/v1/jobs/{job_id}/retry", headers=reviewer).status_code == 403
    assert client.get(f"/api/v1/jobs/{job_id}", headers=reviewer).json["status"] == "queued"
    # Another submitter cannot see it: 404.
    assert (
        client.post(f"/api/v1/jobs/{job_id}/cancel", headers=users["bob"].headers).status_code
        == 404
    )
    r = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=users["admin"].headers)
    assert r.status_code == 200 and r.json["status"] == "cancelled"
    r = client.post(f"/api/v1/jobs/{job_id}/retry", headers=users["alice"].headers)
    assert r.status_code == 200 and r.json["count"] == 1


def test_interactive_is_only_for_small_submissions(app, client, users, publisher):
    alice = users["alice"].headers
    limit = app.extensions["captioner"].settings.interactive_max_images
    keys = [f"photos/{i}.jpg" for i in range(limit + 1)]
    r = client.post("/api/v1/jobs", json={"keys": keys, "interactive": True}, headers=alice)
    assert r.status_code == 422 and "interactive" in r.json["message"]
    r = client.post("/api/v1/jobs", json={"prefix": "photos/", "interactive": True}, headers=alice)
    assert r.status_code == 422 and "interactive" in r.json["message"]
    files = [(f"{i}.png", png((i, 0, 0))) for i in range(limit + 1)]
    r = upload(client, users["alice"], files=files, interactive="true")
    assert r.status_code == 422 and "interactive" in r.json["message"]
    assert count(app, Job) == 0 and stored_objects(app) == [] and publisher.sent == []
    # Small interactive jobs, and large bulk ones, are accepted.
    r = client.post("/api/v1/jobs", json={"keys": keys[:limit], "interactive": True}, headers=alice)
    assert r.status_code == 202 and publisher.sent[-1][2] is True
    r = client.post("/api/v1/jobs", json={"keys": keys}, headers=alice)
    assert r.status_code == 202 and publisher.sent[-1][2] is False


def test_priority_above_zero_needs_the_admin_role(app, client, users):
    for who in ("alice", "reviewer"):
        r = client.post(
            "/api/v1/jobs", json={"keys": ["a.jpg"], "priority": 5}, headers=users[who].headers
        )
        assert r.status_code == 403 and "priority" in r.json["message"], who
        r = upload(client, users[who], files=[("a.png", png())], priority="5")
        assert r.status_code == 403, who
    assert count(app, Job) == 0
    r = client.post(
        "/api/v1/jobs", json={"keys": ["a.jpg"], "priority": -5}, headers=users["alice"].headers
    )
    assert r.status_code == 202 and r.json["priority"] == -5
    r = client.post(
        "/api/v1/jobs", json={"keys": ["a.jpg"], "priority": 5}, headers=users["admin"].headers
    )
    assert r.status_code == 202 and r.json["priority"] == 5


# --- sessions that end when they should (issue 16) -------------------------------------------


def _me(client, headers=None) -> int:
    return client.get("/api/v1/me", headers=headers or {}).status_code


def _copy_session(app, client):
    """A second client holding a copy of `client`'s session cookie (a stolen cookie)."""
    other = app.test_client()
    other.set_cookie("session", client.get_cookie("session").value)
    return other


def _session_payload(app, client) -> dict:
    serializer = app.session_interface.get_signing_serializer(app)
    return serializer.loads(client.get_cookie("session").value)


def test_a_copied_cookie_stops_working_after_logout(app, client, users):
    assert login(client, "alice@example.com").status_code == 302
    thief = _copy_session(app, client)
    assert _me(client) == 200 and _me(thief) == 200
    with client.session_transaction() as s:
        token = s["csrf"]
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert _me(thief) == 401 and _me(client) == 401
    # Her token is not a session: logging out leaves it working; logging in again works.
    assert _me(client, users["alice"].headers) == 200
    assert login(client, "alice@example.com").status_code == 302 and _me(client) == 200
    assert _me(thief) == 401


def test_a_password_change_ends_sessions_and_revokes_tokens(app, client, users):
    assert login(client, "alice@example.com").status_code == 302
    r = client.patch(
        f"/api/v1/users/{users['alice'].id}",
        json={"password": "a brand new password"},
        headers=users["admin"].headers,
    )
    assert r.status_code == 200
    assert _me(client) == 401
    r = client.get("/api/v1/me", headers=users["alice"].headers)
    assert r.status_code == 401 and r.json["message"] == "invalid or revoked token"
    assert login(client, "alice@example.com").status_code == 401
    assert login(client, "alice@example.com", "a brand new password").status_code == 302
    assert _me(client) == 200
    # The admin who made the change keeps the token they made it with; bob is untouched.
    assert _me(client, users["admin"].headers) == 200 and _me(client, users["bob"].headers) == 200


def test_changing_your_own_password_keeps_this_session_and_token_only(app, client, users):
    admin = users["admin"]
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        from captioner.state.models import ApiToken

        spare_raw, spare = ApiToken.issue(admin.id, "spare")
        session.add(spare)
    assert login(client, "admin@example.com").status_code == 302
    elsewhere = app.test_client()
    assert login(elsewhere, "admin@example.com").status_code == 302
    with client.session_transaction() as s:
        token = s["csrf"]
    r = client.patch(
        f"/api/v1/users/{admin.id}",
        json={"password": "a brand new password"},
        headers={"X-CSRF-Token": token},
    )
    assert r.status_code == 200
    assert _me(client) == 200 and _me(elsewhere) == 401
    assert _me(client, {"Authorization": f"Bearer {spare_raw}"}) == 401
    assert _me(client, admin.headers) == 401  # it was not the one making the change
    # Through a token: that token is kept, the session ends.
    r = client.post("/api/v1/tokens", json={"name": "t"}, headers={"X-CSRF-Token": token})
    kept = {"Authorization": f"Bearer {r.json['token']}"}
    r = client.patch(
        f"/api/v1/users/{admin.id}", json={"password": "yet another one"}, headers=kept
    )
    assert r.status_code == 200 and _me(client, kept) == 200 and _me(client) == 401


def test_disable_ends_sessions_and_tokens_and_enable_restores_login_only(app, client, users):
    admin, alice = users["admin"].headers, users["alice"]
    browser = app.test_client()
    assert login(browser, "alice@example.com").status_code == 302
    assert (
        client.post(f"/api/v1/users/{alice.id}/disable", headers=alice.headers).status_code == 403
    )
    r = client.post(f"/api/v1/users/{alice.id}/disable", headers=admin)
    assert r.status_code == 200 and r.json["disabled_at"] is not None
    assert _me(browser) == 401
    r = client.get("/api/v1/me", headers=alice.headers)
    assert r.status_code == 401 and r.json["message"] == "invalid or revoked token"
    # Refused exactly like a wrong password: the page does not tell that the account exists.
    right, wrong = login(browser, "alice@example.com"), login(browser, "alice@example.com", "nope")
    assert right.status_code == wrong.status_code == 401 and right.data == wrong.data
    assert client.get("/api/v1/users", headers=admin).json["items"][2]["disabled_at"] is not None
    r = client.post(f"/api/v1/users/{alice.id}/enable", headers=admin)
    assert r.status_code == 200 and r.json["disabled_at"] is None
    assert login(browser, "alice@example.com").status_code == 302 and _me(browser) == 200
    assert _me(client, alice.headers) == 401  # enabling does not bring the old tokens back
    assert client.post("/api/v1/users/999999/disable", headers=admin).status_code == 404
    assert client.post("/api/v1/users/999999/enable", headers=admin).status_code == 404


def test_an_admin_cannot_disable_themselves(client, users):
    admin = users["admin"]
    r = client.post(f"/api/v1/users/{admin.id}/disable", headers=admin.headers)
    assert r.status_code == 422 and _me(client, admin.headers) == 200


def test_admin_revokes_all_of_a_users_tokens(app, client, users):
    alice = users["alice"]
    second = client.post("/api/v1/tokens", json={"name": "2"}, headers=alice.headers).json["token"]
    assert login(client, "alice@example.com").status_code == 302
    r = client.post(f"/api/v1/users/{alice.id}/tokens/revoke", headers=alice.headers)
    assert r.status_code == 403
    r = client.post(f"/api/v1/users/{alice.id}/tokens/revoke", headers=users["admin"].headers)
    assert r.status_code == 200 and r.json == {"revoked": 2}
    assert _me(client, alice.headers) == 401
    assert _me(client, {"Authorization": f"Bearer {second}"}) == 401
    assert _me(client) == 200  # revoking tokens is not logging out
    assert _me(client, users["bob"].headers) == 200
    r = client.post("/api/v1/users/999999/tokens/revoke", headers=users["admin"].headers)
    assert r.status_code == 404


def test_a_session_older_than_the_lifetime_is_refused(app, client, users):
    assert app.extensions["captioner"].settings.session_lifetime_hours == 12
    assert login(client, "alice@example.com").status_code == 302
    with client.session_transaction() as s:
        s["login_at"] -= 11 * 3600
    assert _me(client) == 200
    with client.session_transaction() as s:
        s["login_at"] -= 2 * 3600
    assert _me(client) == 401
    assert client.get("/jobs").status_code == 302


def test_the_cookie_holds_no_password_hash_material(app, client, users):
    from captioner.state.models import User

    assert login(client, "alice@example.com").status_code == 302
    payload = _session_payload(app, client)
    assert set(payload) == {"user_id", "epoch", "login_at", "csrf"}
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        password_hash = session.get(User, users["alice"].id).password_hash
    text = json.dumps(payload)
    assert password_hash[-12:] not in text and password_hash.split("$")[-1][:8] not in text


def _app_with(dashboard_settings, publisher, **update):
    from dashboard import create_app

    app = create_app(dashboard_settings.model_copy(update=update), publisher=publisher)
    app.config["TESTING"] = True
    return app


def test_an_https_public_url_makes_cookies_secure_and_sends_hsts(
    app, client, users, dashboard_settings, publisher
):
    r = login(client, "alice@example.com")
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    assert "Strict-Transport-Security" not in r.headers
    secure = _app_with(dashboard_settings, publisher, public_url="https://captions.example.com")
    try:
        browser = secure.test_client()
        r = login(browser, "alice@example.com")
        assert r.status_code == 302
        cookie = r.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert "max-age=" in r.headers["Strict-Transport-Security"]
        assert "max-age=" in browser.get("/login").headers["Strict-Transport-Security"]
    finally:
        secure.extensions["captioner"].engine.dispose()


def _whoami_app(dashboard_settings, publisher, hops: int):
    from flask import request

    from dashboard import auth

    app = _app_with(dashboard_settings, publisher, trusted_proxy_hops=hops)
    app.add_url_rule(
        "/whoami", "whoami", lambda: {"addr": request.remote_addr, "key": auth.rate_key()}
    )
    return app


@pytest.mark.parametrize(("hops", "seen"), [(0, "127.0.0.1"), (1, "203.0.113.9")])
def test_trusted_proxy_hops_decide_the_client_address(dashboard_settings, publisher, hops, seen):
    app = _whoami_app(dashboard_settings, publisher, hops)
    try:
        r = app.test_client().get(
            "/whoami",
            headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.9"},
            environ_base={"REMOTE_ADDR": "127.0.0.1"},
        )
        assert r.json == {"addr": seen, "key": f"ip:{seen}"}
    finally:
        app.extensions["captioner"].engine.dispose()


def test_behind_a_proxy_each_client_has_its_own_login_bucket(dashboard_settings, publisher):
    app = _app_with(
        dashboard_settings, publisher, trusted_proxy_hops=1, login_rate_limit="2/minute"
    )
    try:
        make_user(app, "alice@example.com", "submitter")
        client = app.test_client()

        def attempt(addr: str) -> int:
            client.get("/login")
            with client.session_transaction() as s:
                token = s["csrf"]
            data = {"email": "alice@example.com", "password": "wrong", "csrf_token": token}
            return client.post("/login", data=data, headers={"X-Forwarded-For": addr}).status_code

        assert [attempt("198.51.100.1") for _ in range(3)] == [401, 401, 429]
        assert attempt("198.51.100.2") == 401
    finally:
        app.extensions["captioner"].engine.dispose()


def test_ending_sessions_and_revoking_tokens_in_sql(session):
    """On SQLite and PostgreSQL: the epoch moves on in SQL; revoking skips the token kept."""
    from captioner import accounts
    from captioner.state.models import ApiToken

    user = accounts.create_user(session, "carol@example.com", PASSWORD)
    other = accounts.create_user(session, "dave@example.com", PASSWORD)
    tokens = [ApiToken.issue(u.id, "t")[1] for u in (user, user, user, other)]
    session.add_all(tokens)
    session.commit()

    def revoked() -> list[bool]:
        return list(session.scalars(select(ApiToken.revoked_at.is_not(None)).order_by(ApiToken.id)))

    assert user.session_epoch == 0 and accounts.may_log_in(user, PASSWORD)
    assert accounts.change_password(session, user, "new password!", keep_token_id=tokens[0].id) == 2
    session.commit()
    assert user.session_epoch == 1 and not accounts.may_log_in(user, PASSWORD)
    assert revoked() == [False, True, True, False]
    accounts.disable_user(session, user)
    session.commit()
    assert user.session_epoch == 2 and user.disabled_at is not None
    assert not accounts.may_log_in(user, "new password!") and revoked() == [True, True, True, False]
    accounts.enable_user(user)
    session.commit()
    assert accounts.may_log_in(user, "new password!") and revoked() == [True, True, True, False]
    assert other.session_epoch == 0


def test_webhook_rotate_returns_a_new_secret_once_and_is_owner_only(app, client, users):
    from captioner import webhooks
    from captioner.state.models import Webhook

    alice, bob = users["alice"].headers, users["bob"].headers
    r = client.post("/api/v1/webhooks", json={"url": "http://93.184.215.14/hook"}, headers=alice)
    hook_id, first = r.json["id"], r.json["secret"]
    assert first.startswith("whsec_") and r.json["previous_secret_expires_at"] is None
    assert client.post(f"/api/v1/webhooks/{hook_id}/rotate", headers=bob).status_code == 404
    assert client.post("/api/v1/webhooks/999999/rotate", headers=alice).status_code == 404
    r = client.post(f"/api/v1/webhooks/{hook_id}/rotate", headers=alice)
    assert r.status_code == 200 and r.json["id"] == hook_id
    second = r.json["secret"]
    assert second.startswith("whsec_") and second != first
    assert r.json["previous_secret_expires_at"] is not None
    [listed] = client.get("/api/v1/webhooks", headers=alice).json["items"]
    assert "secret" not in listed and listed["previous_secret_expires_at"]
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        hook = session.get(Webhook, hook_id)
        assert (hook.secret, hook.previous_secret) == (second, first)
        # Signed with both during the grace period (24 hours by default).
        headers = webhooks.signature_headers(hook, "1", b"{}")
        assert webhooks.verify(second, b"{}", headers) and webhooks.verify(first, b"{}", headers)
    # A removed webhook cannot be rotated.
    assert client.delete(f"/api/v1/webhooks/{hook_id}", headers=alice).status_code == 204
    assert client.post(f"/api/v1/webhooks/{hook_id}/rotate", headers=alice).status_code == 404


def test_account_page_rotates_a_webhook_secret(app, client, users):
    from dashboard_helpers import csrf

    from captioner.state.models import Webhook

    r = client.post(
        "/api/v1/webhooks",
        json={"url": "http://93.184.215.14/hook"},
        headers=users["alice"].headers,
    )
    hook_id, first = r.json["id"], r.json["secret"]
    assert login(client, "bob@example.com").status_code == 302
    form = {"csrf_token": csrf(client)}
    assert client.post(f"/account/webhooks/{hook_id}/rotate", data=form).status_code == 404
    client.post("/logout", data=form)
    assert login(client, "alice@example.com").status_code == 302
    page = client.get("/account").get_data(as_text=True)
    assert f"/account/webhooks/{hook_id}/rotate" in page and "Rotate secret" in page
    r = client.post(f"/account/webhooks/{hook_id}/rotate", data={"csrf_token": csrf(client)})
    assert r.status_code == 200
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        hook = session.get(Webhook, hook_id)
        assert hook.previous_secret == first and hook.secret != first
        secret = hook.secret
    page = r.get_data(as_text=True)
    assert f'<code id="new-secret">{secret}</code>' in page and "previous secret also signs" in page


# --- each user reaches only their own objects (issue 16, item 1) -----------------------------


@pytest.fixture
def dashboard_settings(dashboard_settings):
    """The tests above submit keys and prefixes anywhere in the store, as a deployment whose
    operator shares the whole store (outside the system's own namespaces) with every submitter
    does: `CAPTIONER_SOURCE_PREFIXES=[""]`. `strict_client` below shares only `shared/`."""
    return dashboard_settings.model_copy(update={"source_prefixes": [""]})


@pytest.fixture
def strict_app(dashboard_settings, publisher):
    from dashboard import create_app

    settings = dashboard_settings.model_copy(update={"source_prefixes": ["shared/"]})
    strict = create_app(settings, publisher=publisher)
    strict.config["TESTING"] = True
    yield strict
    strict.extensions["captioner"].engine.dispose()


@pytest.fixture
def strict_client(strict_app):
    return strict_app.test_client()


def submit(client, account, **body):
    return client.post("/api/v1/jobs", json=body, headers=account.headers)


def bobs_upload(app, client, users) -> tuple[int, str]:
    """Bob uploads one image: its id and its storage key."""
    r = upload(client, users["bob"], files=[("mine.png", png((9, 9, 9)))])
    assert r.status_code == 202
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        image = session.scalars(select(Image).where(Image.job_id == r.json["id"])).one()
        return image.id, image.storage_key


def test_uploads_are_stored_under_the_owners_namespace(app, client, users):
    _, key = bobs_upload(app, client, users)
    assert key.startswith(f"uploads/{users['bob'].id}/")
    assert stored_objects(app) == [key]


@pytest.mark.parametrize("who", ["alice", "admin"])
@pytest.mark.parametrize(
    "body",
    [
        {"keys": ["models/v1/model.safetensors"]},
        {"keys": ["urls/3/ab/abcd.png"]},
        {"keys": ["exports/all.jsonl"]},
        {"keys": ["photos/a.jpg", "uploads/2/ab/abcd.png"]},
        {"prefix": ""},
        {"prefix": "uploads/"},
        {"prefix": "models/"},
        {"prefix": "mod"},
        {"prefix": "urls/3/"},
    ],
)
def test_the_systems_namespaces_are_refused_to_everyone(client, users, publisher, who, body):
    r = submit(client, users[who], **body)
    assert r.status_code == 403, r.json
    assert "written by the system" in r.json["message"]
    assert publisher.sent == [] and publisher.tasks == []


def test_a_submitter_cannot_read_another_users_upload(app, client, users, publisher):
    image_id, key = bobs_upload(app, client, users)
    sent = len(publisher.sent)
    for body in ({"keys": [key]}, {"prefix": key.rsplit("/", 1)[0] + "/"}):
        for who in ("alice", "admin"):
            r = submit(client, users[who], **body)
            assert r.status_code == 403 and "uploads/" in r.json["message"]
    assert len(publisher.sent) == sent
    alice = users["alice"].headers
    assert client.get(f"/api/v1/images/{image_id}/content", headers=alice).status_code == 404
    bob = users["bob"].headers
    assert client.get(f"/api/v1/images/{image_id}/content", headers=bob).status_code == 200


def test_keys_and_prefixes_only_within_granted_locations(strict_client, users, publisher):
    alice, bob, admin = users["alice"], users["bob"], users["admin"]
    for body in ({"keys": ["private/a.jpg"]}, {"prefix": "private/"}, {"prefix": "shared"}):
        r = submit(strict_client, alice, **body)
        assert r.status_code == 403 and "outside your source locations" in r.json["message"]
        assert "shared/" in r.json["message"]
    assert submit(strict_client, alice, keys=["shared/a.jpg"]).status_code == 202
    assert submit(strict_client, alice, prefix="shared/2024/").status_code == 202
    # An admin grants alice a location of her own; bob does not get it.
    r = strict_client.patch(
        f"/api/v1/users/{alice.id}", json={"source_prefixes": ["teams/a/"]}, headers=admin.headers
    )
    assert r.status_code == 200 and r.json["source_prefixes"] == ["teams/a/"]
    assert submit(strict_client, alice, keys=["teams/a/1.jpg"]).status_code == 202
    assert submit(strict_client, alice, prefix="teams/a/").status_code == 202
    assert submit(strict_client, bob, keys=["teams/a/1.jpg"]).status_code == 403
    # Admins read anywhere but the system's namespaces.
    assert submit(strict_client, admin, keys=["private/a.jpg"]).status_code == 202
    assert submit(strict_client, admin, prefix="private/").status_code == 202


def test_grants_are_set_by_admins_and_checked(client, users):
    alice, admin = users["alice"], users["admin"]
    url = f"/api/v1/users/{alice.id}"
    body = {"source_prefixes": ["teams/a/"]}
    assert client.patch(url, json=body, headers=alice.headers).status_code == 403
    for bad in (["models/"], ["uploads/7/"], ["a//b"], ["../x"]):
        r = client.patch(url, json={"source_prefixes": bad}, headers=admin.headers)
        assert r.status_code == 422, bad
    r = client.patch(url, json=body, headers=admin.headers)
    assert r.status_code == 200 and r.json["source_prefixes"] == ["teams/a/"]
    assert client.get("/api/v1/me", headers=alice.headers).json["source_prefixes"] == ["teams/a/"]


def test_checkpoint_locations_for_admins_only(app, client, users):
    from dashboard_helpers import active_version

    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        active_version(session)
    for who in ("alice", "reviewer"):
        r = client.get("/api/v1/models", headers=users[who].headers)
        assert r.status_code == 200 and len(r.json["items"]) == 1
        assert "checkpoint_uri" not in r.json["items"][0] and "nowhere" not in r.text
    r = client.get("/api/v1/models", headers=users["admin"].headers)
    assert r.json["items"][0]["checkpoint_uri"] == "file:///nowhere"


def test_an_oversize_object_is_refused_without_being_read(app, client, users):
    from dashboard_helpers import ReadCountingStore

    ext = app.extensions["captioner"]
    limit = 2000
    ext.settings = ext.settings.model_copy(update={"max_image_bytes": limit})
    store = ext._store = ReadCountingStore(ext.store.root)
    big, small = png() + b"\0" * limit, png()
    assert len(big) > limit >= len(small)
    store.put("big/a.png", big)
    store.put("big/b.png", small)
    r = submit(client, users["admin"], keys=["big/a.png", "big/b.png"])
    assert r.status_code == 202
    admin = users["admin"].headers
    too_big, fine = image_ids(app, r.json["id"])
    r = client.get(f"/api/v1/images/{too_big}/content", headers=admin)
    assert r.status_code == 413 and f"limit {limit}" in r.json["message"]
    assert store.bytes_read == {}
    r = client.get(f"/api/v1/images/{fine}/content", headers=admin)
    assert (
        r.status_code == 200 and r.data == small and store.bytes_read == {"big/b.png": len(small)}
    )


@pytest.mark.parametrize(
    "body",
    [
        {"name": "none"},
        {"keys": ["a.png"], "prefix": "a/"},
        {"prefix": "a/", "urls": ["https://images.example.com/a.png"]},
    ],
)
def test_job_creation_takes_exactly_one_source(client, users, body):
    """The document's oneOf states it; validation still enforces it, whatever a client sends."""
    r = submit(client, users["admin"], **body)
    assert r.status_code == 422
    assert r.json["message"] == "Validation error"
    assert "exactly one of keys, prefix or urls" in json.dumps(r.json["detail"])


def test_a_page_with_an_id_out_of_range_is_not_found(client, users):
    """The ids' range holds for the pages too: the HTML error page with 404, never 405 or 500."""
    login(client, "admin@example.com")
    for path in ("/jobs/0", "/jobs/2199023255551", "/training/" + "9" * 5000):
        r = client.get(path)
        assert r.status_code == 404 and b"<html" in r.data.lower(), path
