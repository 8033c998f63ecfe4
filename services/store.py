"""Each service's own database: its state, its processed-message ledger, its outbox, its timers.

Exactly-once effect on top of at-least-once delivery: a handler runs inside `Store.processing`,
which records the message's `event_id` in `processed` in the same transaction as the state change
and the outgoing messages (`outbox`). A redelivered message finds its id and is skipped. The
outbox is published after the commit by `OutboxRelay`, so a crash between commit and publish
loses nothing: the relay publishes the rows at the next start.

SQLite (default) runs in WAL mode, and every transaction is `BEGIN IMMEDIATE`, so
read-modify-write decisions never race, whether across tasks or processes. Any SQLAlchemy async
URL works; on PostgreSQL (tested like SQLite) `lock()` takes a transaction-scoped advisory lock,
every datetime column is `TIMESTAMP WITH TIME ZONE`, and `open()` creates the service's database
when it does not exist yet (the role needs CREATEDB for that; otherwise create it beforehand).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy import (
    Column,
    DateTime,
    String,
    Text,
    TypeDecorator,
    bindparam,
    delete,
    event,
    insert,
    inspect,
    text,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.schema import Table
from sqlalchemy.sql import Executable
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from events import Envelope, Message
from services import metrics
from services.bus import Bus, PublishFailed

log = logging.getLogger(__name__)

T = TypeVar("T")


class UtcDateTime(TypeDecorator[datetime]):
    """A point in time, stored as UTC: `TIMESTAMP WITH TIME ZONE` on PostgreSQL (asyncpg refuses
    an aware value for a naive column), `DATETIME` text on SQLite. Takes aware datetimes only and
    returns aware UTC ones on every backend (SQLite hands back naive values, read here as UTC).
    Declared explicitly so the schema does not depend on the SQLModel version's default."""

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


class Processed(SQLModel, table=True):
    """Messages whose effect is committed, per consuming queue, and when (Unix seconds): the
    ledger keeps an id for the retention (`Store.forget_processed`), not forever."""

    __tablename__ = "processed"
    consumer: str = Field(primary_key=True, max_length=100)
    event_id: str = Field(primary_key=True, max_length=36)
    recorded_at: int | None = Field(default=None, index=True)  # None only before an upgrade


class OutboxRow(SQLModel, table=True):
    """Messages committed but not yet confirmed by the broker."""

    __tablename__ = "outbox"
    id: int | None = Field(default=None, primary_key=True)
    envelope: str = Field(sa_column=Column(Text, nullable=False))


class TimerRow(SQLModel, table=True):
    """A durable timer: fires at `due_at` even across restarts of the service."""

    __tablename__ = "timers"
    key: str = Field(sa_column=Column(String(200), primary_key=True))
    kind: str = Field(max_length=50)
    due_at: datetime = Field(index=True, sa_type=UtcDateTime)
    data: str = Field(default="{}", sa_column=Column(Text, nullable=False))


OUTBOX: Table = OutboxRow.__table__  # type: ignore[attr-defined]
PROCESSED: Table = Processed.__table__  # type: ignore[attr-defined]
# The ledger's two statements, built once and run as Core (through the ORM they cost about as
# much as a typical handler): which of some event ids a consumer has processed; record some.
PROCESSED_AMONG = select(PROCESSED.c.event_id).where(
    PROCESSED.c.consumer == bindparam("consumer"),
    PROCESSED.c.event_id.in_(bindparam("ids", expanding=True)),
)
RECORD_PROCESSED = insert(PROCESSED)
FORGET_CHUNK = 5_000  # ledger rows deleted per transaction: other writers wait that long at most

BASE_TABLES: tuple[Table, ...] = tuple(
    t.__table__
    for t in (Processed, OutboxRow, TimerRow)  # type: ignore[attr-defined]
)


