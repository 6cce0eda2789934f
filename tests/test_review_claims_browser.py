"""Two reviewers on the review page at once, in real browsers (Debian's Chromium driven by
Playwright, two browser contexts: two logins): they get different first items, and an item
the other reviewer holds is passed over, never reviewed twice.

The live stack and the captioned jobs come from tests/test_review_browser.py (`live`, `page`,
`open_queue`); the second reviewer logs in the same way. Assertions look at the pages and the
database, never at timings.
"""

from __future__ import annotations

from captioner.state.db import session_scope
from captioner.state.models import ReviewDecision
from tests.test_browser import PASSWORD
from tests.test_review_browser import live, open_queue, page, shown_id  # noqa: F401 (fixtures)

SECOND = "sam@example.com"


def _second_reviewer(stack, first):
    """A page of its own (a second browser context: its own cookies) logged in as a second
    reviewer (the account is made once per live stack)."""
    from playwright.sync_api import expect

    from captioner.accounts import create_user, find_user

    with session_scope(stack.stack.sessions) as s:
        if find_user(s, SECOND) is None:
            create_user(s, SECOND, PASSWORD, role="reviewer", name="Sam")
    context = first.context.browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    other = context.new_page()
    errors: list[str] = []
    other.on("pageerror", lambda exc: errors.append(str(exc)))
    other.goto(stack.url + "/login")
    other.fill("#login-form input[name=email]", SECOND)
    other.fill("#login-form input[name=password]", PASSWORD)
    other.click("#login-form button[type=submit]")
    expect(other).not_to_have_url(stack.url + "/login")
    return other, errors


def _open(other, stack, job_id: int) -> None:
    from playwright.sync_api import expect

    other.goto(f"{stack.url}/review?job_id={job_id}")
    expect(other.locator("#review[data-ready='1']")).to_be_visible()


def test_two_reviewers_get_different_first_items(live, page):  # noqa: F811 (fixtures)
    from playwright.sync_api import expect

    job_id, ids = live.job(3, "two-reviewers")
    other, errors = _second_reviewer(live, page)
    open_queue(page, live, job_id)
    _open(other, live, job_id)
    assert shown_id(page) == ids[0]
    assert shown_id(other) == ids[1]

    # Rita approves her item; the next one is Sam's, so her page passes over it.
    page.keyboard.press("a")
    expect(page.locator(f"#review[data-image-id='{ids[2]}']")).to_be_visible()
    expect(page.locator("#review-position")).to_contain_text("saved approved")

    # Sam approves his; the one after it is Rita's now: his queue has nothing left.
    other.keyboard.press("a")
    expect(other.locator("#review-done")).to_be_visible()
    expect(other.locator("#review-done-summary")).to_contain_text("1 decision in this session")

    # Rita rejects hers: every item got exactly one decision, each from one reviewer.
    page.keyboard.press("r")
    expect(page.locator("#review-done")).to_be_visible()
    rows = live.reviews(ids)
    assert sorted((image, decision) for image, decision, _ in rows) == [
        (ids[0], ReviewDecision.APPROVED),
        (ids[1], ReviewDecision.APPROVED),
        (ids[2], ReviewDecision.REJECTED),
    ]
    assert errors == []


def test_an_item_the_other_reviewer_left_is_free_again(live, page):  # noqa: F811 (fixtures)
    """A reviewer holds one item at a time: moving on with j lets the one left go, and the
    other reviewer, opening the queue then, gets it."""
    from playwright.sync_api import expect

    job_id, ids = live.job(3, "moving-on")
    other, errors = _second_reviewer(live, page)
    open_queue(page, live, job_id)
    page.keyboard.press("j")
    expect(page.locator(f"#review[data-image-id='{ids[1]}']:not([data-busy])")).to_be_visible()
    _open(other, live, job_id)
    assert shown_id(other) == ids[0]
    # Back with k: Sam holds that item now, so Rita's page drops it and stays on hers.
    page.keyboard.press("k")
    expect(page.locator("#review:not([data-busy])")).to_be_visible()
    assert shown_id(page) == ids[1]
    expect(page.locator("#review-position")).to_have_text("1 of 2")
    assert live.reviews(ids) == []
    assert errors == []
