"""Accounts: the one place that creates users, hashes or checks their passwords, and ends
their sessions and tokens.

Passwords are stored as werkzeug's salted hashes (`generate_password_hash`, scrypt by default);
each hash names its own method, so rows written by any earlier release still verify. The
dashboard (login, the accounts pages and API), `captioner user create` and the embedded stack's
admin account all come here. Functions take a `session` and never commit: the caller owns the
transaction.

A login session carries the user's `session_epoch` from the moment it began; `end_sessions`
bumps the epoch in SQL, so every session (every copy of its cookie) stops working at once. A
password change ends sessions and revokes API tokens; so does an admin's `disable_user`, which
also refuses login and tokens until `enable_user` (old tokens stay revoked).
"""

from __future__ import annotations

import secrets

from sqlalchemy import func, inspect, select, update
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from captioner.state.models import ApiToken, User, UserRole, utcnow

MIN_PASSWORD_LENGTH = 8


def hash_password(password: str) -> str:
    """The salted hash stored in `users.password_hash` for `password`."""
    return generate_password_hash(password)


_DUMMY_HASH = hash_password(secrets.token_hex(16))


def check_password(user: User | None, password: str) -> bool:
    """Whether `password` is `user`'s password; False for no user or a user without one.

    An unknown user costs the same hashing work, so timing does not reveal which emails exist.
    """
    if user is None or not user.password_hash:
        check_password_hash(_DUMMY_HASH, password)
        return False
    return check_password_hash(user.password_hash, password)


def may_log_in(user: User | None, password: str) -> bool:
    """Whether `user` may log in with `password`: the right password and not disabled. Both
    refusals look the same to the caller (no telling which accounts exist or are disabled)."""
    return check_password(user, password) and user is not None and user.disabled_at is None


def set_password(user: User, password: str) -> None:
    """Give `user` a new password (stored hashed) and end their login sessions; the caller
    commits. `change_password` also revokes their API tokens."""
    user.password_hash = hash_password(password)
    end_sessions(user)


def change_password(
    session: Session, user: User, password: str, *, keep_token_id: int | None = None
) -> int:
    """A new password for an existing `user`: every login session ends and every API token but
    `keep_token_id` (the one making the change, if any) is revoked. Returns the tokens revoked."""
    set_password(user, password)
    return revoke_tokens(session, user, keep_token_id=keep_token_id)


def end_sessions(user: User) -> None:
    """End every login session of `user` (their session epoch moves on, in SQL, at the flush).
    A user not yet in the database has none."""
    if inspect(user).persistent:
        user.session_epoch = User.session_epoch + 1


def revoke_tokens(session: Session, user: User, *, keep_token_id: int | None = None) -> int:
    """Revoke all of `user`'s API tokens not yet revoked, but `keep_token_id`; how many."""
    stmt = update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
    if keep_token_id is not None:
        stmt = stmt.where(ApiToken.id != keep_token_id)
    return session.execute(stmt.values(revoked_at=utcnow())).rowcount


def disable_user(session: Session, user: User) -> None:
    """An admin's disable: no login, no token; every session ends and every token is revoked."""
    if user.disabled_at is None:
        user.disabled_at = utcnow()
    end_sessions(user)
    revoke_tokens(session, user)


def enable_user(user: User) -> None:
    """Allow `user` to log in again (their old tokens stay revoked)."""
    user.disabled_at = None


def find_user(session: Session, email: str) -> User | None:
    """The user with this email, compared case-insensitively, or None."""
    return session.scalar(select(User).where(func.lower(User.email) == email.strip().lower()))


def create_user(
    session: Session,
    email: str,
    password: str | None,
    *,
    role: UserRole | str = UserRole.SUBMITTER,
    name: str = "",
) -> User:
    """A new user, added and flushed (so it has an id). The email is stored lower-cased; the
    admin role also sets `is_admin`; no password (None or "") leaves the account without one,
    so it cannot log in with a password."""
    role = UserRole(role)
    user = User(email=email.strip().lower(), name=name, role=role, is_admin=role == UserRole.ADMIN)
    if password:
        set_password(user, password)
    session.add(user)
    session.flush()
    return user
