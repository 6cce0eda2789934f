"""Why a submission is refused: the errors every intake module raises and every caller catches.

The dashboard turns them into HTTP errors (`status_code`) or a flashed message (`reason`); a
background fetch records the `reason` on the image it failed.
"""

from __future__ import annotations


class SubmissionRejected(ValueError):
    """A submission (or one part of it) that is refused; `reason` is for people."""

    status_code = 422

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TooLarge(SubmissionRejected):
    """A file, a zip or a download over a size limit."""

    status_code = 413


class UnsafeURL(SubmissionRejected):
    """A URL whose scheme or address is not allowed."""
