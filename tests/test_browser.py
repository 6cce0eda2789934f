"""The dashboard in a real browser: Debian's Chromium driven by Playwright (sync API) against a
running dashboard server and a real `captioner worker` (Celery on Redis, tiny untrained model).

Log in, submit a zip through the form, watch the job finish on its page (live polling), open the
review queue, correct one caption and approve another with the keyboard only, and check the
database holds both reviews by the logged-in reviewer. A screenshot of the review page is saved
under the test's tmp dir (copied to docs/review-page.png when CAPTIONER_TEST_UPDATE_SCREENSHOT is set).
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile

import pytest
from sqlalchemy import select

from captioner.state import migrate
from captioner.state.db import session_scope
from captioner.state.models import Caption, Image, Review, ReviewDecision
from tests.conftest import free_port
from tests.live_server import REPO, DashboardProcess
from tests.workers_fixtures import Stack, WorkerProcess, png, write_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "browser password"
CORRECTION = "a small square of one colour"


def _zip(n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(n):
            z.writestr(f"photos/{i:02d}.png", png(i, size=160))
    return buf.getvalue()


@pytest.fixture
def live(tmp_path, redis_dbs):
    """Database with two users, a worker and the dashboard, all on one tmp dir."""
    from captioner.accounts import create_user

    database_url = f"sqlite:///{tmp_path / 'captioner.db'}"
    migrate.upgrade(database_url)
    stack = Stack(
        root=tmp_path,
        database_url=database_url,
        redis_url=redis_dbs.flushed("main"),
        checkpoint=write_checkpoint(tmp_path / "ckpt"),
        extra_env={
            "CAPTIONER_SECRET_KEY": "browser-secret",
            "CAPTIONER_METRICS_PORT": str(free_port()),
        },
    )
    with session_scope(stack.sessions) as s:
        create_user(s, "rita@example.com", PASSWORD, role="admin", name="Rita")
        create_user(s, "other@example.com", PASSWORD, role="reviewer", name="Other")
    worker = WorkerProcess(stack, "browser")
    dashboard = DashboardProcess(stack.env, tmp_path / "dashboard.log")
    try:
        worker.wait_ready()
        dashboard.wait_ready()
        yield stack, dashboard
    finally:
        dashboard.stop()
        worker.stop()
        stack.close()
        redis_dbs.flushed("main")


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(30_000)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def test_login_submit_zip_watch_and_review_with_the_keyboard(live, page, tmp_path):
    from playwright.sync_api import expect

    stack, dashboard = live
    base = dashboard.url

    # Log in.
    page.goto(base + "/login")
    page.fill("#login-form input[name=email]", "rita@example.com")
    page.fill("#login-form input[name=password]", PASSWORD)
    page.click("#login-form button[type=submit]")
    expect(page).not_to_have_url(base + "/login")

    # Submit a zip through the form.
    page.goto(base + "/jobs")
    page.fill("#submit-form input[name=name]", "browser zip")
    archive = tmp_path / "photos.zip"
    archive.write_bytes(_zip(4))
    page.set_input_files("#submit-form input[name=archive]", str(archive))
    page.click("#submit-form button[type=submit]")
    page.wait_for_url("**/jobs/*")
    job_id = int(page.url.rstrip("/").rsplit("/", 1)[-1])

    # Watch it finish: the page polls the API and updates itself, no reload.
    expect(page.locator("#job-status")).to_have_text("finished", timeout=90_000)
    expect(page.locator("[data-count=captioned]")).to_have_text("4")
    expect(page.locator("[data-count=failed]")).to_have_text("0")

    # The review queue for this job.
    page.goto(f"{base}/review?job_id={job_id}")
    section = page.locator("#review[data-ready='1']")
    expect(section).to_be_visible()
    expect(page.locator("#review-position")).to_have_text("1 of 4")
    first = int(page.locator("#review").get_attribute("data-image-id"))

    # Correct the first caption: e, type, Ctrl+Enter -- the keyboard only.
    page.keyboard.press("e")
    editor = page.locator("#review-editor")
    expect(editor).to_be_visible()
    expect(editor).to_be_focused()
    page.keyboard.press("Control+a")
    page.keyboard.type(CORRECTION)
    expect(page.locator("#review-diff ins").first).to_be_visible()  # the diff follows the typing
    page.keyboard.press("Control+Enter")
    expect(page.locator("#review-position")).to_have_text("2 of 4 · saved corrected")
    expect(editor).to_be_hidden()
    second = int(page.locator("#review").get_attribute("data-image-id"))
    assert second != first

    # Approve the second: a.
    page.keyboard.press("a")
    expect(page.locator("#review-position")).to_have_text("3 of 4 · saved approved")

    # Back to the first (k twice): it shows the correction, its diff and its history.
    page.keyboard.press("k")
    page.keyboard.press("k")
    expect(page.locator("#review-position")).to_have_text("1 of 4")
    expect(page.locator("#review-current")).to_have_text(f"corrected: {CORRECTION}")
    expect(page.locator("#review-history li")).to_have_count(1)
    expect(page.locator("#review-history li").first).to_contain_text("rita@example.com")

    shot = tmp_path / "review-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("CAPTIONER_TEST_UPDATE_SCREENSHOT"):  # refresh the README's picture on demand
        shutil.copyfile(shot, REPO / "docs" / "review-page.png")

    # The database: both reviews, by the logged-in reviewer, on the right images.
    with stack.sessions() as s:
        reviews = s.scalars(select(Review).order_by(Review.id)).all()
        assert [(r.image_id, r.decision) for r in reviews] == [
            (first, ReviewDecision.CORRECTED),
            (second, ReviewDecision.APPROVED),
        ]
        corrected, approved = reviews
        assert corrected.text == CORRECTION
        # An approval keeps the model's caption it approved.
        assert approved.caption_id is not None
        assert approved.text == s.get(Caption, approved.caption_id).text
        assert s.get(Caption, corrected.caption_id).image_id == first
        assert all(r.reviewer.email == "rita@example.com" for r in reviews)
        assert {s.get(Image, r.image_id).job_id for r in reviews} == {job_id}
