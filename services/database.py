"""A service's database on SQLAlchemy Core: write transactions and read snapshots, async.

`Database.begin()` is a write transaction, `Database.connect()` a read-only one. SQLite (the
default, WAL) runs its statements inline on the event loop, writes as `BEGIN IMMEDIATE` so that
read-modify-write decisions never race, and a transaction it refuses for a lock is tried again
after an `asyncio.sleep`, so the loop never blocks; PostgreSQL runs on SQLAlchemy's async engine.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import DateTime, TypeDecorator, create_engine, event, text
from sqlalchemy.engine import Connection, Dialect, Engine, Result, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.sql import Executable

T = TypeVar("T")

LOCK_PATIENCE = 30.0  # seconds a write transaction waits for another connection's write lock
_READ_ONLY = "runner_read_only"  # execution option of read transactions on SQLite
_SNAPSHOT = "SELECT 1 FROM sqlite_master LIMIT 1"  # a read: starts the transaction's snapshot


class UtcDateTime(TypeDecorator[datetime]):
    """A point in time, stored as UTC: `TIMESTAMP WITH TIME ZONE` on PostgreSQL, `DATETIME` text
    on SQLite. Takes aware datetimes only and returns aware UTC ones on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError("naive datetime: every time in this system is timezone-aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.utcoffset() is None else value.astimezone(UTC)


class DbConnection(Protocol):
    """One transaction: SQLAlchemy's `AsyncConnection` on PostgreSQL, `_InlineConnection` on
    SQLite."""

    @property
    def dialect(self) -> Dialect: ...

    async def execute(self, statement: Executable, parameters: Any = None) -> Result[Any]: ...

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T: ...


class _InlineConnection:
    """A synchronous SQLAlchemy connection behind the async interface of `DbConnection`."""

    __slots__ = ("_connection",)

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    @property
    def dialect(self) -> Dialect:
        return self._connection.dialect

    async def execute(self, statement: Executable, parameters: Any = None) -> Result[Any]:
        return self._connection.execute(statement, parameters)

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self._connection, *args)


class Database:
    """The database at `url` (see module doc)."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self._engine: Engine | None = None
        if self.url.get_backend_name() == "sqlite":
            path = self.url.database or ""
            if not path or path == ":memory:":
                raise ValueError("an SQLite database must be a file (use a temporary one)")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.sqlite_file: str | None = path
            self._engine = _sqlite_engine(path)
            self._async = None
        else:
            self.sqlite_file = None
            self._async = create_async_engine(self.url, pool_pre_ping=True)

    @property
    def dialect(self) -> Dialect:
        return (self._engine or self._async).dialect  # type: ignore[union-attr]

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[DbConnection]:
        """A write transaction, committed when the block ends, rolled back if it raises."""
        if self._async is not None:
            async with self._async.begin() as connection:
                yield connection
            return
        connection = await _begin(self._engine)  # type: ignore[arg-type]
        try:
            yield _InlineConnection(connection)
        except BaseException:
            connection.rollback()
            raise
        else:
            connection.commit()
        finally:
            connection.close()

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[DbConnection]:
        """A read transaction: a snapshot (on SQLite it takes no lock and never waits)."""
        if self._async is not None:
            async with self._async.connect() as connection:
                yield connection
            return
        assert self._engine is not None
        connection = await _begin(self._engine, read_only=True)
        try:
            yield _InlineConnection(connection)
        finally:
            connection.rollback()
            connection.close()

    async def dispose(self) -> None:
        if self._async is not None:
            await self._async.dispose()
        elif self._engine is not None:
            self._engine.dispose()

    async def ensure_exists(self) -> None:
        """PostgreSQL: create this database when it does not exist yet (first start of a
        service, or a worker-host with a new id); the role needs CREATEDB for that."""
        if self._async is not None and self.dialect.name == "postgresql":
            await _ensure_postgres_database(self.url)


def _sqlite_engine(path: str) -> Engine:
    # timeout 0: a busy statement fails at once and `_begin` tries it again off the loop
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (SQLAlchemy's recipe)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # a large write transaction (a batch of the event log) keeps its changed pages in
        # memory rather than spilling them to the WAL and reading them back; not 16384, whose
        # low byte of 0 SQLite reads as "off"
        cursor.execute("PRAGMA cache_spill=16000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


async def _begin(engine: Engine, read_only: bool = False) -> Connection:
    """A connection in a `BEGIN IMMEDIATE` transaction, or a read's with its snapshot taken,
    waiting (asynchronously) while SQLite refuses it, for up to `LOCK_PATIENCE` seconds."""
    deadline, pause = time.monotonic() + LOCK_PATIENCE, 0.001
    while True:
        connection = None
        try:
            connection = engine.connect().execution_options(**{_READ_ONLY: read_only})
            connection.begin()
            if read_only:
                connection.exec_driver_sql(_SNAPSHOT)
            return connection
        except OperationalError as exc:
            if connection is not None:
                connection.close()
            if not busy(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)


def busy(exc: BaseException) -> bool:
    """SQLite refused a statement because another connection holds a lock (it did nothing)."""
    orig = getattr(exc, "orig", exc)
    return isinstance(orig, sqlite3.OperationalError) and (
        getattr(orig, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED))


# SQLite's failures that may pass (sqlite3 raises OperationalError for a bad statement too)
SQLITE_TRANSIENT = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR,
                    sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN}


def transient(exc: BaseException) -> bool:
    """A database failure that may pass on its own: SQLite busy, an I/O error, a full disk; a
    lost connection, or another backend's operational error (a deadlock, a failover). Not a
    constraint violated, nor a bad statement."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(getattr(exc, "orig", None), sqlite3.Error):
        return getattr(exc.orig, "sqlite_errorcode", 0) & 0xFF in SQLITE_TRANSIENT  # type: ignore[attr-defined]
    return isinstance(exc, OperationalError)


async def _ensure_postgres_database(url: Any) -> None:
    probe = create_async_engine(url)
    try:
        async with probe.connect():
            return
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != "3D000":  # invalid_catalog_name
            raise
    finally:
        await probe.dispose()
    name = url.database
    server = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with server.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote(name)
            try:
                await conn.execute(text(f"CREATE DATABASE {quoted}"))
            except DBAPIError as exc:
                # created meanwhile: 42P04, or 23505 when the two creations overlapped
                if getattr(exc.orig, "sqlstate", None) not in ("42P04", "23505"):
                    raise
    except DBAPIError as exc:
        raise RuntimeError(
            f"database {name!r} does not exist and could not be created (make it and its "
            f"role with `runner db setup`, or grant CREATEDB): {exc.orig}"
        ) from exc
    finally:
        await server.dispose()
