"""Resized previews: made once from the original, kept in the object store, served instead of
the original on the review page, the grid and the job page."""

from __future__ import annotations

import io

import pytest
from dashboard_helpers import image_ids, make_user
from PIL import Image as PILImage

from captioner.intake import previews


def jpeg(size=(2000, 1500), color=(30, 120, 200)) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", size, color).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture
def admin(app):
    return make_user(app, "admin@example.com", "admin")


def _job_of_keys(app, client, admin, objects: dict[str, bytes]) -> list[int]:
    store = app.extensions["captioner"].store
    for key, data in objects.items():
        store.put(key, data)
    r = client.post("/api/v1/jobs", json={"keys": list(objects)}, headers=admin.headers)
    assert r.status_code == 202, r.json
    return image_ids(app, r.json["id"])


def test_a_large_image_is_previewed_once_and_kept_in_the_store(app, client, admin):
    [image_id] = _job_of_keys(app, client, admin, {"photos/big.jpg": jpeg()})
    store = app.extensions["captioner"].store
    detail = client.get(f"/api/v1/images/{image_id}", headers=admin.headers).json
    for side, url in ((1024, detail["preview_url"]), (256, detail["thumbnail_url"])):
        r = client.get(url, headers=admin.headers)
        assert r.status_code == 200 and r.mimetype == "image/jpeg"
        shown = PILImage.open(io.BytesIO(r.data))
        assert max(shown.size) == side and shown.size[0] / shown.size[1] == pytest.approx(
            4 / 3, 0.01
        )
        assert store.get(previews.preview_key("photos/big.jpg", side)) == r.data
    # Served from the store from now on: the original is not read again.
    store.delete("photos/big.jpg")
    again = client.get(detail["preview_url"], headers=admin.headers)
    assert again.status_code == 200 and again.data == store.get(
        previews.preview_key("photos/big.jpg", 1024)
    )
    assert client.get(detail["content_url"], headers=admin.headers).status_code == 404


def test_an_image_within_the_preview_size_is_its_own_preview(app, client, admin):
    small = jpeg((64, 48))
    [image_id] = _job_of_keys(app, client, admin, {"photos/small.jpg": small})
    r = client.get(f"/api/v1/images/{image_id}/preview?side=256", headers=admin.headers)
    assert r.status_code == 200 and r.data == small
    assert not app.extensions["captioner"].store.exists(
        previews.preview_key("photos/small.jpg", 256)
    )


def test_preview_sizes_owners_and_bad_originals(app, client, admin):
    ids = _job_of_keys(app, client, admin, {"p/a.jpg": jpeg(), "p/not-an-image.jpg": b"hello"})
    good, bad = ids
    r = client.get(f"/api/v1/images/{good}/preview?side=500", headers=admin.headers)
    assert r.status_code == 422
    bob = make_user(app, "bob@example.com", "submitter")
    assert client.get(f"/api/v1/images/{good}/preview", headers=bob.headers).status_code == 404
    r = client.get(f"/api/v1/images/{bad}/preview", headers=admin.headers)
    assert r.status_code == 404 and "cannot be shown" in r.json["message"]


def test_nobody_submits_keys_under_previews(app, client, admin):
    r = client.post("/api/v1/jobs", json={"prefix": "previews/"}, headers=admin.headers)
    assert r.status_code == 403 and "previews/" in r.json["message"]
