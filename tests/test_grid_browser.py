"""The review grid, the threshold approval and a job's live page in a real browser (Debian's
Chromium driven by Playwright), on the live stack of tests/test_review_browser.py (a database,
a dashboard process, captions written as a worker records them; no worker runs); and the API
docs rendered by Swagger UI.

Each test takes its own job. Assertions look at the page and the database, never at timings.
Screenshots of the grid and the job page are saved under the test's tmp dir.
"""

from __future__ import annotations

import io
import re

from sqlalchemy import select

from captioner.state import images, jobs
from captioner.state.db import session_scope
from captioner.state.models import Review, ReviewDecision
from tests import test_review_browser
from tests.dashboard_helpers import active_version
from tests.test_browser import PASSWORD
from tests.test_review_browser import EMAIL, Live

# The live stack (module-scoped: a database and a dashboard process) and a Chromium page with
# no JavaScript error allowed, as the review page's tests have them.
live = test_review_browser.live
page = test_review_browser.page


def log_in(page, live: Live) -> None:
    from playwright.sync_api import expect

    page.goto(live.url + "/login")
    page.fill("#login-form input[name=email]", EMAIL)
    page.fill("#login-form input[name=password]", PASSWORD)
    page.click("#login-form button[type=submit]")
    expect(page).not_to_have_url(live.url + "/login")


def open_grid(page, live: Live, job_id: int) -> None:
    from playwright.sync_api import expect

    log_in(page, live)
    page.goto(f"{live.url}/grid?job_id={job_id}")
    expect(page.locator("#grid[data-ready='1']")).to_be_attached()


def tile(page, index: int):
    return page.locator("#grid .tile").nth(index)


def current_reviews(live: Live, image_ids: list[int]) -> dict[int, tuple[ReviewDecision, int]]:
    """{image: (decision, reviewer)} of the newest review of each reviewed image."""
    with live.stack.sessions() as s:
        rows = s.scalars(select(Review).where(Review.image_id.in_(image_ids)).order_by(Review.id))
        return {r.image_id: (r.decision, r.reviewer_id) for r in rows}


def queued_job(live: Live, n: int, name: str):
    """A job of n synthetic 64 px images, queued (nothing captioned yet)."""
    examples = live.world.split("train", live.made + n)[live.made :]
    live.made += n
    items = []
    for k, example in enumerate(examples):
        buf = io.BytesIO()
        example.image.save(buf, "PNG")
        items.append((f"{name}-{live.made}/{k:03d}.png", buf.getvalue()))
    job_id, ids = live.stack.submit(items, name=name, publish=False)
    return job_id, ids, examples


def caption(live: Live, job_id: int, pairs) -> None:
    """Record captions of (image id, example) pairs as a worker does, then finish done jobs."""
    with session_scope(live.stack.sessions) as s:
        version = active_version(s)
        wanted = [image_id for image_id, _ in pairs]
        claimed = images.claim_images(s, worker_id="test", lease_seconds=60, image_ids=wanted)
        assert sorted(claimed) == sorted(wanted)
        for image_id, example in pairs:
            images.complete_image(
                s,
                image_id=image_id,
                model_version_id=version,
                text=example.caption,
                score=-0.5,
                candidates=[{"text": example.caption, "score": -0.5}],
                width=64,
                height=64,
            )
        jobs.finish_completed_jobs(s)


def test_grid_selection_with_keys_and_mouse_approves_the_selected(live, page, tmp_path):
    from playwright.sync_api import expect

    job_id, ids = live.job(6, "grid")
    open_grid(page, live, job_id)
    expect(page.locator("#grid .tile")).to_have_count(6)
    # Least confident first: the job's scores rise with submission order.
    shown = [int(tile(page, i).get_attribute("data-image-id")) for i in range(6)]
    assert shown == ids
    expect(tile(page, 0)).to_have_class("tile focused")

    # Keys: Space selects the focused tile; arrows move; Shift+arrow extends the selection.
    page.keyboard.press("Space")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expect(tile(page, 2)).to_have_class("tile focused")
    expect(tile(page, 2)).to_have_attribute("aria-selected", "false")
    page.keyboard.press("Shift+ArrowRight")
    expect(page.locator("#grid-selected")).to_have_text("3 selected")  # 0, and 2..3
    page.keyboard.press("Space")  # the focused tile (3) again: unselected
    expect(page.locator("#grid-selected")).to_have_text("2 selected")

    # Mouse: a click toggles one tile, Shift+click selects the range from it.
    tile(page, 4).click()
    tile(page, 5).click(modifiers=["Shift"])
    expect(page.locator("#grid-selected")).to_have_text("4 selected")
    selected = [i for i in range(6) if tile(page, i).get_attribute("aria-selected") == "true"]
    assert selected == [0, 2, 4, 5]
    shot = tmp_path / "grid.png"
    page.screenshot(path=str(shot), full_page=True)

    # a approves the selection in one call; the tiles stay, marked.
    page.keyboard.press("a")
    expect(page.locator("#grid-message")).to_have_text("Approved 4 captions.")
    expect(page.locator("#grid .tile.done")).to_have_count(4)
    expect(tile(page, 0).locator(".tile-state")).to_have_text("approved")
    expect(page.locator("#grid-selected")).to_have_text("0 selected")
    with live.stack.sessions() as s:
        from captioner.accounts import find_user

        rita = find_user(s, EMAIL).id
    reviewed = current_reviews(live, ids)
    assert reviewed == {ids[i]: (ReviewDecision.APPROVED, rita) for i in (0, 2, 4, 5)}
    # An approved tile cannot be selected again; the others can.
    tile(page, 0).click()
    tile(page, 1).click()
    expect(page.locator("#grid-selected")).to_have_text("1 selected")
    page.screenshot(path=str(tmp_path / "grid-approved.png"), full_page=True)


