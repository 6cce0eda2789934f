"""Log lines as text or JSON, with the job and image a line is about.

`configure_logging(settings)` sets up the root logger once per process: the dashboard
(`captioner serve`), the workers (`captioner worker` / `beat`) and the stack supervisor
(`captioner run`) all call it. With `CAPTIONER_LOG_FORMAT=json` each line is one JSON object:

    {"ts": "2026-01-01T12:00:00.123Z", "level": "INFO", "logger": "captioner.worker",
     "process": 4242, "message": "batch done", "job_id": 7, "image_ids": [1, 2, 3]}

`job_id` / `image_id` / `image_ids` come from a record's `extra=` or from `log_context(...)`,
which the workers' Celery hook sets around every caption batch, so a task's lines carry its
job without each call passing it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captioner.settings import Settings

# Fields copied from a record (its `extra=`) or from the context into each JSON line.
CONTEXT_FIELDS = ("job_id", "image_id", "image_ids", "task_id", "task")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "captioner_log_context", default=None
)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach `fields` (e.g. `job_id=7`) to every line logged inside the block."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind_context(**fields: Any) -> contextvars.Token:
    """Like `log_context` without a block; undo with `unbind_context(token)`."""
    return _context.set({**(_context.get() or {}), **fields})


def unbind_context(token: contextvars.Token) -> None:
    _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the current `log_context` fields onto each record (a record's own win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, process, message, the context fields
    present, and `exc` (the formatted traceback) when the record carries an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The plain format, with `job=7 image=42` appended when a line has them."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [
            f"{short}={getattr(record, key)}"
            for key, short in (("job_id", "job"), ("image_id", "image"))
            if getattr(record, key, None) is not None
        ]
        return f"{text} [{' '.join(extras)}]" if extras else text


def make_handler(fmt: str = "text", stream=None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(
    settings: Settings | None = None, *, level: str | None = None, fmt: str | None = None
) -> None:
    """Send the root logger's lines to stderr in the configured format (replacing handlers)."""
    if settings is None and (level is None or fmt is None):
        from captioner.settings import get_settings

        settings = get_settings()
    fmt = fmt or settings.log_format
    level = (level or settings.log_level).upper()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(make_handler(fmt))
    root.setLevel(getattr(logging, level, logging.INFO))


def install_celery_logging(settings: Settings | None = None, *, level: str | None = None) -> None:
    """Make a Celery worker/beat log through `configure_logging` instead of its own format,
    and bind `job_id`/`image_ids`/`task_id` around each task from its arguments."""
    from celery import signals

    from captioner.tasks import TASK_CAPTION_BATCH

    def _setup(**_kwargs: Any) -> None:  # connecting this stops Celery configuring logging
        configure_logging(settings, level=level)

    tokens: dict[str, contextvars.Token] = {}

    def _prerun(task_id=None, task=None, args=None, **_kwargs: Any) -> None:
        fields: dict[str, Any] = {"task_id": task_id, "task": getattr(task, "name", None)}
        if getattr(task, "name", None) == TASK_CAPTION_BATCH and args and len(args) >= 2:
            fields["job_id"] = args[0]
            fields["image_ids"] = list(args[1])
        tokens[task_id] = bind_context(**fields)

    def _postrun(task_id=None, **_kwargs: Any) -> None:
        token = tokens.pop(task_id, None)
        if token is not None:
            with contextlib.suppress(ValueError):  # reset from another context: leave it
                unbind_context(token)

    signals.setup_logging.connect(_setup, weak=False)
    signals.task_prerun.connect(_prerun, weak=False)
    signals.task_postrun.connect(_postrun, weak=False)
