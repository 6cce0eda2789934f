"""The review page in a real browser (Debian's Chromium driven by Playwright, as in
tests/test_browser.py) for a reviewer's long day: the image shown large, one decision per
keypress, undo of the last decision wherever the page is, the end screen, the true total, and
the alternatives on keys 1-9.

The captions are written straight into the database as a worker records them (three candidates
each, demo-like 64 px synthetic images), so no worker runs; each test takes its own job and
opens the queue filtered to it. Assertions look at the page and the database, never at timings.
"""

from __future__ import annotations

import io
import re

import pytest
from sqlalchemy import select

from captioner.state import images, migrate
from captioner.state.db import session_scope
from captioner.state.models import Caption, Review, ReviewDecision
from core_model.synthetic import SyntheticWorld
from tests.dashboard_helpers import active_version
from tests.live_server import DashboardProcess
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, PASSWORD
from tests.workers_fixtures import Stack

EMAIL = "rita@example.com"


def _alternatives(caption: str) -> list[str]:
    """Three distinct candidates, the model's caption first."""
    swapped = caption.replace("large", "SMALL").replace("small", "large").replace("SMALL", "small")
    if swapped == caption:
        swapped = caption + " on grey"
    return [caption, swapped, "a few shapes on a grey background"]


class Live:
    """A database, a dashboard over it, and jobs of captioned synthetic images made on demand."""

    def __init__(self, stack: Stack, dashboard: DashboardProcess) -> None:
        self.stack, self.dashboard, self.url = stack, dashboard, dashboard.url
        self.world = SyntheticWorld()
        self.made = 0

    def job(self, n: int, name: str = "review") -> tuple[int, list[int]]:
        """A job of n captioned 64 px images, least confident first in submission order."""
        examples = self.world.split("train", self.made + n)[self.made :]
        self.made += n
        items = []
        for k, example in enumerate(examples):
            buf = io.BytesIO()
            example.image.save(buf, "PNG")
            items.append((f"{name}-{self.made}/{k:03d}.png", buf.getvalue()))
        job_id, ids = self.stack.submit(items, name=name, publish=False)
        with session_scope(self.stack.sessions) as s:
            version = active_version(s)
            images.claim_images(s, worker_id="test", lease_seconds=60, job_id=job_id)
            for k, (image_id, example) in enumerate(zip(ids, examples, strict=True)):
                texts = _alternatives(example.caption)
                score = -0.9 + k * 0.01
                images.complete_image(
                    s,
                    image_id=image_id,
                    model_version_id=version,
                    text=texts[0],
                    score=score,
                    candidates=[{"text": t, "score": score - 0.4 * j} for j, t in enumerate(texts)],
                    width=64,
                    height=64,
                )
        return job_id, ids

    def candidates(self, image_id: int) -> list[str]:
        with self.stack.sessions() as s:
            caption = s.scalars(select(Caption).where(Caption.image_id == image_id)).one()
            return [c["text"] for c in caption.candidates]

    def reviews(self, image_ids: list[int]) -> list[tuple[int, ReviewDecision, int | None]]:
        """(image, decision, undoes) of every review row of these images, in order."""
        with self.stack.sessions() as s:
            rows = s.scalars(
                select(Review).where(Review.image_id.in_(image_ids)).order_by(Review.id)
            ).all()
            return [(r.image_id, r.decision, r.undoes_id) for r in rows]


@pytest.fixture(scope="module")
def live(tmp_path_factory, redis_dbs):
    from captioner.accounts import create_user

    root = tmp_path_factory.mktemp("review-browser")
    database_url = f"sqlite:///{root / 'captioner.db'}"
    migrate.upgrade(database_url)
    stack = Stack(
        root=root,
        database_url=database_url,
        redis_url=redis_dbs.flushed("main"),
        checkpoint=root / "no-checkpoint",
        extra_env={"CAPTIONER_SECRET_KEY": "review-browser-secret"},
    )
    with session_scope(stack.sessions) as s:
        create_user(s, EMAIL, PASSWORD, role="admin", name="Rita")
    dashboard = DashboardProcess(stack.env, root / "dashboard.log")
    try:
        dashboard.wait_ready()
        yield Live(stack, dashboard)
    finally:
        dashboard.stop()
        stack.close()
        redis_dbs.flushed("main")


@pytest.fixture
def page():
    """A Chromium page of its own, as in tests/test_browser.py; no JavaScript error allowed."""
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