@dataclass
class UnitOfWork:
    """One transaction: the session for state, and the messages it will emit on commit."""

    session: AsyncSession
    cause: Envelope | None = None
    emitted: list[Envelope] = field(default_factory=list)
    outbox_ids: list[int] = field(default_factory=list)  # of `emitted`, once written
    timers_changed: bool = False
    after_commit: list[Callable[[], Any]] = field(default_factory=list)

    def emit(
        self,
        message: Message,
        *,
        stream: str,
        user_id: str | None = None,
        correlation_id: str | None = None,
        occurred_at: datetime | None = None,
    ) -> Envelope:
        """Queue `message` for publishing once this transaction commits."""
        envelope = Envelope.wrap(
            message,
            stream=stream,
            user_id=user_id,
            correlation_id=correlation_id,
            causation=self.cause,
            occurred_at=occurred_at,
        )
        self.emitted.append(envelope)
        return envelope

    async def connection(self) -> AsyncConnection:
        """The transaction's connection for Core statements, with the session's pending ORM
        changes flushed first, so that a Core read sees what this transaction has changed."""
        await self.session.flush()
        return await self.session.connection()

    async def _write_outbox(self) -> None:
        """The outbox rows of what was emitted, at the end of the transaction: one Core insert
        (an ORM object per row cost more than the rest of a typical handler), ids in emit
        order."""
        if self.emitted:
            connection = await self.connection()
            result = await connection.execute(
                insert(OUTBOX).returning(OUTBOX.c.id, sort_by_parameter_order=True),
                [{"envelope": envelope.model_dump_json()} for envelope in self.emitted],
            )
            self.outbox_ids = list(result.scalars())

    async def set_timer(self, key: str, kind: str, due_at: datetime, /, **data: Any) -> None:
        await self.session.merge(
            TimerRow(key=key, kind=kind, due_at=due_at, data=json.dumps(data, default=str))
        )
        self.timers_changed = True

    async def cancel_timer(self, key: str) -> None:
        await self.session.exec(delete(TimerRow).where(TimerRow.key == key))  # type: ignore[call-overload]
        self.timers_changed = True

    async def lock(self, name: str) -> None:
        """Serialise decisions about `name` (e.g. one user's quota) across processes."""
        connection = await self.session.connection()  # the transaction really begins here
        if connection.dialect.name == "postgresql":
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            await self.session.exec(text("SELECT pg_advisory_xact_lock(:k)").bindparams(k=key))  # type: ignore[call-overload]
        # SQLite: the BEGIN IMMEDIATE just issued holds the database's single write lock.


def _add_new_columns(conn: Connection, tables: Sequence[Table]) -> None:
    """Schema upgrades are additive: a nullable column a newer version added to a table that
    already exists is added to it, and so is a new index (`create_all` creates missing tables
    only)."""
    inspector = inspect(conn)
    for table in tables:
        existing = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in existing:
                continue
            if not column.nullable:
                raise RuntimeError(f"table {table.name} lacks column {column.name}, which a "
                                   "newer version requires (not nullable: migrate by hand)")
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
            log.info("store: added column %s.%s", table.name, column.name)
        for index in table.indexes:  # of the added columns too (`create_all` skipped the table)
            index.create(conn, checkfirst=True)


# A statement run at every open, after the schema upgrade: it gives the rows an older version
# left without a value in a newer column their value now (and finds nothing once that is done).
Backfill = Callable[[], Executable]


def _time_untimed_ids() -> Executable:
    """Ids recorded before the ledger had times: their retention counts from now."""
    return (update(PROCESSED).where(PROCESSED.c.recorded_at.is_(None))
            .values(recorded_at=int(time.time())))


