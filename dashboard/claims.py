"""Review claims: a short hold on the image a reviewer is looking at, so that two reviewers
working through the same queue get different items.

A claim is a Redis key per image, holding the reviewer's user id and expiring after
`review_claim_seconds`, and a key per reviewer naming the image they hold: a reviewer holds
one claim at a time, so claiming the next image lets the previous one go. A decision or an
undo lets the image's claim go at once.

Claims coordinate; they decide nothing. SQL holds every review, so losing every key loses no
work, and with Redis down or unreachable the review page works on without them: the failure is
logged (once per outage), every image counts as held by nobody, and Redis is tried again after
`RETRY_SECONDS`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis
from flask import current_app
from sqlalchemy.engine import make_url

from captioner.settings import Settings

log = logging.getLogger(__name__)

# A Redis call that takes longer than this counts as Redis being down.
TIMEOUT_SECONDS = 0.5
# After a failure, claims are left alone for this long before Redis is tried again.
RETRY_SECONDS = 10.0

# KEYS[1]: the image's claim; KEYS[2]: the reviewer's claimed image.
# ARGV: the reviewer's user id, the claim's seconds, the image id, the image claims' key prefix.
# Answers the holder's user id when another reviewer holds the image, else claims it (and lets
# the reviewer's previous image go, if they still hold it) and answers nil.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return holder
end
local previous = redis.call('GET', KEYS[2])
if previous and previous ~= ARGV[3] then
  local key = ARGV[4] .. previous
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
return false
"""


@dataclass(frozen=True)
class Claim:
    """The answer to a claim: `held_by` is the user id of another reviewer holding the image
    (the claim was refused), else None; `expires_in` is how many seconds the caller's claim
    lasts (0 when claims are unavailable and nothing was held)."""

    image_id: int
    held_by: int | None
    expires_in: int

    @property
    def claimed(self) -> bool:
        return self.held_by is None and self.expires_in > 0


class ReviewClaims:
    """Claims of one deployment: keys under a prefix named after its database, so that
    dashboards over different databases sharing one Redis never see each other's claims."""

    def __init__(self, client: redis.Redis, *, seconds: int, namespace: str) -> None:
        self.client = client
        self.seconds = seconds
        self.prefix = f"captioner:review-claim:{namespace}:"
        self.holder_prefix = f"captioner:review-claimer:{namespace}:"
        self._claim = client.register_script(_CLAIM)
        self._down_until = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ReviewClaims:
        client = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=TIMEOUT_SECONDS,
            socket_connect_timeout=TIMEOUT_SECONDS,
        )
        url = make_url(settings.database_url).render_as_string(hide_password=True)
        namespace = hashlib.sha256(url.encode()).hexdigest()[:16]
        return cls(client, seconds=settings.review_claim_seconds, namespace=namespace)

    def claim(self, image_id: int, user_id: int) -> Claim:
        """Claim the image for the user (again: a claim of theirs is renewed), unless another
        reviewer holds it. With Redis unavailable: held by nobody, nothing claimed."""
        if not self._up():
            return Claim(image_id, None, 0)
        try:
            holder = self._claim(
                keys=[self.prefix + str(image_id), self.holder_prefix + str(user_id)],
                args=[user_id, self.seconds, image_id, self.prefix],
            )
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return Claim(image_id, None, 0)
        if holder is not None:
            return Claim(image_id, int(holder), 0)
        return Claim(image_id, None, self.seconds)

    def held_by_others(self, image_ids: Sequence[int], user_id: int) -> set[int]:
        """Those of these images another reviewer holds (one round trip)."""
        if not image_ids or not self._up():
            return set()
        try:
            holders = self.client.mget([self.prefix + str(i) for i in image_ids])
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return set()
        mine = str(user_id).encode()
        return {
            i for i, holder in zip(image_ids, holders, strict=True) if holder not in (None, mine)
        }

    def release(self, image_ids: Iterable[int]) -> None:
        """Let these images' claims go, whoever holds them (they were decided or undone)."""
        keys = [self.prefix + str(i) for i in image_ids]
        if not keys or not self._up():
            return
        try:
            self.client.delete(*keys)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)

    def _up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            first = self._up()
            self._down_until = time.monotonic() + RETRY_SECONDS
        if first:
            log.warning(
                "review claims unavailable (Redis: %s); reviewing goes on without them, "
                "retrying in %.0f s",
                exc,
                RETRY_SECONDS,
            )


def review_claims() -> ReviewClaims:
    """The app's claims, made on first use in each process (after a server's fork)."""
    extensions = current_app.extensions
    claims = extensions.get("captioner_review_claims")
    if claims is None:
        settings = extensions["captioner"].settings
        claims = extensions["captioner_review_claims"] = ReviewClaims.from_settings(settings)
    return claims
