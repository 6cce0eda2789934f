"""Who is asking: password login (sessions), personal API tokens, roles, CSRF, rate limits.

- Users and their passwords are created, hashed and checked by `captioner.accounts`.
- A login session is Flask's signed cookie holding the user id, the user's session epoch at
  login and the login time, nothing derived from the password. It counts only while the epoch
  is the user's current one (logout, a password change and an admin's disable move it on, so
  every copy of the cookie ends), the user is not disabled, and the login is younger than
  `session_lifetime_hours`.
- API requests authenticate with `Authorization: Bearer <token>` (only the token's SHA-256 is
  stored) or, for the dashboard's own JavaScript, with the login session plus an
  `X-CSRF-Token` header. A bad or revoked token is 401 even when a session exists.
- Every state-changing request with a session (forms and JS) must carry the session's CSRF
  token; token-authenticated API calls carry no cookies, so they need none.
- Roles: admin (everything), reviewer (sees all jobs, reviews), submitter (own jobs only).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from apiflask import abort as api_abort
from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from sqlalchemy import select

from captioner.accounts import end_sessions, find_user, may_log_in
from captioner.state.models import ApiToken, User, UserRole, utcnow

bp = Blueprint("auth", __name__)

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSRF_HEADER = "X-CSRF-Token"

limiter = Limiter(key_func=lambda: rate_key(), default_limits=[])
# The session keys of a login; anything else in the cookie (csrf, flashes) outlives it.
LOGIN_KEYS = ("user_id", "epoch", "login_at")
HSTS = "max-age=31536000"


def init_app(app, settings) -> None:
    app.config["RATELIMIT_STORAGE_URI"] = settings.rate_limit_storage_url
    app.config["RATELIMIT_HEADERS_ENABLED"] = True
    limiter.init_app(app)
    app.before_request(_check_csrf)
    app.context_processor(lambda: {"current_user": current_user(), "csrf_token": csrf_token})
    if settings.public_url_is_https:
        app.after_request(_strict_transport_security)


def _strict_transport_security(response):
    response.headers.setdefault("Strict-Transport-Security", HSTS)
    return response


def rate_key() -> str:
    """The rate-limit bucket of this request: the user, else the client address (the real one
    behind `trusted_proxy_hops` proxies)."""
    user = current_user()
    return f"user:{user.id}" if user is not None else f"ip:{get_remote_address()}"


def submit_limit() -> str:
    return current_app.extensions["captioner"].settings.submit_rate_limit


def login_limit() -> str:
    return current_app.extensions["captioner"].settings.login_rate_limit


# --- database session per request ----------------------------------------------------------


def db():
    """The request's SQLAlchemy session (closed at teardown; commit explicitly)."""
    if "db" not in g:
        g.db = current_app.extensions["captioner"].sessionmaker()
    return g.db


# --- who is asking -------------------------------------------------------------------------


class BadToken(Exception):
    pass


def _user_from_token(header: str) -> User:
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise BadToken("use Authorization: Bearer <token>")
    row = db().scalar(select(ApiToken).where(ApiToken.token_sha256 == ApiToken.hash(raw.strip())))
    if row is None or row.revoked_at is not None or row.user.disabled_at is not None:
        raise BadToken("invalid or revoked token")
    row.last_used_at = utcnow()
    db().commit()
    g.token_id = row.id
    return row.user


def _user_from_session() -> User | None:
    """The user of a login session that still counts: current epoch, enabled, not too old."""
    user_id, epoch, login_at = (session.get(key) for key in LOGIN_KEYS)
    if user_id is None or not isinstance(login_at, int):
        return None
    lifetime = current_app.extensions["captioner"].settings.session_lifetime_hours * 3600
    if not 0 <= time.time() - login_at <= lifetime:
        return None
    user = db().get(User, user_id)
    if user is None or user.disabled_at is not None or epoch != user.session_epoch:
        return None
    return user


def current_user() -> User | None:
    """The authenticated user of this request (token first, then session), cached in `g`."""
    if "user" in g:
        return g.user
    user = None
    g.token_error = None
    g.via_token = False
    header = request.headers.get("Authorization")
    if header:
        try:
            user = _user_from_token(header)
            g.via_token = True
        except BadToken as exc:
            g.token_error = str(exc)
    elif session.get("user_id") is not None:
        user = _user_from_session()
    g.user = user
    return user


def token_in_use(user: User) -> int | None:
    """The id of the API token this request authenticates `user` with; None for a session or
    another user (a password change keeps the token that makes it)."""
    acting = current_user()
    return g.get("token_id") if acting is not None and acting.id == user.id else None


def keep_this_session(user: User) -> None:
    """After this request ended `user`'s sessions (their own password change), keep the one
    making the request: it moves to the new epoch (call after the commit)."""
    acting = current_user()
    if acting is not None and acting.id == user.id and not g.get("via_token"):
        session["epoch"] = user.session_epoch


def _start_session(user: User) -> None:
    session.clear()
    session["user_id"] = user.id
    session["epoch"] = user.session_epoch
    session["login_at"] = int(time.time())
    csrf_token()


def has_role(user: User | None, *roles: str) -> bool:
    if user is None:
        return False
    return user.role == UserRole.ADMIN or user.role in roles


def api_auth(*roles: str) -> Callable:
    """API view decorator: 401 without a valid token/session, 403 without one of `roles`."""

    def decorate(view: Callable) -> Callable:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any):
            user = current_user()
            if user is None:
                api_abort(
                    401,
                    g.get("token_error") or "authentication required",
                    headers={"WWW-Authenticate": 'Bearer realm="captioner"'},
                )
            if roles and not has_role(user, *roles):
                api_abort(403, "your role does not allow this")
            return view(*args, **kwargs)

        return wrapper

    return decorate


def login_required(*roles: str) -> Callable:
    """UI view decorator: redirect to the login page, 403 without one of `roles`."""

    def decorate(view: Callable) -> Callable:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any):
            user = current_user()
            if user is None:
                return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
            if roles and not has_role(user, *roles):
                abort(403)
            return view(*args, **kwargs)

        return wrapper

    return decorate


# --- CSRF ----------------------------------------------------------------------------------


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def _check_csrf() -> None:
    if request.method in SAFE_METHODS:
        return
    if request.headers.get("Authorization"):
        return  # token auth: no ambient credentials, nothing to forge
    if request.path.startswith("/api/") and session.get("user_id") is None:
        return  # unauthenticated API call: the view answers 401
    sent = request.headers.get(CSRF_HEADER) or request.form.get("csrf_token") or ""
    expected = session.get("csrf") or ""
    if not expected or not hmac.compare_digest(sent, expected):
        if request.path.startswith("/api/"):
            api_abort(403, "missing or wrong CSRF token")
        abort(400, "missing or wrong CSRF token; reload the page and try again")


# --- login / logout ------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    if not target:
        return url_for("ui.jobs")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return url_for("ui.jobs")
    return target


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(login_limit, methods=["POST"], key_func=get_remote_address)
def login():
    if request.method == "POST":
        email = request.form.get("email", "")
        password = request.form.get("password", "")
        user = find_user(db(), email)
        if may_log_in(user, password):
            _start_session(user)
            return redirect(_safe_next(request.args.get("next")))
        flash("Wrong email or password.", "error")
        return render_template("login.html", email=email), 401
    return render_template("login.html", email="")


@bp.post("/logout")
def logout():
    """Log out everywhere: every session of this user ends, not only this browser's cookie."""
    user = _user_from_session()
    if user is not None:
        end_sessions(user)
        db().commit()
    session.clear()
    return redirect(url_for("auth.login"))