def open_queue(page, live: Live, job_id: int):
    from playwright.sync_api import expect

    page.goto(live.url + "/login")
    page.fill("#login-form input[name=email]", EMAIL)
    page.fill("#login-form input[name=password]", PASSWORD)
    page.click("#login-form button[type=submit]")
    expect(page).not_to_have_url(live.url + "/login")
    page.goto(f"{live.url}/review?job_id={job_id}")
    expect(page.locator("#review[data-ready='1']")).to_be_visible()


def shown_id(page) -> int:
    return int(page.locator("#review").get_attribute("data-image-id"))


def test_small_image_shown_large_zoom_and_pan(live, page, tmp_path):
    from playwright.sync_api import expect

    job_id, ids = live.job(3, "large")
    open_queue(page, live, job_id)
    img = page.locator("#review-image")
    expect(img).to_have_class("pixelated")  # a 64 px image is upscaled without blurring
    box = img.bounding_box()
    assert box["width"] >= 384 and box["height"] >= 384
    assert page.evaluate("document.getElementById('review-image').naturalWidth") == 64
    stage = page.locator("#review-stage")
    expect(stage).to_have_attribute("data-zoom", "1")
    # Fitted, the page shows the stored preview; zoomed in, the original.
    expect(img).to_have_attribute("src", re.compile(r"/preview\?side=1024$"))
    page.keyboard.press("+")
    expect(img).to_have_attribute("src", re.compile(r"/content$"))
    page.keyboard.press("+")
    expect(stage).to_have_attribute("data-zoom", "1.56")
    page.keyboard.press("-")
    expect(stage).to_have_attribute("data-zoom", "1.25")
    page.keyboard.press("0")
    expect(stage).to_have_attribute("data-zoom", "1")

    # The mouse: the wheel zooms in, a drag pans the zoomed image.
    stage.hover()
    page.mouse.wheel(0, -100)
    expect(stage).to_have_attribute("data-zoom", "1.25")
    before = img.bounding_box()
    centre = stage.bounding_box()
    page.mouse.move(centre["x"] + 200, centre["y"] + 200)
    page.mouse.down()
    page.mouse.move(centre["x"] + 260, centre["y"] + 230, steps=4)
    page.mouse.up()
    after = img.bounding_box()
    assert round(after["x"] - before["x"]) == 60 and round(after["y"] - before["y"]) == 30

    # The next item starts fitted again.
    page.keyboard.press("j")
    expect(page.locator("#review-position")).to_have_text("2 of 3")
    assert shown_id(page) == ids[1]
    expect(stage).to_have_attribute("data-zoom", "1")
    assert img.bounding_box()["width"] >= 384
    assert live.reviews(ids) == []


def test_a_pressed_twice_before_the_next_item_adds_one_review(live, page):
    from playwright.sync_api import expect

    job_id, ids = live.job(3, "twice")
    open_queue(page, live, job_id)
    assert shown_id(page) == ids[0]
    # Two presses in one go: the second arrives while the first decision is in flight.
    page.evaluate(
        """() => { for (let n = 0; n < 2; n++)
             document.dispatchEvent(new KeyboardEvent("keydown", { key: "a", bubbles: true })); }"""
    )
    expect(page.locator("#review-position")).to_have_text("2 of 3 · saved approved")
    assert shown_id(page) == ids[1]
    # A key held down repeats: it decides nothing either.
    page.evaluate(
        """() => document.dispatchEvent(
             new KeyboardEvent("keydown", { key: "a", bubbles: true, repeat: true }))"""
    )
    page.keyboard.press("k")
    expect(page.locator("#review-position")).to_have_text("1 of 3")
    expect(page.locator("#review")).to_have_attribute("data-decision", "approved")
    assert live.reviews(ids) == [(ids[0], ReviewDecision.APPROVED, None)]


def test_undo_takes_back_the_last_decision_where_it_was_made(live, page):
    from playwright.sync_api import expect

    job_id, ids = live.job(3, "undo")
    open_queue(page, live, job_id)
    position = page.locator("#review-position")
    page.keyboard.press("a")
    expect(position).to_have_text("2 of 3 · saved approved")
    page.keyboard.press("r")
    expect(position).to_have_text("3 of 3 · saved rejected")

    # Backspace: back to the second item, its rejection undone (not "undo" on the third).
    page.keyboard.press("Backspace")
    expect(position).to_have_text("2 of 3 · undone")
    assert shown_id(page) == ids[1]
    expect(page.locator("#review-current")).to_have_text("not reviewed")
    expect(page.locator("#review-history li")).to_have_count(2)
    expect(page.locator("#review-history li").last).to_contain_text("(undo)")

    # u: then the approval of the first.
    page.keyboard.press("u")
    expect(position).to_have_text("1 of 3 · undone")
    assert shown_id(page) == ids[0]

    # Nothing of this session is left to take back: u sends nothing.
    page.keyboard.press("u")
    expect(position).to_have_text("1 of 3 · nothing to undo in this session")

    rows = live.reviews(ids)
    assert [(image, decision) for image, decision, _ in rows] == [
        (ids[0], ReviewDecision.APPROVED),
        (ids[1], ReviewDecision.REJECTED),
        (ids[1], ReviewDecision.UNDONE),
        (ids[0], ReviewDecision.UNDONE),
    ]
    with live.stack.sessions() as s:
        approved, rejected = (
            s.scalars(
                select(Review.id).where(Review.image_id == i, Review.undoes_id.is_(None))
            ).one()
            for i in ids[:2]
        )
    assert rows[2][2] == rejected and rows[3][2] == approved


