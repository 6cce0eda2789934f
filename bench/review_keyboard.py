"""How long a keyboard review takes in the browser, against the same API calls alone.

    python bench/review_keyboard.py [--checkpoint var/models/demo] [--images 120] [--actions 100]

A live stack on this machine: a private redis-server, a SQLite database, a file:// store, the
dashboard server (`flask run`, threaded, as tests/live_server.py starts it) and one `captioner
worker` process with the demo model (beam 3, 3 candidates kept). Two jobs of synthetic images are
submitted and captioned by the worker (which is then stopped, so that it takes no CPU while the
timings run): one reviewed in Debian's Chromium (Playwright), one through the API alone.

Browser: the review page opened on the first job; a seeded plan of actions, each on a single
key as a reviewer types it: approve (a), pick an alternative (2 puts the second candidate into
the editor, Enter saves it; only when the item has one), edit (e, type a caption, Enter),
reject (r), undo (u, only when this session has a decision to take back). Each action is timed
inside the page from its deciding key's keydown (a, r, u, Enter; a capturing listener) to the
page's own DOM change that shows the next item: the review section's `data-busy` attribute
removed, which the page does right after it has rendered the next item. The image's `load`
event after the same keypress is recorded too.

API alone: the same sequence of action kinds on the second job, from this process with the
browser's session cookie and CSRF token (`requests`), making the calls the page awaits before it
shows the next item: POST the review (or the undo), GET the image, the next queue page when the
page would need it, PUT the claim on the next item. The page's history request (sent once the
item is shown) is left out of both.

Prints p50 / p95 / max milliseconds per action kind and overall, for both, and the ratio.
"""

from __future__ import annotations

import argparse
import io
import random
import re
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))  # tests/conftest.py imports its siblings by bare name

EMAIL, PASSWORD = "bench-reviewer@example.com", "bench keyboard password"
KINDS = ("approve", "pick", "edit", "reject", "undo")
WEIGHTS = (0.40, 0.15, 0.15, 0.15, 0.15)
DECIDING_KEY = {"approve": "a", "pick": "Enter", "edit": "Enter", "reject": "r", "undo": "u"}
DECISION = {"approve": "approved", "pick": "corrected", "edit": "corrected", "reject": "rejected"}
SAVED_TEXT = {
    "approve": "saved approved",
    "pick": "saved corrected",
    "edit": "saved corrected",
    "reject": "saved rejected",
    "undo": "undone",
}
EDIT_TEXT = "a small purple circle on a grey background"

# Runs in the page before its own scripts: the keydown of a deciding key starts a timing; the
# review section losing `data-busy` (the page has shown the next item) ends it; the image's
# next `load` event is kept beside it.
TIMING_SCRIPT = """
window.__bench = { t0: null, done: null, img: null, fetches: [] };
performance.setResourceTimingBufferSize(100000);
window.addEventListener("keydown", (event) => {
  if (["a", "r", "u", "Enter"].includes(event.key) && !event.repeat) {
    window.__bench = { t0: performance.now(), done: null, img: null, fetches: [] };
  }
}, true);
document.addEventListener("DOMContentLoaded", () => {
  const section = document.getElementById("review");
  const img = document.getElementById("review-image");
  if (!section || !img) return;
  new MutationObserver(() => {
    const b = window.__bench;
    if (b.t0 !== null && b.done === null && !section.hasAttribute("data-busy")) {
      b.done = performance.now();
      b.fetches = performance.getEntriesByType("resource")
        .filter((e) => e.initiatorType === "fetch" && e.startTime >= b.t0 && e.startTime < b.done)
        .map((e) => [new URL(e.name).pathname, e.duration]);
    }
  }).observe(section, { attributes: true, attributeFilter: ["data-busy"] });
  img.addEventListener("load", () => {
    const b = window.__bench;
    if (b.t0 !== null && b.img === null) b.img = performance.now();
  });
});
"""


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (q in [0, 100])."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def synthetic_pngs(checkpoint: Path, n: int, offset: int, name: str) -> list[tuple[str, bytes]]:
    from core_model.checkpoint import read_meta
    from core_model.synthetic import SyntheticWorld, world_config_from_dict

    world_cfg = (read_meta(checkpoint).get("provenance") or {}).get("world")
    world = SyntheticWorld(world_config_from_dict(world_cfg)) if world_cfg else SyntheticWorld()
    out = []
    for k, example in enumerate(world.split("test", offset + n)[offset:]):
        buf = io.BytesIO()
        example.image.save(buf, "PNG")
        out.append((f"{name}/{k:04d}.png", buf.getvalue()))
    return out