def test_grid_pages_by_cursor(live, page):
    from playwright.sync_api import expect

    job_id, ids = live.job(50, "pages")
    open_grid(page, live, job_id)
    expect(page.locator("#grid .tile")).to_have_count(48)
    expect(page.locator("#grid-position")).to_have_text("Page 1 · 48 shown · 50 awaiting review")
    page.keyboard.press("n")
    expect(page.locator("#grid[data-page='2'] .tile")).to_have_count(2)
    assert [int(tile(page, i).get_attribute("data-image-id")) for i in range(2)] == ids[48:]
    expect(page.locator("#grid-next")).to_be_disabled()
    page.click("#grid-prev")
    expect(page.locator("#grid[data-page='1'] .tile")).to_have_count(48)
    assert int(tile(page, 0).get_attribute("data-image-id")) == ids[0]


def test_threshold_approval_previews_confirms_and_undoes(live, page, tmp_path):
    from playwright.sync_api import expect

    job_id, ids = live.job(5, "threshold")  # scores -0.90, -0.89, ..., -0.86
    log_in(page, live)
    page.goto(f"{live.url}/jobs/{job_id}")
    page.fill("#approve-min-score", "-0.875")
    page.click("#approve-preview-button")
    expect(page.locator("#approve-count")).to_have_text(
        "2 unreviewed captions would be approved: score ≥ -0.875."
    )
    expect(page.locator("#approve-sample .tile")).to_have_count(2)
    sample = [
        int(t.get_attribute("data-image-id")) for t in page.locator("#approve-sample .tile").all()
    ]
    assert sample == ids[3:]
    expect(page.locator("#approve-sample .tile img").first).to_have_attribute(
        "src", f"/api/v1/images/{ids[3]}/preview?side=256"
    )
    expect(page.locator("#approve-confirm")).to_have_text("Approve 2 captions")
    page.screenshot(path=str(tmp_path / "job-approve-preview.png"), full_page=True)
    assert current_reviews(live, ids) == {}  # the preview wrote nothing

    page.click("#approve-confirm")
    expect(page.locator("#approve-result")).to_have_text(
        "Approved 2 captions scoring -0.875 or more."
    )
    assert {i: d for i, (d, _) in current_reviews(live, ids).items()} == {
        ids[3]: ReviewDecision.APPROVED,
        ids[4]: ReviewDecision.APPROVED,
    }
    review_cell = page.locator(f"#images-table tr[data-image-id='{ids[3]}'] .image-review")
    expect(review_cell).to_have_text("approved")

    page.click("#approve-undo")
    expect(page.locator("#approve-result")).to_contain_text("Undone: 2 approvals taken back")
    expect(page.locator("#approve-undo")).to_be_hidden()
    expect(review_cell).to_have_text("undone")
    assert {i: d for i, (d, _) in current_reviews(live, ids).items()} == {
        ids[3]: ReviewDecision.UNDONE,
        ids[4]: ReviewDecision.UNDONE,
    }


