"""Server-rendered pages: login, CSRF on forms, roles, and text rendered as text."""

from __future__ import annotations

import io

import pytest
from dashboard_helpers import csrf, fake_caption, image_ids, login, make_user, make_zip, png

XSS = "<script>alert(1)</script>"


@pytest.fixture
def dashboard_settings(dashboard_settings):
    """The form tests submit keys anywhere in the store, as a deployment that shares the whole
    store (outside the system's own namespaces) with every submitter: source_prefixes [""]."""
    return dashboard_settings.model_copy(update={"source_prefixes": [""]})


@pytest.fixture
def accounts(app):
    return {
        "admin": make_user(app, "admin@example.com", "admin"),
        "reviewer": make_user(app, "rev@example.com", "reviewer"),
        "alice": make_user(app, "alice@example.com", "submitter"),
    }


def test_pages_need_login(client):
    r = client.get("/jobs")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert client.get("/login").status_code == 200


def test_wrong_password_and_open_redirect(client, accounts):
    assert login(client, "alice@example.com", "wrong").status_code == 401
    client.get("/login")
    r = client.post(
        "/login?next=https://evil.example/",
        data={
            "email": "alice@example.com",
            "password": "correct horse battery",
            "csrf_token": csrf(client),
        },
    )
    assert r.status_code == 302 and r.headers["Location"] == "/jobs"


def test_submit_zip_from_the_form_and_watch_job(app, client, accounts, publisher):
    login(client, "alice@example.com")
    data = {
        "csrf_token": csrf(client),
        "name": "holiday",
        "archive": (io.BytesIO(make_zip({"a.png": png()})), "h.zip"),
    }
    r = client.post("/jobs/new", data=data, content_type="multipart/form-data")
    assert r.status_code == 303
    job_page = client.get(r.headers["Location"])
    assert b"holiday" in job_page.data and b'id="job-progress"' in job_page.data
    # Without the CSRF token the form is refused and nothing is created.
    r = client.post("/jobs/new", data={"name": "x", "keys": "a.jpg"})
    assert r.status_code == 400
    assert len(client.get("/api/v1/jobs", headers=accounts["alice"].headers).json["items"]) == 1


def test_refused_upload_is_flashed(client, accounts):
    login(client, "alice@example.com")
    data = {
        "csrf_token": csrf(client),
        "archive": (io.BytesIO(make_zip({"../x.png": png()})), "bad.zip"),
    }
    r = client.post(
        "/jobs/new", data=data, content_type="multipart/form-data", follow_redirects=True
    )
    assert b"path escapes the archive" in r.data


def test_form_refuses_more_than_max_submit_items_like_the_api(app, client, accounts):
    settings = app.extensions["captioner"].settings
    app.extensions["captioner"].settings = settings.model_copy(update={"max_submit_items": 2})
    login(client, "alice@example.com")
    colours = [(10, 10, 10), (20, 20, 20), (30, 30, 30)]
    for files, archive in (
        ([(io.BytesIO(png(c)), f"{i}.png") for i, c in enumerate(colours)], None),
        ([(io.BytesIO(png(colours[0])), "0.png")], {"1.png": png(colours[1]), "2.png": png()}),
    ):
        data = {"csrf_token": csrf(client), "files": files}
        if archive:
            data["archive"] = (io.BytesIO(make_zip(archive)), "more.zip")
        r = client.post(
            "/jobs/new", data=data, content_type="multipart/form-data", follow_redirects=True
        )
        assert b"Refused: more than 2 images" in r.data
    assert client.get("/api/v1/jobs", headers=accounts["alice"].headers).json["items"] == []