class LiveStack:
    """Redis, database, store, dashboard and one worker; two captioned jobs."""

    def __init__(self, cleanup: ExitStack, root: Path, checkpoint: Path) -> None:
        from captioner.accounts import create_user
        from captioner.state import migrate
        from captioner.state.db import session_scope
        from tests.live_server import DashboardProcess
        from tests.redis_server import private_redis
        from tests.workers_fixtures import Stack

        redis = cleanup.enter_context(private_redis(root / "redis"))
        url = f"sqlite:///{root / 'captioner.db'}"
        migrate.upgrade(url)
        self.stack = Stack(
            root=root,
            database_url=url,
            redis_url=redis.flushed("main"),
            checkpoint=checkpoint,
            extra_env={
                "CAPTIONER_SECRET_KEY": "bench-review-keyboard",
                "CAPTIONER_CAPTION_MAX_NEW_TOKENS": "24",
                "CAPTIONER_CAPTION_NUM_BEAMS": "3",
                "CAPTIONER_CAPTION_N_BEST": "3",
            },
        )
        cleanup.callback(self.stack.close)
        with session_scope(self.stack.sessions) as s:
            create_user(s, EMAIL, PASSWORD, role="reviewer", name="Bench")
        self.dashboard = DashboardProcess(self.stack.env, root / "dashboard.log")
        cleanup.callback(self.dashboard.stop)
        self.dashboard.wait_ready()
        self.url = self.dashboard.url

    def caption_jobs(self, checkpoint: Path, n: int) -> tuple[int, int]:
        """Two jobs of n images each, captioned by a real worker process (stopped after)."""
        from tests.workers_fixtures import WorkerProcess, wait_for

        jobs = []
        for k, name in enumerate(("browser", "api")):
            items = synthetic_pngs(checkpoint, n, 20_000 + k * n, name)
            jobs.append(self.stack.submit(items, name=name)[0])
        worker = WorkerProcess(self.stack, "bench")
        try:
            worker.wait_ready(120)
            t0 = time.perf_counter()
            for job_id in jobs:
                wait_for(
                    lambda j=job_id: self.stack.progress(j).captioned == n,
                    600,
                    what=f"job {job_id} captioned",
                )
            print(f"captioned {2 * n} images in {time.perf_counter() - t0:.0f} s", flush=True)
        finally:
            worker.stop()
        return jobs[0], jobs[1]


def open_review(page, url: str, job_id: int) -> None:
    from playwright.sync_api import expect

    page.goto(url + "/login")
    page.fill("#login-form input[name=email]", EMAIL)
    page.fill("#login-form input[name=password]", PASSWORD)
    page.click("#login-form button[type=submit]")
    expect(page).not_to_have_url(url + "/login")
    page.goto(f"{url}/review?job_id={job_id}")
    expect(page.locator("#review[data-ready='1']")).to_be_visible()


def choose(rng: random.Random, can_undo: bool, can_pick: bool) -> str:
    kind = rng.choices(KINDS, WEIGHTS)[0]
    if kind == "undo" and not can_undo:
        kind = "approve"
    if kind == "pick" and not can_pick:
        kind = "approve"
    return kind


@dataclass
class PageTiming:
    """One action in the page: ms to the next item shown, to its image loaded (None: no new
    image), and the fetches the page started in between as (path, ms)."""

    kind: str
    shown: float
    image: float | None
    fetches: list[tuple[str, float]]


