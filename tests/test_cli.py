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


# --- `captioner submit` against a dashboard served over HTTP -----------------------------------


@pytest.fixture
def served(app):
    """The test app on a loopback port (werkzeug in a thread), with an admin's API token."""
    import threading

    from werkzeug.serving import make_server

    from tests.dashboard_helpers import make_user

    admin = make_user(app, "cli-admin@example.com", "admin")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", admin.token
    server.shutdown()
    thread.join(10)


def _submit(args, server, token):
    return CliRunner().invoke(cli, ["submit", *args, "--server", server, "--token", token])


def _one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_submit_one_image_file(served, publisher):
    server, token = served
    result = _submit([str(SAMPLE[0]), "--name", "single"], server, token)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("job ") and result.stdout.strip().endswith(" submitted")
    job_id = int(result.stdout.split()[1])
    assert len(publisher.ids_for(job_id)) == 1


def test_submit_a_refused_image_is_one_line(served, tmp_path):
    server, token = served
    junk = tmp_path / "one.png"
    junk.write_bytes(b"<html>not an image</html>")
    line = _one_line_error(_submit([str(junk)], server, token))
    assert line.startswith("Error: 422: ") and "one.png" in line


def test_submit_validation_errors_name_their_reasons(served):
    server, token = served
    line = _one_line_error(_submit([str(SAMPLE[0]), "--beams", "0"], server, token))
    assert line.startswith("Error: 422: Validation error: ") and "num_beams" in line


def test_submit_to_a_server_it_cannot_reach(tmp_path):
    from tests.conftest import free_port

    server = f"http://127.0.0.1:{free_port()}"
    line = _one_line_error(_submit([str(SAMPLE[0])], server, "token"))
    assert line == f"Error: cannot reach the server at {server}"


def test_submit_a_file_that_is_neither_image_nor_url_list(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    line = _one_line_error(_submit([str(blob)], "http://127.0.0.1:9", "token"))
    assert line.startswith(f"Error: {blob}: not a folder, zip, image")


def test_refused_items_of_an_accepted_submission_are_listed():
    from captioner.cli.client import refused_lines

    job = {"id": 1, "refused": [{"name": "b.png", "reason": "not a readable image"}, "c.gif"]}
    assert refused_lines(job) == ["refused: b.png: not a readable image", "refused: c.gif"]
    assert refused_lines({"id": 2}) == []
