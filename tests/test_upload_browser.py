"""Partial uploads in a real browser (Debian's Chromium driven by Playwright, as in
tests/test_browser.py), against a running dashboard and a real `captioner worker`: one bad
file among good ones is listed with its reason on the page, the form keeps its values, and the
good files make a job the worker captions.
"""

from __future__ import annotations

import pytest

from captioner.state import migrate
from captioner.state.db import session_scope
from tests.conftest import free_port
from tests.live_server import DashboardProcess
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, PASSWORD
from tests.workers_fixtures import Stack, WorkerProcess, png, write_checkpoint

EMAIL = "uma@example.com"


@pytest.fixture
def live(tmp_path, redis_dbs):
    """A database with one submitter, a worker and the dashboard, all on one tmp dir."""
    from captioner.accounts import create_user

    database_url = f"sqlite:///{tmp_path / 'captioner.db'}"
    migrate.upgrade(database_url)
    stack = Stack(
        root=tmp_path,
        database_url=database_url,
        redis_url=redis_dbs.flushed("main"),
        checkpoint=write_checkpoint(tmp_path / "ckpt"),
        extra_env={
            "CAPTIONER_SECRET_KEY": "upload-browser-secret",
            "CAPTIONER_METRICS_PORT": str(free_port()),
        },
    )
    with session_scope(stack.sessions) as s:
        create_user(s, EMAIL, PASSWORD, role="submitter", name="Uma")
    worker = WorkerProcess(stack, "upload-browser")
    dashboard = DashboardProcess(stack.env, tmp_path / "dashboard.log")
    try:
        worker.wait_ready()
        dashboard.wait_ready()
        yield dashboard.url
    finally:
        dashboard.stop()
        worker.stop()
        stack.close()
        redis_dbs.flushed("main")


@pytest.fixture
def page():
    """A Chromium page of its own; no JavaScript error allowed."""
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


def test_one_bad_file_is_listed_and_the_good_ones_are_captioned(live, page, tmp_path):
    from playwright.sync_api import expect

    base = live
    page.goto(base + "/login")
    page.fill("#login-form input[name=email]", EMAIL)
    page.fill("#login-form input[name=password]", PASSWORD)
    page.click("#login-form button[type=submit]")
    expect(page).not_to_have_url(base + "/login")

    files = []
    for i in range(3):
        path = tmp_path / f"good-{i}.png"
        path.write_bytes(png(i, size=96))
        files.append(str(path))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"<html>this is not an image</html>")
    files.insert(1, str(bad))

    page.goto(base + "/jobs")
    page.fill("#submit-form input[name=name]", "three of four")
    page.fill("#submit-form input[name=num_beams]", "4")
    page.set_input_files("#submit-form input[name=files]", files)
    page.click("#submit-form button[type=submit]")

    # The page comes back with the refused file and its reason, the form as it was sent, and
    # a link to the job the other three made.
    refused = page.locator("#refused-files li")
    expect(refused).to_have_count(1)
    expect(refused.first).to_contain_text("broken.png")
    expect(refused.first).to_contain_text("not an image")
    expect(page.locator("#submit-form input[name=name]")).to_have_value("three of four")
    expect(page.locator("#submit-form input[name=num_beams]")).to_have_value("4")
    notice = page.locator("#submitted")
    expect(notice).to_contain_text("submitted with 3 images")

    notice.locator("a").click()
    page.wait_for_url("**/jobs/*")
    expect(page.locator("#job-status")).to_have_text("finished", timeout=90_000)
    expect(page.locator("[data-count=captioned]")).to_have_text("3")
    expect(page.locator("[data-count=failed]")).to_have_text("0")