def browser_action(page, kind: str) -> PageTiming:
    """Do one action on the page and time it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    editor = page.locator("#review-editor")
    if kind == "pick":
        page.keyboard.press("2")
        expect(editor).to_be_visible()
    elif kind == "edit":
        page.keyboard.press("e")
        expect(editor).to_be_focused()
        page.keyboard.type(EDIT_TEXT)
    page.keyboard.press(DECIDING_KEY[kind])
    page.wait_for_function("() => window.__bench.done !== null", timeout=60_000)
    position = page.locator("#review-position").text_content() or ""
    if SAVED_TEXT[kind] not in position:
        raise RuntimeError(f"{kind}: the page says {position!r}")
    try:
        page.wait_for_function("() => window.__bench.img !== null", timeout=5_000)
    except PlaywrightTimeout:  # no new image (the same one shown again): no figure
        pass
    t = page.evaluate("() => window.__bench")
    image = t["img"] - t["t0"] if t["img"] is not None else None
    fetches = [(re.sub(r"/\d+(?=/|$)", "/{id}", path), ms) for path, ms in t["fetches"]]
    return PageTiming(kind, t["done"] - t["t0"], image, fetches)


def run_browser(stack: LiveStack, job_id: int, actions: int, seed: int):
    """The plan carried out in Chromium; (timings, session cookies, CSRF token)."""
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

    rng = random.Random(seed)
    timings: list[PageTiming] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(60_000)
            context.add_init_script(TIMING_SCRIPT)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            open_review(page, stack.url, job_id)
            decided = 0
            for _ in range(actions):
                can_pick = page.locator("#review-candidates li").count() >= 2
                kind = choose(rng, decided > 0, can_pick)
                timings.append(browser_action(page, kind))
                decided += -1 if kind == "undo" else 1
            if errors:
                raise RuntimeError(f"JavaScript errors on the page: {errors}")
            cookies = {c["name"]: c["value"] for c in context.cookies()}
            csrf = page.evaluate("() => document.querySelector('meta[name=csrf-token]').content")
        finally:
            browser.close()
    return timings, cookies, csrf


class ApiReviewer:
    """The page's awaited calls, made from this process with the browser's session."""

    def __init__(self, url: str, cookies: dict, csrf: str, job_id: int) -> None:
        import requests

        self.url, self.job_id = url, job_id
        self.http = requests.Session()
        self.http.cookies.update(cookies)
        self.http.headers["X-CSRF-Token"] = csrf
        self.items: list[dict] = []
        self.index = 0
        self.cursor: str | None = None
        self.decided: list[int] = []
        self.reviewed: set[int] = set()
        self.calls: list[tuple[str, float]] = []  # (path pattern, ms) of the current action
        self.load_page(first=True)

    def call(self, method: str, path: str, **kwargs) -> dict:
        t0 = time.perf_counter()
        r = self.http.request(method, self.url + path, timeout=60, **kwargs)
        pattern = re.sub(r"/\d+(?=/|$)", "/{id}", path.split("?")[0])
        self.calls.append((pattern, 1000 * (time.perf_counter() - t0)))
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:200]}")
        return r.json()

    def load_page(self, first: bool = False) -> None:
        query = f"job_id={self.job_id}&limit=50&" + (
            "claim=true" if first else f"after={self.cursor}&skip_claimed=true"
        )
        data = self.call("GET", f"/api/v1/review/queue?{query}")
        self.items += data["items"]
        self.cursor = data["next_cursor"]

    def claim_current(self) -> None:
        item = self.items[self.index] if self.index < len(self.items) else None
        if item is not None and item["id"] not in self.reviewed:
            self.call("PUT", f"/api/v1/images/{item['id']}/claim")

    def act(self, kind: str) -> tuple[float, list[tuple[str, float]]]:
        """Do one action's calls; (ms in all, [(path pattern, ms)] per call)."""
        self.calls = []
        t0 = time.perf_counter()
        if kind == "undo":
            image_id = self.decided.pop()
            self.call("POST", f"/api/v1/images/{image_id}/reviews/undo")
            self.index = next(k for k, it in enumerate(self.items) if it["id"] == image_id)
            self.reviewed.discard(image_id)
        else:
            item = self.items[self.index]
            body = {"decision": DECISION[kind], "caption_id": item["caption"]["id"]}
            if kind == "pick":
                candidates = item["caption"]["candidates"]
                body["text"] = candidates[1]["text"] if len(candidates) > 1 else EDIT_TEXT
            elif kind == "edit":
                body["text"] = EDIT_TEXT
            self.call("POST", f"/api/v1/images/{item['id']}/reviews", json=body)
            self.decided.append(item["id"])
            self.reviewed.add(item["id"])
            image_id = item["id"]
        self.items[self.index] = self.call("GET", f"/api/v1/images/{image_id}")
        if kind != "undo":
            if self.index >= len(self.items) - 1 and self.cursor:
                self.load_page()
            self.index = min(self.index + 1, len(self.items))
        self.claim_current()
        return 1000 * (time.perf_counter() - t0), self.calls