def test_end_screen_and_no_decision_after_it(live, page):
    from playwright.sync_api import expect

    job_id, ids = live.job(3, "end")
    open_queue(page, live, job_id)
    posts: list[str] = []
    page.on("request", lambda r: r.method == "POST" and posts.append(r.url))
    for image_id in ids:
        expect(
            page.locator(f"#review[data-image-id='{image_id}']:not([data-busy])")
        ).to_be_visible()
        page.keyboard.press("a")
    done = page.locator("#review-done")
    expect(done).to_be_visible()
    expect(done).to_contain_text("All done")
    expect(page.locator("#review-done-summary")).to_contain_text("3 decisions in this session")
    expect(page.locator("#review")).to_be_hidden()

    page.keyboard.press("a")
    page.keyboard.press("r")
    # Back from the end screen: the last item, still with its one approval.
    page.keyboard.press("k")
    expect(page.locator("#review-position")).to_have_text("3 of 3")
    expect(page.locator("#review-history li")).to_have_count(1)
    assert len(posts) == 3
    assert live.reviews(ids) == [(i, ReviewDecision.APPROVED, None) for i in ids]

    # An empty queue (this job's, now every item is reviewed) is the end screen too.
    page.reload()
    expect(done).to_be_visible()
    expect(page.locator("#review-done-summary")).to_have_text(
        "Nothing to review with these filters."
    )


def test_total_is_the_apis_and_more_load_as_you_go(live, page):
    from playwright.sync_api import expect

    job_id, ids = live.job(56, "total")  # more than one page of 50
    open_queue(page, live, job_id)
    answer = page.request.get(f"{live.url}/api/v1/review/queue?job_id={job_id}&limit=1")
    assert answer.ok
    total = answer.json()["total"]
    assert total == 56
    position = page.locator("#review-position")
    expect(position).to_have_text(f"1 of {total}")
    for n in range(2, 54):
        page.keyboard.press("j")
        expect(position).to_have_text(f"{n} of {total}")
    assert shown_id(page) == ids[52]


def test_keys_pick_an_alternative_edit_selects_and_no_newlines(live, page):
    from playwright.sync_api import expect

    job_id, ids = live.job(3, "alternatives")
    open_queue(page, live, job_id)
    texts = live.candidates(ids[0])
    assert len(texts) == 3
    expect(page.locator("#review-candidates li")).to_have_count(3)
    editor = page.locator("#review-editor")

    # e: the caption text selected, ready to be typed over.
    page.keyboard.press("e")
    expect(editor).to_be_focused()
    expect(editor).to_have_value(texts[0])
    selection = page.evaluate(
        "() => { const e = document.getElementById('review-editor');"
        " return [e.selectionStart, e.selectionEnd]; }"
    )
    assert selection == [0, len(texts[0])]
    page.keyboard.press("Escape")
    expect(editor).to_be_hidden()

    # 2: the second alternative into the text.
    page.keyboard.press("2")
    expect(editor).to_be_visible()
    expect(editor).to_have_value(texts[1])

    # Shift+Enter adds no line; a pasted newline becomes a space.
    page.keyboard.press("End")
    page.keyboard.press("Shift+Enter")
    expect(editor).to_have_value(texts[1])
    page.evaluate(
        """() => { const data = new DataTransfer(); data.setData("text/plain", "\\nnear\\r\\nthe edge");
             document.getElementById("review-editor").dispatchEvent(
               new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true })); }"""
    )
    pasted = texts[1] + " near the edge"
    expect(editor).to_have_value(pasted)

    # Enter saves the correction.
    page.keyboard.press("Enter")
    expect(page.locator("#review-position")).to_have_text("2 of 3 · saved corrected")
    with live.stack.sessions() as s:
        [review] = s.scalars(select(Review).where(Review.image_id.in_(ids))).all()
        assert (review.image_id, review.decision, review.text) == (
            ids[0],
            ReviewDecision.CORRECTED,
            pasted,
        )
