"""Helpers for the dashboard tests: users with tokens, images, and a fake worker.

The fake worker captions through `captioner.state.jobs` exactly as the real one records results
(claim, complete/fail, finish jobs), so pages and the API see the same rows they would.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

from PIL import Image as PILImage
from sqlalchemy import select

from captioner.state import images, jobs
from captioner.state.db import session_scope
from captioner.state.models import ApiToken, Image, ImageStatus, ModelStatus, ModelVersion
from captioner.storage import LocalObjectStore

PASSWORD = "correct horse battery"


def png(color=(200, 30, 30), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@dataclass
class Account:
    id: int
    email: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def make_user(app, email: str, role: str) -> Account:
    from captioner.accounts import create_user

    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        user = create_user(session, email, PASSWORD, role=role)
        raw, row = ApiToken.issue(user.id, "test")
        session.add(row)
        session.flush()
        return Account(user.id, user.email, raw)


def active_version(session) -> int:
    version = session.scalar(select(ModelVersion).where(ModelVersion.status == ModelStatus.ACTIVE))
    if version is None:
        version = ModelVersion(
            name="v1", checkpoint_uri="file:///nowhere", status=ModelStatus.ACTIVE
        )
        session.add(version)
        session.flush()
    return version.id


def fake_caption(app, job_id: int, texts=None, scores=None) -> list[int]:
    """Caption every queued image of a job ('a photo of <name>' unless `texts` says)."""
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        version = active_version(session)
        ids = images.claim_images(session, worker_id="fake", lease_seconds=60, job_id=job_id)
        for n, image_id in enumerate(ids):
            image = session.get(Image, image_id)
            text = texts[n] if texts else f"a photo of {image.original_name}"
            score = scores[n] if scores else -1.0 + n * 0.1
            images.complete_image(
                session,
                image_id=image_id,
                model_version_id=version,
                text=text,
                score=score,
                candidates=[
                    {"text": text, "score": score},
                    {"text": text + " again", "score": score - 0.5},
                ],
                width=24,
                height=16,
            )
        jobs.finish_completed_jobs(session)
        return ids


def image_ids(app, job_id: int, status: ImageStatus | None = None) -> list[int]:
    with session_scope(app.extensions["captioner"].sessionmaker) as session:
        query = select(Image.id).where(Image.job_id == job_id).order_by(Image.id)
        if status is not None:
            query = query.where(Image.status == status)
        return list(session.scalars(query))


def login(client, email: str, password: str = PASSWORD):
    """Log in through the form (with its CSRF token); returns the response."""
    client.get("/login")
    with client.session_transaction() as s:
        token = s["csrf"]
    return client.post("/login", data={"email": email, "password": password, "csrf_token": token})


def csrf(client) -> str:
    with client.session_transaction() as s:
        return s["csrf"]


class ReadCountingStore(LocalObjectStore):
    """A local object store counting the bytes read from each object (`bytes_read`)."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.bytes_read: dict[str, int] = {}

    def open(self, key):
        store, f = self, super().open(key)

        class Counted:
            def read(self, n=-1):
                data = f.read(n)
                store.bytes_read[key] = store.bytes_read.get(key, 0) + len(data)
                return data

            def fileno(self):
                return f.fileno()

            def close(self):
                f.close()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return Counted()
