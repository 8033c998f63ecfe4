"""Who is calling: the admin token, or a user's token (stored hashed, compared in constant time).

A user's token can expire, be revoked and be rotated; a gateway trusts a token it looked up for
`token_cache_seconds` at most, so a revocation through any gateway sharing the store holds on
every one within that. The admin token is RUNNER_ADMIN_TOKEN, or the token file, read again
whenever it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel

from services.database import UtcDateTime
from services.secrets import AdminTokenError, check_admin_token, write_admin_token
from services.store import Store

log = logging.getLogger(__name__)

REVOKED = "revoked"  # a token hash no token has (hashes are 64 hex digits)


class UserRow(SQLModel, table=True):
    __tablename__ = "users"
    user_id: str = Field(primary_key=True, max_length=64)
    token_hash: str = Field(index=True, max_length=64)
    created_at: datetime = Field(sa_type=UtcDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UtcDateTime, nullable=True)


USERS = UserRow.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Caller:
    user_id: str | None  # None for the admin
    admin: bool = False
    expires_at: datetime | None = None  # when the token stops working

    def may_act_for(self, user_id: str) -> bool:
        return self.admin or self.user_id == user_id


def hash_token(token: str) -> str:
    # Tokens are 256-bit random values, so a plain digest is enough (no password stretching).
    return hashlib.sha256(token.encode()).hexdigest()


class UnknownUser(LookupError):
    """No user by that id."""


class AdminToken:
    """The admin token's digest: fixed (RUNNER_ADMIN_TOKEN), or a file's, read again whenever
    the file changes (its inode, size or mtime)."""

    def __init__(self, token: str, path: Path | None = None) -> None:
        self.path = path  # None: fixed
        self._digest = hash_token(token)
        self._seen = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def matches(self, digest: str) -> bool:
        if self.path is not None and (seen := self._stat()) != self._seen:
            self._seen = seen
            self._digest = self._read()
        return hmac.compare_digest(digest, self._digest)

    def _read(self) -> str:
        """The file's token digest; one no token matches when the file is gone or unusable."""
        assert self.path is not None
        try:
            return hash_token(check_admin_token(self.path.read_text().strip(), str(self.path)))
        except (OSError, AdminTokenError) as exc:
            log.error("admin token refused until the file is fixed: %s", exc)
            return REVOKED

    def rotate(self) -> str:
        """A new admin token in the file; the old one is refused from now on."""
        if self.path is None:
            raise AdminTokenError("the admin token is set by RUNNER_ADMIN_TOKEN: change it there "
                                  "and restart the gateways")
        token = write_admin_token(self.path)
        self._digest, self._seen = hash_token(token), self._stat()
        return token


class UserDirectory:
    def __init__(self, store: Store, admin: AdminToken, cache_seconds: float = 0.5) -> None:
        self.store = store
        self.admin = admin
        self.cache_seconds = cache_seconds
        self._known: dict[str, tuple[Caller, float]] = {}  # token hash → (user, looked up at)

    async def identify(self, token: str) -> Caller | None:
        """The token's owner (an expired user token too: `expires_at` says so), or None."""
        digest = hash_token(token)
        if self.admin.matches(digest):
            return Caller(user_id=None, admin=True)
        now = time.monotonic()
        known = self._known.get(digest)
        if known is not None and now - known[1] < self.cache_seconds:
            return known[0]
        async with self.store.reading() as connection:
            row = (await connection.execute(
                select(USERS.c.user_id, USERS.c.expires_at)
                .where(USERS.c.token_hash == digest))).first()
        if row is None:
            self._known.pop(digest, None)
            return None
        if len(self._known) > 10_000:
            self._known = {d: k for d, k in self._known.items()
                           if now - k[1] < self.cache_seconds}
        caller = Caller(user_id=row.user_id, expires_at=row.expires_at)
        self._known[digest] = (caller, now)
        return caller

    async def create(self, user_id: str, now: datetime,
                     expires_in: timedelta | None = None) -> str | None:
        """A new user with a fresh token (returned once); None if the user exists."""
        token = secrets.token_urlsafe(32)
        try:
            async with self.store.transaction() as uow:
                await uow.execute(insert(USERS).values(
                    user_id=user_id, token_hash=hash_token(token), created_at=now,
                    expires_at=now + expires_in if expires_in is not None else None))
        except IntegrityError:
            return None
        return token

    async def rotate(self, user_id: str, now: datetime,
                     expires_in: timedelta | None = None) -> tuple[str, datetime | None]:
        """A new token for the user (returned once) and its expiry; the old one is refused at
        once here and within `cache_seconds` elsewhere. UnknownUser if there is none."""
        token = secrets.token_urlsafe(32)
        expires_at = now + expires_in if expires_in is not None else None
        await self._set(user_id, hash_token(token), expires_at)
        return token, expires_at

    async def revoke(self, user_id: str) -> None:
        """The user's token refused from now on (here at once, elsewhere within
        `cache_seconds`); the user and their runners stay. UnknownUser if there is none."""
        await self._set(user_id, REVOKED, None)

    async def _set(self, user_id: str, token_hash: str, expires_at: datetime | None) -> None:
        async with self.store.transaction() as uow:
            changed = await uow.execute(update(USERS).where(USERS.c.user_id == user_id)
                                        .values(token_hash=token_hash, expires_at=expires_at))
        if changed.rowcount == 0:
            raise UnknownUser(user_id)
        self._known = {d: k for d, k in self._known.items() if k[0].user_id != user_id}

    async def list(self) -> list[str]:
        async with self.store.reading() as connection:
            return list((await connection.execute(
                select(USERS.c.user_id).order_by(USERS.c.user_id))).scalars())