def test_script_caption_renders_as_text_everywhere(app, client, accounts):
    login(client, "alice@example.com")
    data = {"csrf_token": csrf(client), "name": XSS, "files": [(io.BytesIO(png()), XSS + ".png")]}
    client.post("/jobs/new", data=data, content_type="multipart/form-data")
    [job] = client.get("/api/v1/jobs", headers=accounts["alice"].headers).json["items"]
    fake_caption(app, job["id"], texts=[XSS])
    [image_id] = image_ids(app, job["id"])
    rev = accounts["reviewer"].headers
    client.post(
        f"/api/v1/images/{image_id}/reviews",
        json={"decision": "corrected", "text": XSS},
        headers=rev,
    )
    pages = ["/jobs", f"/jobs/{job['id']}", "/review", "/export", "/account", "/try"]
    for path in pages:
        body = client.get(path).data.decode()
        assert XSS not in body, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in client.get(f"/jobs/{job['id']}").data.decode()
    # Every page forbids inline script, so even a slip could not run.
    assert "script-src 'self'" in client.get("/jobs").headers["Content-Security-Policy"]
    # The review page fills text with textContent only.
    js = client.get("/static/review.js").data.decode()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js


def test_roles_on_pages(client, accounts):
    login(client, "alice@example.com")
    assert client.get("/review").status_code == 403
    assert client.get("/admin/users").status_code == 403
    client.post("/logout", data={"csrf_token": csrf(client)})
    login(client, "rev@example.com")
    assert client.get("/review").status_code == 200


def test_admin_creates_user_and_token_shown_once(client, accounts):
    login(client, "admin@example.com")
    r = client.post(
        "/admin/users",
        data={
            "csrf_token": csrf(client),
            "email": "new@example.com",
            "password": "long enough",
            "role": "reviewer",
        },
        follow_redirects=True,
    )
    assert b"new@example.com" in r.data
    r = client.post("/account/tokens", data={"csrf_token": csrf(client), "name": "cli"})
    token = r.data.decode().split('<pre id="new-token">')[1].split("</pre>")[0]
    assert (
        client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json["email"]
        == "admin@example.com"
    )
    assert token not in client.get("/account").data.decode()


def test_cancel_retry_and_bulk_approve_forms(app, client, accounts):
    login(client, "rev@example.com")
    token = csrf(client)
    client.post(
        "/jobs/new",
        data={"csrf_token": token, "files": [(io.BytesIO(png()), "a.png")]},
        content_type="multipart/form-data",
    )
    [job] = client.get("/api/v1/jobs", headers=accounts["reviewer"].headers).json["items"]
    fake_caption(app, job["id"], scores=[-0.1])
    r = client.post(
        f"/jobs/{job['id']}/approve-above",
        data={"csrf_token": token, "min_score": "-1"},
        follow_redirects=True,
    )
    assert b"Approved 1 captions" in r.data


def test_api_docs_are_served_locally(client):
    page = client.get("/api/docs").data.decode()
    assert "/api/docs/assets/swagger-ui-bundle.js" in page and "cdn." not in page
    assert client.get("/api/docs/assets/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/api/openapi.json").json
    assert "/api/v1/jobs" in spec["paths"] and "/api/v1/review/queue" in spec["paths"]


def test_cancel_and_retry_forms_are_for_the_owner_and_admins(app, client, accounts):
    r = client.post(
        "/api/v1/jobs/upload",
        data={"files": [(io.BytesIO(png()), "a.png")]},
        headers=accounts["alice"].headers,
        content_type="multipart/form-data",
    )
    job_id = r.json["id"]
    login(client, "rev@example.com")
    page = client.get(f"/jobs/{job_id}").data.decode()
    assert "Cancel job" not in page and "Retry failed images" not in page
    token = csrf(client)
    assert client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token}).status_code == 403
    assert client.post(f"/jobs/{job_id}/retry", data={"csrf_token": token}).status_code == 403
    headers = accounts["alice"].headers
    assert client.get(f"/api/v1/jobs/{job_id}", headers=headers).json["status"] == "queued"
    client.post("/logout", data={"csrf_token": token})
    login(client, "alice@example.com")
    assert "Cancel job" in client.get(f"/jobs/{job_id}").data.decode()
    r = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": csrf(client)})
    assert r.status_code == 303
    assert client.get(f"/api/v1/jobs/{job_id}", headers=headers).json["status"] == "cancelled"


