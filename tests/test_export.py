"""Export writers: CSV formula escaping, JSONL and COCO shapes."""

from __future__ import annotations

import csv
import io
import json

from captioner.export import ExportRow, escape_cell, render

ROW = ExportRow(
    1,
    2,
    "a.png",
    "uploads/a.png",
    24,
    16,
    "=cmd|' /C calc'!A0",
    -0.5,
    "corrected",
    "+1 dog",
    "r@example.com",
)


def test_escape_cell():
    for dangerous in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert escape_cell(dangerous) == "'" + dangerous
    assert (
        escape_cell("a dog") == "a dog" and escape_cell(None) == "" and escape_cell(-0.5) == "-0.5"
    )


def test_csv_escapes_every_formula_cell():
    text = "".join(render([ROW], "csv", "both"))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:3] == ["image_id", "job_id", "file_name"]
    assert "'=cmd|' /C calc'!A0" in rows[1] and "'+1 dog" in rows[1]


def test_jsonl_and_coco():
    line = json.loads("".join(render([ROW], "jsonl", "reviewed")))
    assert line["reviewed_caption"] == "+1 dog" and "model_caption" not in line
    coco = json.loads("".join(render([ROW], "coco", "both")))
    assert coco["images"][0]["file_name"] == "a.png"
    assert [(a["source"], a["caption"]) for a in coco["annotations"]] == [
        ("reviewed", "+1 dog"),
        ("model", ROW.model_caption),
    ]


def test_export_rows_stream_in_chunks_with_the_newest_version_and_current_review(session):
    """Across chunk boundaries, for a job whose ids are dense and one whose ids are spread out:
    each image's caption by the newest model version and its current review, and a number of
    statements that follows the chunks, not the rows."""
    from sqlalchemy import event

    from captioner.export import export_rows
    from captioner.state import images, jobs, reviews
    from captioner.state.models import ModelVersion, User

    reviewer = User(email="r@example.com", name="r")
    old, new = (
        ModelVersion(name="v1", checkpoint_uri="x"),
        ModelVersion(name="v2", checkpoint_uri="y"),
    )
    session.add_all([reviewer, old, new])
    session.flush()
    dense = jobs.create_job(session, "dense")
    spread = jobs.create_job(session, "spread")
    dense_ids, spread_ids = [], []
    for i in range(7):
        dense_ids += jobs.submit_images(session, dense.id, [f"d/{i}.png"])
        spread_ids += jobs.submit_images(session, spread.id, [f"s/{i}.png"])
        jobs.submit_images(session, dense.id, [f"filler/{i}/{n}.png" for n in range(10)])
    for n, image_id in enumerate(dense_ids + spread_ids):
        images.save_caption(
            session, image_id=image_id, model_version_id=new.id, text=f"new {n}", score=-1.0
        )
        images.save_caption(
            session, image_id=image_id, model_version_id=old.id, text=f"old {n}", score=-2.0
        )
    reviews.add_review(
        session, image_id=spread_ids[0], decision="corrected", text="fixed", reviewer_id=reviewer.id
    )
    reviews.add_review(
        session, image_id=spread_ids[1], decision="rejected", reviewer_id=reviewer.id
    )
    reviews.add_review(
        session, image_id=spread_ids[2], decision="corrected", text="x", reviewer_id=reviewer.id
    )
    reviews.undo_review(session, spread_ids[2], reviewer.id)
    session.flush()

    rows = list(export_rows(session, job_id=spread.id, chunk_size=2))
    assert [r.image_id for r in rows] == spread_ids
    assert [r.model_caption for r in rows] == [f"new {n}" for n in range(7, 14)]
    assert [r.review_decision for r in rows[:4]] == ["corrected", "rejected", None, None]
    assert rows[0].reviewed_caption == "fixed" and rows[0].reviewer == "r@example.com"
    assert rows[1].reviewed_caption is None and rows[1].reviewer is None
    reviewed = list(export_rows(session, job_id=spread.id, which="reviewed", chunk_size=2))
    assert [r.image_id for r in reviewed] == [spread_ids[0]]

    statements: list[str] = []
    engine = session.get_bind()

    def seen(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        rows = list(export_rows(session, job_id=dense.id, chunk_size=20))
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(rows) == 77 and [r.model_caption for r in rows if r.model_caption] == [
        f"new {n}" for n in range(7)
    ]
    chunks = -(-77 // 20)
    assert len(statements) <= 1 + 2 * chunks, statements
