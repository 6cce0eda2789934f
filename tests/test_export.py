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
