"""Web users: argon2 password hashes, the users file ``fallwatch web user add`` writes, and lookup.

Users come from ``web.users`` in the settings plus ``web.users_file`` (a YAML list of the same
entries). Both are validated by :class:`fallwatch.settings.WebUser`, which refuses anything that
is not an argon2 hash, so a plain password can never be configured.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import ValidationError

from fallwatch.settings import Settings, WebUser

HASHER = PasswordHasher()
MIN_PASSWORD_CHARS = 10
# Verified against when the user name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = HASHER.hash("not a password of anyone")


class UsersError(ValueError):
    """The users file is unreadable or holds an invalid entry; the message names it."""


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise UsersError(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
    return HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return HASHER.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def read_users_file(path: Path) -> list[WebUser]:
    if not path.exists():
        return []
    try:
        raw = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError) as exc:
        raise UsersError(f"{path}: cannot read users file ({exc})") from None
    if not isinstance(raw, list):
        raise UsersError(f"{path}: must be a list of users (name, role, password_hash)")
    try:
        return [WebUser.model_validate(entry) for entry in raw]
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UsersError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def write_users_file(path: Path, users: list[WebUser]) -> None:
    """Write atomically, readable by the owner only (it holds password hashes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"name": u.name, "role": u.role, "password_hash": u.password_hash.get_secret_value()} for u in users]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(rows, fh, sort_keys=False)
    os.replace(tmp, path)


def all_users(settings: Settings) -> dict[str, WebUser]:
    """Every user by name: the users file's entries override same-named ones in the settings."""
    users = {u.name: u for u in settings.web.users}
    users.update({u.name: u for u in read_users_file(settings.web.users_file)})
    return users


def add_user(path: Path, name: str, role: str, password: str) -> WebUser:
    """Add or replace one user in the users file; the password is stored as an argon2 hash only."""
    user = WebUser(name=name, role=role, password_hash=hash_password(password))  # type: ignore[arg-type]
    users = [u for u in read_users_file(path) if u.name != name] + [user]
    write_users_file(path, users)
    return user


def remove_user(path: Path, name: str) -> bool:
    users = read_users_file(path)
    kept = [u for u in users if u.name != name]
    if len(kept) != len(users):
        write_users_file(path, kept)
    return len(kept) != len(users)
