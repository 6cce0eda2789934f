"""complete_images: a whole batch's captions in two statements, same rules as complete_image."""

from __future__ import annotations

from sqlalchemy import select

from captioner.state import images, jobs, reviews
from captioner.state.models import Caption, Image, ImageStatus, ModelVersion


def test_bulk_complete_saves_every_caption_and_spares_reviewed_ones(session):
    job = jobs.create_job(session, "bulk", source="upload")
    ids = jobs.submit_images(session, job.id, [f"b/{i}.jpg" for i in range(5)])
    mv = ModelVersion(name="v1", checkpoint_uri="file:///v1")
    session.add(mv)
    session.flush()
    claimed = images.claim_images(session, worker_id="w", lease_seconds=60, image_ids=ids)
    assert claimed == ids
    # image 0 already has a reviewed caption from this model version
    images.save_caption(session, image_id=ids[0], model_version_id=mv.id, text="kept", score=-1.0)
    cap0 = session.scalars(select(Caption).where(Caption.image_id == ids[0])).one()
    reviews.add_review(session, image_id=ids[0], caption_id=cap0.id, decision="approved")

    rows = [
        images.CaptionRow(
            i, f"caption {i}", -0.5, [{"text": f"caption {i}", "score": -0.5}], 32 + n, 24
        )
        for n, i in enumerate(ids)
    ]
    images.complete_images(session, mv.id, rows)
    images.complete_images(session, mv.id, rows)  # idempotent: same rows again
    session.expire_all()
    caps = {c.image_id: c for c in session.scalars(select(Caption))}
    assert len(caps) == 5
    assert caps[ids[0]].text == "kept" and caps[ids[0]].score == -1.0
    for i in ids[1:]:
        assert caps[i].text == f"caption {i}" and caps[i].candidates == [
            {"text": f"caption {i}", "score": -0.5}
        ]
    by_id = {im.id: im for im in session.scalars(select(Image))}
    for n, i in enumerate(ids):
        im = by_id[i]
        assert (
            im.status == ImageStatus.CAPTIONED and im.lease_owner is None and im.lease_until is None
        )
        assert (im.width, im.height) == (32 + n, 24)
    assert jobs.job_progress(session, job.id).is_complete