def summary(by_kind: dict[str, list[float]]) -> dict[str, tuple[int, float, float, float]]:
    """(n, p50, p95, max) per action kind and for all of them."""
    rows = {}
    for kind in (*KINDS, "all"):
        xs = [x for k in KINDS for x in by_kind.get(k, [])] if kind == "all" else by_kind.get(kind)
        if xs:
            rows[kind] = (len(xs), percentile(xs, 50), percentile(xs, 95), max(xs))
    return rows


def group(kinds: list[str], values: list[float | None]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for kind, v in zip(kinds, values, strict=True):
        if v is not None:
            out.setdefault(kind, []).append(v)
    return out


def report(page: list[PageTiming], api: list[tuple[float, list[tuple[str, float]]]]) -> None:
    kinds = [t.kind for t in page]
    page_rows = summary(group(kinds, [t.shown for t in page]))
    api_rows = summary(group(kinds, [ms for ms, _ in api]))
    img_rows = summary(group(kinds, [t.image for t in page]))
    print()
    print(
        f"{'action':<9}{'n':>4}  {'page p50':>9}{'p95':>8}{'max':>8}   "
        f"{'API p50':>8}{'p95':>8}{'max':>8}   {'ratio p50':>9}{'p95':>7}   {'image p50':>9}"
    )
    for kind, (n, p50, p95, mx) in page_rows.items():
        _, a50, a95, amx = api_rows[kind]
        i50 = img_rows[kind][1] if kind in img_rows else float("nan")
        print(
            f"{kind:<9}{n:>4}  {p50:9.1f}{p95:8.1f}{mx:8.1f}   {a50:8.1f}{a95:8.1f}{amx:8.1f}   "
            f"{p50 / a50:9.2f}{p95 / a95:7.2f}   {i50:9.1f}"
        )
    print(
        "ms; page: keydown of the deciding key -> next item shown (review section's data-busy "
        "removed); image: -> the next image's load event; API: the same calls from Python"
    )
    print()
    print("where the page's time goes (every action): requests started before the item is shown")
    page_calls: dict[str, list[float]] = {}
    api_calls: dict[str, list[float]] = {}
    for t in page:
        for path, ms in t.fetches:
            page_calls.setdefault(path, []).append(ms)
    for _, calls in api:
        for path, ms in calls:
            api_calls.setdefault(path, []).append(ms)
    print(f"{'request':<44}{'page n':>7}{'p50 ms':>8}{'API n':>7}{'p50 ms':>8}")
    for path in sorted(set(page_calls) | set(api_calls)):
        pn, an = page_calls.get(path, []), api_calls.get(path, [])
        print(
            f"{path:<44}{len(pn):>7}{percentile(pn, 50):8.1f}{len(an):>7}{percentile(an, 50):8.1f}"
        )
    outside = [t.shown - sum(ms for _, ms in t.fetches) for t in page]
    print(
        f"page time outside its requests (script, rendering, gaps) per action: "
        f"p50 {percentile(outside, 50):.1f} ms, p95 {percentile(outside, 95):.1f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="var/models/demo", type=Path)
    ap.add_argument("--workdir", default="var/bench-review-keyboard", type=Path)
    ap.add_argument("--images", type=int, default=120, help="images per job")
    ap.add_argument("--actions", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.actions > args.images:
        ap.error("--actions must not exceed --images")
    from bench.learning_loop import ensure_checkpoint

    ensure_checkpoint(args.checkpoint)
    root = args.workdir.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    checkpoint = root / "model"
    shutil.copytree(args.checkpoint, checkpoint)  # the worker may write beside its checkpoint
    t_start = time.perf_counter()
    with ExitStack() as cleanup:
        stack = LiveStack(cleanup, root, checkpoint)
        browser_job, api_job = stack.caption_jobs(checkpoint, args.images)
        page, cookies, csrf = run_browser(stack, browser_job, args.actions, args.seed)
        reviewer = ApiReviewer(stack.url, cookies, csrf, api_job)
        api = [reviewer.act(t.kind) for t in page]
    kinds = [t.kind for t in page]
    counts = {k: kinds.count(k) for k in KINDS}
    print(f"{len(kinds)} actions: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    report(page, api)
    print(f"whole bench: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