def test_priority_above_zero_from_the_form_needs_the_admin_role(app, client, accounts):
    login(client, "alice@example.com")
    assert 'name="priority"' in client.get("/jobs").data.decode()
    data = {"csrf_token": csrf(client), "keys": "a.jpg", "priority": "5"}
    r = client.post("/jobs/new", data=data, follow_redirects=True)
    assert b"priority" in r.data and b"Refused" in r.data
    assert client.get("/api/v1/jobs", headers=accounts["alice"].headers).json["total"] == 0
    data["priority"] = "-3"
    assert client.post("/jobs/new", data=data).status_code == 303
    client.post("/logout", data={"csrf_token": csrf(client)})
    login(client, "admin@example.com")
    data = {"csrf_token": csrf(client), "keys": "a.jpg", "priority": "5"}
    r = client.post("/jobs/new", data=data)
    assert r.status_code == 303
    [job, _] = client.get("/api/v1/jobs", headers=accounts["admin"].headers).json["items"]
    assert job["priority"] == 5


# --- sessions that end when they should (issue 16) -------------------------------------------


def test_logout_ends_a_copied_cookie_too(app, client, accounts):
    login(client, "alice@example.com")
    page = client.get("/account").data.decode()
    assert "Log out everywhere" in page and "at most 12.0 hours" in page
    thief = app.test_client()
    thief.set_cookie("session", client.get_cookie("session").value)
    assert thief.get("/jobs").status_code == 200
    client.post("/logout", data={"csrf_token": csrf(client)})
    r = thief.get("/jobs")
    assert r.status_code == 302 and "/login" in r.headers["Location"]


def _user_row(page: str, email: str) -> str:
    return page.split(f"<td>{email}</td>")[1].split("</tr>")[0]


def test_users_page_disables_enables_and_revokes_tokens(app, client, accounts):
    alice = accounts["alice"]
    browser = app.test_client()
    login(browser, "alice@example.com")
    login(client, "admin@example.com")
    row = _user_row(client.get("/admin/users").data.decode(), "alice@example.com")
    assert ">Disable</button>" in row and ">Revoke tokens</button>" in row and "Enable" not in row
    r = client.post(
        f"/admin/users/{alice.id}/tokens/revoke",
        data={"csrf_token": csrf(client)},
        follow_redirects=True,
    )
    assert b"Revoked 1 token" in r.data
    assert client.get("/api/v1/me", headers=alice.headers).status_code == 401
    assert browser.get("/jobs").status_code == 200  # tokens only: her session goes on
    r = client.post(
        f"/admin/users/{alice.id}/disable", data={"csrf_token": csrf(client)}, follow_redirects=True
    )
    assert r.status_code == 200 and ">Enable</button>" in _user_row(
        r.data.decode(), "alice@example.com"
    )
    assert browser.get("/jobs").status_code == 302
    assert login(browser, "alice@example.com").status_code == 401
    client.post(f"/admin/users/{alice.id}/enable", data={"csrf_token": csrf(client)})
    assert login(browser, "alice@example.com").status_code == 302
    assert browser.get("/jobs").status_code == 200
    # Reviewers may not; an admin may not disable themselves.
    login(browser, "rev@example.com")
    r = browser.post(f"/admin/users/{alice.id}/disable", data={"csrf_token": csrf(browser)})
    assert r.status_code == 403
    r = client.post(
        f"/admin/users/{accounts['admin'].id}/disable",
        data={"csrf_token": csrf(client)},
        follow_redirects=True,
    )
    assert b"You cannot disable your own account" in r.data
    assert client.get("/admin/users").status_code == 200


def test_a_password_set_on_the_users_page_ends_that_users_sessions_and_tokens(
    app, client, accounts
):
    alice = accounts["alice"]
    browser = app.test_client()
    login(browser, "alice@example.com")
    login(client, "admin@example.com")
    client.post(
        f"/admin/users/{alice.id}",
        data={"csrf_token": csrf(client), "role": "submitter", "password": "another password"},
    )
    assert browser.get("/jobs").status_code == 302
    assert client.get("/api/v1/me", headers=alice.headers).status_code == 401
    assert login(browser, "alice@example.com", "another password").status_code == 302
    # The admin's own session and token are untouched.
    assert client.get("/admin/users").status_code == 200
    assert client.get("/api/v1/me", headers=accounts["admin"].headers).status_code == 200