class Store:
    """A service's database (see module doc)."""

    def __init__(self, url: str, tables: Sequence[Table] = (),
                 backfills: Sequence[Backfill] = ()) -> None:
        self.url = url
        self.tables = (*BASE_TABLES, *tables)
        self.backfills = (_time_untimed_ids, *backfills)
        self.engine: AsyncEngine = _engine(url)
        self._reader = self.engine.execution_options(**{READ_ONLY: True})
        self._write_lock = asyncio.Lock()
        self._group: list[tuple[Callable[[UnitOfWork], Awaitable[Any]], asyncio.Future[Any]]] = []
        self._grouper: asyncio.Task[None] | None = None
        self.on_commit: list[Any] = []  # callbacks(uow) run after each commit

    async def open(self) -> None:
        if self.engine.dialect.name == "postgresql":
            await _ensure_database(self.engine)
        async with self.engine.begin() as conn:
            await conn.run_sync(SQLModel.metadata.create_all, tables=list(self.tables))
            await conn.run_sync(_add_new_columns, self.tables)
            for backfill in self.backfills:
                await conn.execute(backfill())

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self, cause: Envelope | None = None) -> AsyncIterator[UnitOfWork]:
        """A write transaction; emitted messages go to the outbox in the same commit."""
        async with (
            self._write_lock,
            AsyncSession(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            uow = UnitOfWork(session=session, cause=cause)
            yield uow
            await uow._write_outbox()
        for callback in self.on_commit:
            callback(uow)
        for action in uow.after_commit:
            action()

    async def grouped(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        """Run `work(uow)` in a transaction shared with every other `grouped` call waiting at
        that moment (group commit), and return its result once that transaction has committed.
        If one work of a group raises, the group is rolled back and each of its works runs
        again in a transaction of its own, so a failure reaches only its own caller; a work
        that fails transiently is run again (`_commit_alone`). A work must therefore keep its
        effects to the unit of work (state, emits, after-commit)."""
        return await self.queue_grouped(work)

    def queue_grouped(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> asyncio.Future[T]:
        """`grouped`, queued at once and awaited later: works commit in the order they were
        queued, so whatever is queued after this one commits with it or after it."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._group.append((work, done))
        if self._grouper is None or self._grouper.done():
            self._grouper = asyncio.create_task(self._commit_groups(), name="store-group-commit")
        return asyncio.shield(done)

    async def _commit_groups(self) -> None:
        group: list[tuple[Callable[[UnitOfWork], Awaitable[Any]], asyncio.Future[Any]]] = []
        try:
            while self._group:
                group, self._group = self._group, []
                if len(group) > 1:
                    try:
                        async with self.transaction() as uow:
                            results = [await work(uow) for work, _ in group]
                    except Exception as exc:
                        log.warning("a group of %d transactions failed (%r); committing them "
                                    "one by one", len(group), exc)
                    else:
                        for (_, done), result in zip(group, results, strict=True):
                            if not done.done():
                                done.set_result(result)
                        continue
                for work, done in group:
                    await self._commit_alone(work, done)
        finally:  # cancelled (the service stops): nobody may wait forever
            left, self._group = [*group, *self._group], []
            for _, done in left:
                if not done.done():
                    done.set_exception(RuntimeError("store closed before the commit"))

    async def _commit_alone(self, work: Callable[[UnitOfWork], Awaitable[Any]],
                            done: asyncio.Future[Any]) -> None:
        """Commit one work, retrying it while the database fails in a way that may pass (see
        `transient`) for up to `COMMIT_PATIENCE` seconds; the works queued behind it wait, so
        they still commit in order."""
        deadline, pause = time.monotonic() + COMMIT_PATIENCE, 0.05
        while True:
            try:
                async with self.transaction() as uow:
                    result = await work(uow)
            except Exception as exc:
                if transient(exc) and time.monotonic() < deadline and not done.done():
                    log.warning("a commit failed (%r); retrying in %gs", exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 2.0)
                    continue
                if not done.done():
                    done.set_exception(exc)
            else:
                if not done.done():
                    done.set_result(result)
            return

    @asynccontextmanager
    async def processing_many(
        self, envelopes: Sequence[Envelope], consumer: str
    ) -> AsyncIterator[tuple[UnitOfWork, list[int]]]:
        """One transaction for a batch, yielded with the positions `claim` found fresh in it."""
        async with self.transaction() as uow:
            fresh = await self.claim(uow, envelopes, consumer)
            yield uow, fresh

    @staticmethod
    async def claim(uow: UnitOfWork, envelopes: Sequence[Envelope], consumer: str) -> list[int]:
        """The positions of the envelopes `consumer` has not processed yet (a duplicate within
        them counts once), recorded as processed in `uow`'s transaction: one ledger read and
        one insert."""
        ids = [str(envelope.event_id) for envelope in envelopes]
        connection = await uow.connection()
        seen = set((await connection.execute(
            PROCESSED_AMONG, {"consumer": consumer, "ids": list(set(ids))})).scalars())
        fresh = []
        for position, event_id in enumerate(ids):
            if event_id not in seen:
                seen.add(event_id)
                fresh.append(position)
        if fresh:
            at = int(time.time())
            await connection.execute(RECORD_PROCESSED, [
                {"consumer": consumer, "event_id": ids[p], "recorded_at": at} for p in fresh])
        return fresh

    async def forget_processed(self, before: float, chunk: int = FORGET_CHUNK) -> int:
        """Delete the ledger's ids recorded before `before` (Unix seconds), oldest first, `chunk`
        per transaction; returns how many. A copy of a message arriving after its id is gone is
        handled again, so the retention must outlast any redelivery (they come when a consumer
        reconnects, and an outbox is republished when its service restarts)."""
        return await self.forget_rows(PROCESSED.c.recorded_at, int(before), chunk)

    async def forget_rows(self, when: Column[Any], before: Any, chunk: int = FORGET_CHUNK) -> int:
        """Delete the rows of `when`'s table whose `when` is before `before` (NULL never is),
        oldest first, `chunk` per transaction, so that writers wait one chunk at most; returns
        how many. `when` should be indexed."""
        table = when.table
        key = tuple(table.primary_key.columns)
        oldest = select(*key).where(when < before).order_by(when).limit(chunk)
        forget = delete(table).where((key[0] if len(key) == 1 else tuple_(*key)).in_(oldest))
        forgotten = 0
        while True:
            async with self.transaction() as uow:
                result = await (await uow.connection()).execute(forget)
            forgotten += result.rowcount
            if result.rowcount < chunk:
                return forgotten
            await asyncio.sleep(0)  # let waiting writers in between chunks

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """A read-only session. On SQLite its transaction is a plain (deferred) BEGIN: a snapshot
        that takes no write lock, so reads never queue behind writers or each other."""
        async with AsyncSession(self._reader, expire_on_commit=False) as session:
            yield session

    async def next_timer(self) -> TimerRow | None:
        async with self.reading() as session:
            return (await session.exec(select(TimerRow).order_by(TimerRow.due_at).limit(1))).first()


COMMIT_PATIENCE = 30.0  # seconds a grouped work is retried while the database fails transiently


# SQLite's failures that may pass (sqlite3 raises OperationalError for a bad statement too)
SQLITE_TRANSIENT = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR,
                    sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN}


def transient(exc: BaseException) -> bool:
    """A database failure that may pass on its own: SQLite busy beyond its time-out, an I/O
    error, a full disk; a lost connection, or another backend's operational error (a deadlock,
    a failover). Not a constraint violated, nor a bad statement."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(getattr(exc, "orig", None), sqlite3.Error):
        return getattr(exc.orig, "sqlite_errorcode", 0) & 0xFF in SQLITE_TRANSIENT  # type: ignore[attr-defined]
    return isinstance(exc, OperationalError)


READ_ONLY = "runner_read_only"  # execution option of `Store.reading` sessions


BUSY_TIMEOUT = 30.0  # seconds a statement may wait for another writer's lock before failing


class _RunNow:
    """Stands in for the queue to aiosqlite's thread (which SQLAlchemy's dialect also uses
    directly): what is put in runs at once, and its future gets the outcome."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:
            if future is not None:
                future.set_exception(exc)
        else:
            if future is not None:
                future.set_result(result)


class _InlineSqlite(aiosqlite.Connection):
    """aiosqlite's connection with every call run at once on the event loop, not handed to a
    thread of its own. A service's statements take microseconds; the hand-over costs two
    cross-thread wake-ups per statement (in an A/B probe, 300 starts twice each way, the
    services used 61 ms of CPU per start this way and 73 ms with the thread). A statement
    refused because another connection holds the write lock (`SQLITE_BUSY`: it did nothing) is
    retried after an `asyncio.sleep`, so the loop never blocks waiting for a lock, not even for
    one held by another store in this process. Long reads (replay, audit) use aiosqlite's thread
    (`EventLog.at(..., must_exist=True)`), which fetches while the caller folds."""

    def __init__(self, connector: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._tx = _RunNow()  # type: ignore[assignment]

    def __await__(self) -> Generator[Any, None, aiosqlite.Connection]:
        return self._connect().__await__()  # no thread to start

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._connection is None:
            raise ValueError("Connection closed")
        deadline, pause = time.monotonic() + BUSY_TIMEOUT, 0.001
        while True:
            try:
                return fn(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or (
                    time.monotonic() > deadline
                ):
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)


def _inline_sqlite(database: str) -> Callable[[], _InlineSqlite]:
    """An `async_creator` for SQLAlchemy's aiosqlite dialect (it awaits what it returns). Busy
    time-out 0: a busy statement is retried by `_InlineSqlite`, never waited for in sqlite3."""
    return lambda: _InlineSqlite(lambda: sqlite3.connect(database, timeout=0))


def _engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, async_creator=_inline_sqlite(path or ":memory:"))

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Connection) -> None:
            read_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_async_engine(url, pool_pre_ping=True)


async def _ensure_database(engine: AsyncEngine) -> None:
    """PostgreSQL: create the engine's database if it does not exist (first start of a service,
    or a worker-host with a new id). Connects to the server's `postgres` database to do so."""
    try:
        async with engine.connect():
            return
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != "3D000":  # invalid_catalog_name
            raise
    name = engine.url.database
    server = create_async_engine(engine.url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with server.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote(name)
            try:
                await conn.execute(text(f"CREATE DATABASE {quoted}"))
                log.info("created database %s", name)
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) != "42P04":  # created meanwhile
                    raise
    except DBAPIError as exc:
        raise RuntimeError(
            f"database {name!r} does not exist and could not be created "
            f"(create it, or grant CREATEDB): {exc.orig}"
        ) from exc
    finally:
        await server.dispose()


class OutboxRelay:
    """Publishes committed outbox rows in commit order, with confirms, then deletes them.

    Each commit hands its rows over in memory (no polling, no re-read); rows an earlier run left
    unconfirmed are loaded at start. Confirmed rows are deleted in batches, off the hot path.
    Guarantee: every committed message is published at least once, in commit order per service.
    """

    def __init__(self, store: Store, bus: Bus, batch: int = 500, delete_every: float = 0.5) -> None:
        self.store = store
        self.bus = bus
        self.batch = batch
        self.delete_every = delete_every
        self._pending: deque[tuple[int, Envelope]] = deque()
        self._confirmed: list[int] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        store.on_commit.append(self._committed)

    def _committed(self, uow: UnitOfWork) -> None:
        if uow.outbox_ids:
            self._pending.extend(zip(uow.outbox_ids, uow.emitted, strict=True))
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        """Publish what is committed (best effort, a few seconds), then stop. Whatever is not
        confirmed by then stays in the outbox for the next start."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        # not wait_for: a publish interrupted by cancellation can surface as a retryable error
        # and swallow the cancel, so the loop is asked to end, and only abandoned if it won't
        done, _ = await asyncio.wait({self._task}, timeout=5)
        if not done:
            log.warning("outbox not drained on stop (kept for next start)")
            self._task.cancel()
        with contextlib.suppress(Exception):
            await self._delete_confirmed()

    async def flush(self) -> int:
        """Publish every pending row now, in order; returns how many were published."""
        sent = 0
        while self._pending:
            batch = [self._pending.popleft() for _ in range(min(self.batch, len(self._pending)))]
            try:
                await self.bus.publish_many(envelope for _, envelope in batch)
            except BaseException:
                self._pending.extendleft(reversed(batch))
                raise
            self._confirmed.extend(row_id for row_id, _ in batch)
            metrics.outbox_confirmed(self.bus.service, [e.occurred_at for _, e in batch])
            sent += len(batch)
        return sent

    async def _load_leftovers(self) -> None:
        """Rows committed by an earlier run but never confirmed go first."""
        async with self.store.reading() as session:
            rows = (await session.exec(select(OutboxRow).order_by(OutboxRow.id))).all()
        known = {row_id for row_id, _ in self._pending}
        leftovers = [
            (r.id, Envelope.model_validate_json(r.envelope)) for r in rows if r.id not in known
        ]
        self._pending.extendleft(reversed(leftovers))
        if leftovers:
            log.info("outbox: %d messages from an earlier run to publish", len(leftovers))

    async def _delete_confirmed(self) -> None:
        # exactly the rows confirmed: on PostgreSQL ids are taken at insert, not at commit, so a
        # lower id can still be committing elsewhere and must not be deleted unsent
        while self._confirmed:
            chunk, self._confirmed = self._confirmed[: self.batch], self._confirmed[self.batch :]
            async with self.store.transaction() as uow:
                await uow.session.exec(delete(OutboxRow).where(OutboxRow.id.in_(chunk)))  # type: ignore[union-attr]

    async def _run(self) -> None:
        await self._load_leftovers()
        loop = asyncio.get_running_loop()
        backoff, last_delete = 0.1, loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.delete_every)
            self._wake.clear()
            try:
                await self.flush()
                if self._stopping:
                    return
                backoff = 0.1
                if self._confirmed and (len(self._confirmed) >= self.batch
                                        or loop.time() - last_delete >= self.delete_every):
                    await self._delete_confirmed()
                    last_delete = loop.time()
            except (PublishFailed, OSError) as exc:
                if self._stopping:
                    return
                log.warning("outbox: publish failed, retrying in %.1fs: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wake.set()
            except Exception:
                log.exception("outbox relay error")
                await asyncio.sleep(1.0)
                self._wake.set()
