"""Who is calling: the admin token, or a user's token (stored hashed, compared in constant time)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel

from services.database import UtcDateTime
from services.store import Store


class UserRow(SQLModel, table=True):
    __tablename__ = "users"
    user_id: str = Field(primary_key=True, max_length=64)
    token_hash: str = Field(index=True, max_length=64)
    created_at: datetime = Field(sa_type=UtcDateTime)


USERS = UserRow.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Caller:
    user_id: str | None  # None for the admin
    admin: bool = False

    def may_act_for(self, user_id: str) -> bool:
        return self.admin or self.user_id == user_id


def hash_token(token: str) -> str:
    # Tokens are 256-bit random values, so a plain digest is enough (no password stretching).
    return hashlib.sha256(token.encode()).hexdigest()


class UserDirectory:
    def __init__(self, store: Store, admin_token: str) -> None:
        self.store = store
        self._admin_hash = hash_token(admin_token)
        self._known: dict[str, Caller] = {}  # token hash → user: tokens are never revoked

    async def identify(self, token: str) -> Caller | None:
        digest = hash_token(token)
        if hmac.compare_digest(digest, self._admin_hash):
            return Caller(user_id=None, admin=True)
        if (known := self._known.get(digest)) is not None:
            return known
        async with self.store.reading() as connection:
            user_id = (await connection.execute(
                select(USERS.c.user_id).where(USERS.c.token_hash == digest))).scalar()
        if user_id is None:
            return None
        caller = self._known[digest] = Caller(user_id=user_id)
        return caller

    async def create(self, user_id: str, now: datetime) -> str | None:
        """A new user with a fresh token (returned once); None if the user exists."""
        token = secrets.token_urlsafe(32)
        try:
            async with self.store.transaction() as uow:
                await uow.execute(insert(USERS).values(user_id=user_id,
                                                       token_hash=hash_token(token),
                                                       created_at=now))
        except IntegrityError:
            return None
        return token

    async def list(self) -> list[str]:
        async with self.store.reading() as connection:
            return list((await connection.execute(
                select(USERS.c.user_id).order_by(USERS.c.user_id))).scalars())
