"""The `captioner caption` command: batches, JSON output, one clear line per bad image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from captioner.cli import cli

SAMPLE = sorted((Path(__file__).parent.parent / "captioner" / "sample").iterdir())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "tiny"
    result = CliRunner().invoke(cli, ["init-model", "--preset", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_captions_every_sample_as_json(checkpoint):
    args = [
        "caption",
        *map(str, SAMPLE),
        "-c",
        str(checkpoint),
        "--json",
        "--beams",
        "3",
        "--n-best",
        "2",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in SAMPLE]
    for r in rows:
        assert len(r["candidates"]) >= 1 and r["caption"] == r["candidates"][0]["text"]


def test_bad_images_fail_alone(checkpoint, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"<html>not an image</html>")
    missing = tmp_path / "missing.png"
    args = [
        "caption",
        str(SAMPLE[0]),
        str(junk),
        str(missing),
        str(SAMPLE[1]),
        "-c",
        str(checkpoint),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert f"error: {junk}: not a readable image" in result.stderr
    assert f"error: {missing}: file not found" in result.stderr
    captioned = [
        line.split("\t")[0] for line in result.stdout.splitlines() if not line.startswith("\t")
    ]
    assert captioned == [str(SAMPLE[0]), str(SAMPLE[1])]


def test_bad_checkpoint_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["caption", str(SAMPLE[0]), "-c", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: checkpoint {tmp_path / 'nope'} does not exist"
    ]
