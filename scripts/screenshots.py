"""README screenshots from a running `captioner run` stack with the demo model.

    captioner run --data-dir var --port 8766          # in one terminal (trains the demo model)
    python scripts/screenshots.py --data-dir var --base http://127.0.0.1:8766

Submits 24 synthetic images (16 like the ones the model learned, 8 unseen compositions) as a
job, waits until the model captioned them, logs in as the stack's admin (`<data-dir>/admin.json`)
in Debian's Chromium and saves the review page, the grid and the job page into `docs/`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def submit(base: str, token: str) -> int:
    from core_model.synthetic import SyntheticWorld

    world = SyntheticWorld()
    files = []
    for split, n in (("test", 16), ("unseen", 8)):
        examples = world.split(split, n)
        for i in range(n):
            out = io.BytesIO()
            examples[i].image.save(out, "PNG")
            files.append(("files", (f"{split}-{i:02d}.png", out.getvalue(), "image/png")))
    headers = {"Authorization": f"Bearer {token}"}
    r = requests.post(
        f"{base}/api/v1/jobs/upload", headers=headers, files=files, data={"name": "shapes"}
    )
    r.raise_for_status()
    job_id = r.json()["id"]
    for _ in range(300):
        if requests.get(f"{base}/api/v1/jobs/{job_id}", headers=headers).json()["status"] in (
            "finished",
            "cancelled",
        ):
            return job_id
        time.sleep(1)
    raise SystemExit(f"error: job {job_id} was not captioned within 5 minutes")


def shoot(base: str, creds: dict, job_id: int, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base}/login")
        page.fill("input[name=email]", creds["email"])
        page.fill("input[name=password]", creds["password"])
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        for name, path, full in (
            ("review-page.png", f"/review?job_id={job_id}", True),
            ("review-grid.png", f"/grid?job_id={job_id}", False),
            ("job-page.png", f"/jobs/{job_id}", False),
        ):
            page.goto(base + path)
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(out / name), full_page=full)
            print(out / name)
        browser.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=REPO / "var")
    ap.add_argument("--base", default="http://127.0.0.1:8000")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args()
    admin = args.data_dir / "admin.json"
    if not admin.exists():
        print(f"error: {admin} not found: start `captioner run --data-dir {args.data_dir}` first")
        return 1
    creds = json.loads(admin.read_text())
    try:
        job_id = submit(args.base, creds["token"])
    except requests.RequestException as exc:
        print(f"error: the dashboard at {args.base} did not answer ({type(exc).__name__})")
        return 1
    shoot(args.base, creds, job_id, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
