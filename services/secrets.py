"""Sealing of broker credentials and the deployment's generated secrets.

Credentials are sealed (Fernet: AES-128-CBC + HMAC) at the gateway and opened only by a
worker-host, straight into the worker's environment. Nothing else ever sees them in clear.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from services.settings import Settings


class SealError(ValueError):
    """A sealed value could not be opened (wrong key or tampered); says nothing of the content."""


def _read_or_create(path: Path, make: callable) -> tuple[str, bool]:
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


def secret_key(settings: Settings) -> str:
    if settings.secret_key:
        return settings.secret_key
    return _read_or_create(
        settings.secret_key_file or settings.data_dir / "secret.key",
        lambda: Fernet.generate_key().decode(),
    )[0]


def admin_token(settings: Settings) -> tuple[str, bool]:
    """The admin bearer token and whether it was generated just now (print it once, then)."""
    if settings.admin_token:
        return settings.admin_token, False
    return _read_or_create(settings.data_dir / "admin.token", lambda: secrets.token_urlsafe(32))


class Sealer:
    def __init__(self, key: str) -> None:
        self._fernet = Fernet(key.encode())

    def seal(self, credentials: dict[str, str]) -> str:
        return self._fernet.encrypt(json.dumps(credentials).encode()).decode()

    def open(self, sealed: str) -> dict[str, str]:
        try:
            return json.loads(self._fernet.decrypt(sealed.encode()))
        except (InvalidToken, ValueError):
            raise SealError("credentials could not be opened (wrong deployment key?)") from None
