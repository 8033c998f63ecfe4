"""Sealing of broker credentials, the deployment's keys, and its generated secrets.

Credentials are sealed (Fernet) at the gateway, bound to the user and worker they are for, and
opened only by a worker-host for that worker, so nothing else ever sees them in clear. Keys
(RUNNER_SECRET_KEY or the key file, newest first) rotate without a stop: the newest seals, every
listed key opens (`runner keys`; docs/SECURITY.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from services.settings import Settings

log = logging.getLogger(__name__)

SEALED_VERSION = 2  # credentials bound to their user and worker


class SealError(ValueError):
    """A sealed value could not be opened (wrong key, tampered, or sealed for another worker);
    says nothing of the content."""


def _read_or_create(path: Path, make: Callable[[], str]) -> tuple[str, bool]:
    """Read a secret file, or create it with mode 0600. Returns (value, created). Services that
    start together race to create it: the value is written to a file of our own first and then
    linked into place, so the file appears complete or not at all, and the first link wins."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        return path.read_text().strip(), False
    value = make()
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(value + "\n")
    try:
        os.link(draft, path)
    except FileExistsError:
        return path.read_text().strip(), False
    finally:
        draft.unlink()
    return value, True


def key_file(settings: Settings) -> Path:
    return settings.secret_key_file or settings.data_dir / "secret.key"


def secret_key(settings: Settings) -> str:
    """The deployment's keys as RUNNER_SECRET_KEY spells them: newest first, comma-separated
    (the key file is made, with one key, if there is none)."""
    if settings.secret_key:
        return settings.secret_key
    _read_or_create(key_file(settings), lambda: Fernet.generate_key().decode())
    return ",".join(read_keys(key_file(settings)))


MIN_ADMIN_TOKEN = 32  # characters


class AdminTokenError(ValueError):
    """The admin token is unusable (too short); the message says what to do."""


def admin_token_file(settings: Settings) -> Path:
    return settings.data_dir / "admin.token"


def new_admin_token() -> str:
    return secrets.token_urlsafe(32)  # 43 characters, 256 bits


def check_admin_token(token: str, source: str) -> str:
    """`token`, if long enough to be an admin's; AdminTokenError naming `source` otherwise."""
    if len(token) < MIN_ADMIN_TOKEN:
        raise AdminTokenError(
            f"{source}: the admin token must be at least {MIN_ADMIN_TOKEN} characters (it has "
            f"{len(token)}); make one with `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`")
    return token


def admin_token(settings: Settings) -> tuple[str, bool]:
    """The admin bearer token (RUNNER_ADMIN_TOKEN, else the token file, made at first use) and
    whether it was generated just now; AdminTokenError if it is shorter than 32 characters."""
    if settings.admin_token:
        return check_admin_token(settings.admin_token, "RUNNER_ADMIN_TOKEN"), False
    path = admin_token_file(settings)
    token, created = _read_or_create(path, new_admin_token)
    return check_admin_token(token, str(path)), created


def write_admin_token(path: Path) -> str:
    """A new admin token, replacing the file's at once (0600): a gateway reading the file
    meanwhile sees the old token or the new one, never a part."""
    token = new_admin_token()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(draft, path)
    return token


def read_keys(path: Path) -> list[str]:
    """The keys of a key file, newest first (blank lines and `#` comments skipped)."""
    keys = [line.strip() for line in path.read_text().splitlines()]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        raise SealError(f"no key in {path}")
    return keys


def write_keys(path: Path, keys: list[str]) -> None:
    """Replace the key file at once (0600): a service reading it meanwhile sees either list."""
    for key in keys:
        Fernet(key.encode())  # a malformed key must never reach the file
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write("\n".join(keys) + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(draft, path)


def fingerprint(key: str) -> str:
    """What names a key in logs and on screens (never the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def new_key() -> str:
    return Fernet.generate_key().decode()


class Keys:
    """The current keys: fixed ones (RUNNER_SECRET_KEY), or a key file read again whenever it
    changes (its inode, size or mtime)."""

    def __init__(self, fixed: list[str] | None = None, path: Path | None = None) -> None:
        if (fixed is None) == (path is None):
            raise ValueError("fixed keys or a key file")
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._fernet = self._load(fixed) if fixed is not None else None

    @classmethod
    def for_settings(cls, settings: Settings) -> Keys:
        if settings.secret_key:
            return cls(fixed=[k.strip() for k in settings.secret_key.split(",") if k.strip()])
        secret_key(settings)  # made at first start
        return cls(path=key_file(settings))

    @staticmethod
    def _load(keys: list[str]) -> MultiFernet:
        try:
            return MultiFernet([Fernet(key.encode()) for key in keys])
        except (ValueError, TypeError):
            raise SealError("a sealing key is malformed (32 url-safe base64 bytes)") from None

    def current(self) -> MultiFernet:
        if self.path is not None:
            info = self.path.stat()
            seen = (info.st_ino, info.st_size, info.st_mtime_ns)
            if seen != self._seen or self._fernet is None:
                self._fernet = self._load(read_keys(self.path))
                self._seen = seen
        assert self._fernet is not None
        return self._fernet


class Sealer:
    """Seals credentials for one user's worker, and opens them for that worker only."""

    def __init__(self, keys: str | Keys) -> None:
        self.keys = keys if isinstance(keys, Keys) else Keys(
            fixed=[k.strip() for k in keys.split(",") if k.strip()])

    @classmethod
    def for_settings(cls, settings: Settings) -> Sealer:
        return cls(Keys.for_settings(settings))

    def seal(self, credentials: dict[str, str], *, user_id: str, worker_id: str) -> str:
        plain = {"v": SEALED_VERSION, "user_id": user_id, "worker_id": worker_id,
                 "credentials": credentials}
        return self.keys.current().encrypt(json.dumps(plain).encode()).decode()

    def open(self, sealed: str, *, user_id: str, worker_id: str) -> dict[str, str]:
        """The credentials sealed for `worker_id` of `user_id`; SealError otherwise. A blob
        sealed before credentials were bound (no ids in it) is opened, with a warning, until
        the key that sealed it is retired (`runner keys rotate` binds every stored one)."""
        try:
            plain: Any = json.loads(self.keys.current().decrypt(sealed.encode()))
        except (InvalidToken, ValueError, TypeError):
            raise SealError("credentials could not be opened (wrong deployment key?)") from None
        if not isinstance(plain, dict):
            raise SealError("credentials could not be opened (not sealed credentials)")
        if plain.get("v") != SEALED_VERSION:
            log.warning("worker %s: its credentials were sealed before they were bound to their "
                        "worker; re-seal them (runner keys rotate)", worker_id)
            return plain
        if (plain.get("user_id"), plain.get("worker_id")) != (user_id, worker_id):
            raise SealError("these sealed credentials belong to another job: refused")
        return plain["credentials"]

    def reseal(self, sealed: str, *, user_id: str, worker_id: str) -> str:
        """`sealed` sealed again under the newest key, bound to its worker (an unbound blob
        gets bound here). Raises SealError as `open` does."""
        credentials = self.open(sealed, user_id=user_id, worker_id=worker_id)
        return self.seal(credentials, user_id=user_id, worker_id=worker_id)