def test_job_page_rows_update_live_and_cancel_goes_when_finished(live, page, tmp_path):
    from playwright.sync_api import expect

    job_id, ids, examples = queued_job(live, 3, "live")
    log_in(page, live)
    page.goto(f"{live.url}/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("queued")
    expect(page.locator("#job-cancel")).to_be_visible()
    row = page.locator(f"#images-table tr[data-image-id='{ids[0]}']")
    expect(row.locator(".image-status")).to_have_text("queued")
    expect(row.locator("img")).to_have_count(0)

    # One image captioned: its row changes without a reload; the job runs on.
    caption(live, job_id, [(ids[0], examples[0])])
    expect(row.locator(".image-status")).to_have_text("captioned")
    expect(row.locator(".image-caption")).to_contain_text(examples[0].caption)
    expect(row.locator(".image-review")).to_have_text("unreviewed")
    expect(row.locator("img.thumb")).to_have_attribute(
        "src", f"/api/v1/images/{ids[0]}/preview?side=256"
    )
    expect(page.locator("#job-status")).to_have_text("running")
    expect(page.locator("#job-cancel")).to_be_visible()

    # The rest: the job is finished, every row captioned, Cancel gone.
    caption(live, job_id, list(zip(ids[1:], examples[1:], strict=True)))
    expect(page.locator("#job-status")).to_have_text("finished")
    expect(page.locator("#progress[data-live='ended']")).to_be_attached()
    expect(page.locator("#images-table .image-status")).to_have_text(["captioned"] * 3)
    expect(page.locator("#job-cancel")).to_be_hidden()
    expect(page.locator("#images-table img.thumb")).to_have_count(3)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#images-table img.thumb')]"
        ".every((img) => img.complete && img.naturalWidth === 64)"
    )
    page.screenshot(path=str(tmp_path / "job-page.png"), full_page=True)
    # A reload of a finished job shows no Cancel at all.
    page.reload()
    expect(page.locator("#job-cancel")).to_have_count(0)


def test_api_docs_list_the_operations(live, page, tmp_path):
    from playwright.sync_api import expect

    page.goto(live.url + "/api/docs")
    operations = page.locator(".opblock")
    expect(operations.first).to_be_visible()
    assert operations.count() >= 30
    expect(page.get_by_text("Unable to render this definition")).to_have_count(0)
    expect(
        page.locator(".opblock-summary-path[data-path='/api/v1/jobs/{job_id}/approve-undo']")
    ).to_have_count(1)
    expect(page.locator(".info .title")).to_contain_text("Captioner API")
    page.screenshot(path=str(tmp_path / "api-docs.png"))


def test_a_try_has_its_own_page_but_is_not_listed(live, page, tmp_path):
    from playwright.sync_api import expect

    from captioner.state.models import Job

    image = tmp_path / "mine.png"
    live.world.split("train", 1)[0].image.save(image, "PNG")
    log_in(page, live)
    page.goto(live.url + "/try")
    page.set_input_files("#try-form input[name=files]", str(image))
    page.click("#try-form button[type=submit]")
    # No worker runs: the page says the job is queued ("Job 7 queued…", then "Job 7: queued…").
    expect(page.locator("#try-status")).to_have_text(re.compile(r"^Job \d+:? queued"))
    job_id = int(re.match(r"Job (\d+)", page.locator("#try-status").inner_text()).group(1))
    with live.stack.sessions() as s:
        job = s.get(Job, job_id)
        assert (job.source, job.options["try"], job.name) == ("try", True, "try: mine.png")
    page.goto(live.url + "/jobs")
    expect(page.locator("#jobs-table tbody tr").first).to_be_visible()
    expect(page.locator(f"#jobs-table tr[data-job-id='{job_id}']")).to_have_count(0)
    page.goto(f"{live.url}/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("queued")


def test_grid_approval_is_shared_with_the_owners_identical_image(live, page, tmp_path):
    """The same content in two of one owner's jobs: approving it on the grid of one job
    approves the other too, and the page says so."""
    from playwright.sync_api import expect
    from sqlalchemy import update

    from captioner.accounts import find_user
    from captioner.state.models import Image, Job

    job_a, ids_a = live.job(2, "same-a")
    job_b, ids_b = live.job(2, "same-b")
    with session_scope(live.stack.sessions) as s:
        rita = find_user(s, EMAIL).id
        s.execute(update(Job).where(Job.id.in_([job_a, job_b])).values(owner_id=rita))
        same = [ids_a[0], ids_b[0]]
        s.execute(update(Image).where(Image.id.in_(same)).values(content_sha256="5a" * 32))
    open_grid(page, live, job_a)
    expect(page.locator("#grid .tile")).to_have_count(2)
    assert int(tile(page, 0).get_attribute("data-image-id")) == ids_a[0]
    page.keyboard.press("Space")
    page.keyboard.press("a")
    expect(page.locator("#grid-message")).to_have_text("Approved 1 caption; 1 identical image too.")
    # The copy is in the other job: this job's queue lost one caption, not two.
    expect(page.locator("#grid-position")).to_have_text("Page 1 · 2 shown · 1 awaiting review")
    page.screenshot(path=str(tmp_path / "grid-shared.png"), full_page=True)
    # The copy's own caption said something else: the approved text is set on it as a correction.
    reviewed = current_reviews(live, ids_a + ids_b)
    assert reviewed == {
        ids_a[0]: (ReviewDecision.APPROVED, rita),
        ids_b[0]: (ReviewDecision.CORRECTED, rita),
    }
    with live.stack.sessions() as s:
        texts = s.scalars(select(Review.text).where(Review.image_id.in_(same))).all()
    assert len(texts) == 2 and len(set(texts)) == 1
