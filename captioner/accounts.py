"""Accounts: the one place that creates users and hashes or checks their passwords.

Passwords are stored as werkzeug's salted hashes (`generate_password_hash`, scrypt by default);
each hash names its own method, so rows written by any earlier release still verify. The
dashboard (login, the accounts pages and API), `captioner user create` and the embedded stack's
admin account all come here. Functions take a `session` and never commit: the caller owns the
transaction.
"""

from __future__ import annotations

import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from captioner.state.models import User, UserRole

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


def set_password(user: User, password: str) -> None:
    """Give `user` a new password (stored hashed; the caller commits)."""
    user.password_hash = hash_password(password)


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
