"""Each service's own database: its state, its processed-message ledger, its outbox, its timers.

Exactly-once effect on top of at-least-once delivery: a handler's state change, its outgoing
messages (`outbox`) and the message's id (`processed`) commit in one transaction
(`Store.processing_many`), so a redelivery is skipped; `OutboxRelay` publishes the outbox after
the commit, so a crash in between loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Column, String, Text, bindparam, delete, insert, inspect, text, tuple_
from sqlalchemy.engine import Connection, Result
from sqlalchemy.schema import Table
from sqlalchemy.sql import Executable
from sqlmodel import Field, SQLModel, select

from events import Envelope, Message
from services import metrics
from services.bus import BusUnavailable, Publisher, PublishFailed
from services.database import Database, DbConnection, UtcDateTime, transient
from services.decision import CancelTimer, SetTimer, Timer

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["Database", "OutboxRelay", "Store", "UnitOfWork", "UtcDateTime", "transient"]


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
TIMERS: Table = TimerRow.__table__  # type: ignore[attr-defined]
PROCESSED_AMONG = select(PROCESSED.c.event_id).where(
    PROCESSED.c.consumer == bindparam("consumer"),
    PROCESSED.c.event_id.in_(bindparam("ids", expanding=True)),
)
RECORD_PROCESSED = insert(PROCESSED)
WRITE_OUTBOX = insert(OUTBOX).returning(OUTBOX.c.id, sort_by_parameter_order=True)
NEXT_TIMER = select(TIMERS).order_by(TIMERS.c.due_at).limit(1)
FORGET_CHUNK = 5_000  # rows deleted per transaction: other writers wait that long at most
OUTAGE_RECHECK = 5.0  # seconds the outbox waits for the bus before looking again (or stopping)
COMMIT_PATIENCE = 30.0  # seconds a grouped work is retried while the database fails transiently

BASE_TABLES: tuple[Table, ...] = (PROCESSED, OUTBOX, TIMERS)


@dataclass
class UnitOfWork:
    """One write transaction: its connection, and the messages it will emit on commit."""

    connection: DbConnection
    cause: Envelope | None = None
    emitted: list[Envelope] = field(default_factory=list)
    outbox_ids: list[int] = field(default_factory=list)  # of `emitted`, once written
    timers_changed: bool = False
    after_commit: list[Callable[[], Any]] = field(default_factory=list)

    async def execute(self, statement: Executable, parameters: Any = None) -> Result[Any]:
        return await self.connection.execute(statement, parameters)

    def emit(
        self,
        message: Message,
        *,
        stream: str,
        user_id: str | None = None,
        correlation_id: str | None = None,
    ) -> Envelope:
        """Queue `message` for publishing once this transaction commits."""
        envelope = Envelope.wrap(message, stream=stream, user_id=user_id,
                                 correlation_id=correlation_id, causation=self.cause)
        self.emitted.append(envelope)
        return envelope

    async def apply(self, timers: Iterable[Timer]) -> None:
        """Set and cancel durable timers, as a decision asked."""
        for timer in timers:
            await self.execute(delete(TIMERS).where(TIMERS.c.key == timer.key))
            if isinstance(timer, SetTimer):
                await self.execute(insert(TIMERS).values(
                    key=timer.key, kind=timer.kind, due_at=timer.due_at,
                    data=json.dumps(dict(timer.data), default=str)))
            self.timers_changed = True

    async def set_timer(self, key: str, kind: str, due_at: datetime, /, **data: Any) -> None:
        await self.apply([SetTimer(key, kind, due_at, data)])

    async def cancel_timer(self, key: str) -> None:
        await self.apply([CancelTimer(key)])

    async def lock(self, name: str) -> None:
        """Serialise decisions about `name` (e.g. one user's quota) across processes. On SQLite
        the transaction's `BEGIN IMMEDIATE` holds the database's single write lock already."""
        if self.connection.dialect.name == "postgresql":
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            await self.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    async def _write_outbox(self) -> None:
        """The outbox rows of what was emitted, in one insert, ids in emit order."""
        if self.emitted:
            result = await self.execute(
                WRITE_OUTBOX, [{"envelope": envelope.model_dump_json()}
                               for envelope in self.emitted])
            self.outbox_ids = list(result.scalars())


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
    return (PROCESSED.update().where(PROCESSED.c.recorded_at.is_(None))
            .values(recorded_at=int(time.time())))


Work = Callable[[UnitOfWork], Awaitable[Any]]


class Store:
    """A service's database (see module doc)."""

    def __init__(self, url: str, tables: Sequence[Table] = (),
                 backfills: Sequence[Backfill] = ()) -> None:
        self.url = url
        self.db = Database(url)
        self.tables = (*BASE_TABLES, *tables)
        self.backfills = (_time_untimed_ids, *backfills)
        self._write_lock = asyncio.Lock()
        self._group: list[tuple[Work, asyncio.Future[Any]]] = []
        self._grouper: asyncio.Task[None] | None = None
        self.on_commit: list[Callable[[UnitOfWork], Any]] = []  # run after each commit

    async def open(self) -> None:
        """Create what is missing of the schema; replicas opening at once (two gateways) take
        turns, as each checks before it creates."""
        await self.db.ensure_exists()
        async with self.db.begin() as conn:
            await UnitOfWork(conn).lock("schema")
            await conn.run_sync(SQLModel.metadata.create_all, list(self.tables))
            await conn.run_sync(_add_new_columns, self.tables)
            for backfill in self.backfills:
                await conn.execute(backfill())

    async def close(self) -> None:
        await self.db.dispose()

    @asynccontextmanager
    async def transaction(self, cause: Envelope | None = None) -> AsyncIterator[UnitOfWork]:
        """A write transaction; emitted messages go to the outbox in the same commit."""
        async with self._write_lock, self.db.begin() as connection:
            uow = UnitOfWork(connection, cause=cause)
            yield uow
            await uow._write_outbox()
        for callback in self.on_commit:
            callback(uow)
        for action in uow.after_commit:
            action()

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[DbConnection]:
        """A read-only transaction (on SQLite a snapshot that takes no lock)."""
        async with self.db.connect() as connection:
            yield connection

    @property
    def busy(self) -> bool:
        """Whether grouped works wait to be committed."""
        return bool(self._group) or (self._grouper is not None and not self._grouper.done())

    async def grouped(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        """Run `work(uow)` in one transaction with every other `grouped` call waiting at that
        moment (group commit), and return its result once committed. If one work raises, each
        work of the group runs again alone (`_commit_alone`, which also retries a transient
        failure), so a failure reaches only its own caller; a work must keep its effects to the
        unit of work."""
        return await self.queue_grouped(work)

    def queue_grouped(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> asyncio.Future[T]:
        """`grouped`, queued at once and awaited later: works commit in the order queued."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._group.append((work, done))
        if self._grouper is None or self._grouper.done():
            self._grouper = asyncio.create_task(self._commit_groups(), name="store-group-commit")
        return asyncio.shield(done)

    async def _commit_groups(self) -> None:
        group: list[tuple[Work, asyncio.Future[Any]]] = []
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

    async def _commit_alone(self, work: Work, done: asyncio.Future[Any]) -> None:
        """Commit one work, retrying it while the database fails in a way that may pass (see
        `transient`) for up to `COMMIT_PATIENCE` seconds; the works queued behind it wait."""
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

    async def claim(self, uow: UnitOfWork, envelopes: Sequence[Envelope],
                    consumer: str) -> list[int]:
        """The positions of the envelopes `consumer` has not processed yet (a duplicate within
        them counts once), recorded as processed in `uow`'s transaction."""
        ids = [str(envelope.event_id) for envelope in envelopes]
        seen = set((await uow.execute(
            PROCESSED_AMONG, {"consumer": consumer, "ids": list(set(ids))})).scalars())
        fresh = []
        for position, event_id in enumerate(ids):
            if event_id not in seen:
                seen.add(event_id)
                fresh.append(position)
        if fresh:
            at = int(time.time())
            await uow.execute(RECORD_PROCESSED, [
                {"consumer": consumer, "event_id": ids[p], "recorded_at": at} for p in fresh])
        return fresh

    async def forget_processed(self, before: float, chunk: int = FORGET_CHUNK) -> int:
        """Delete the ledger's ids recorded before `before` (Unix seconds), oldest first; returns
        how many. A copy arriving after its id is gone is handled again, so the retention must
        outlast any redelivery."""
        return await self.forget_rows(PROCESSED.c.recorded_at, int(before), chunk)

    async def forget_rows(self, when: Column[Any], before: Any, chunk: int = FORGET_CHUNK) -> int:
        """Delete the rows of `when`'s table whose `when` is before `before` (NULL never is),
        oldest first, `chunk` per transaction; returns how many. `when` should be indexed."""
        table = when.table
        key = tuple(table.primary_key.columns)
        oldest = select(*key).where(when < before).order_by(when).limit(chunk)
        forget = delete(table).where((key[0] if len(key) == 1 else tuple_(*key)).in_(oldest))
        forgotten = 0
        while True:
            async with self.transaction() as uow:
                result = await uow.execute(forget)
            forgotten += result.rowcount  # type: ignore[attr-defined]
            if result.rowcount < chunk:  # type: ignore[attr-defined]
                return forgotten
            await asyncio.sleep(0)  # let waiting writers in between chunks

    async def next_timer(self) -> Any:
        """The timer due first (a row of `timers`), or None."""
        async with self.reading() as connection:
            return (await connection.execute(NEXT_TIMER)).first()

    async def take_timer(self, uow: UnitOfWork, key: str, now: datetime) -> Any:
        """The timer `key` if it is due at `now`, deleted in `uow`; None otherwise. The row is
        locked as it is read, so of two replicas firing it at once the second finds it gone."""
        row = (await uow.execute(
            select(TIMERS).where(TIMERS.c.key == key).with_for_update())).first()
        if row is None or row.due_at > now:
            return None
        await uow.execute(delete(TIMERS).where(TIMERS.c.key == key))
        return row


class OutboxRelay:
    """Publishes committed outbox rows with confirms, then deletes them: every committed
    message is published at least once, in commit order per service. Each commit hands its rows
    over in memory; rows an earlier run left unconfirmed are loaded at start and go first."""

    def __init__(self, store: Store, bus: Publisher, batch: int = 500,
                 delete_every: float = 0.5) -> None:
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

    @property
    def lag(self) -> int:
        """Committed messages not yet confirmed by the broker."""
        return len(self._pending)

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
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
        async with self.store.reading() as connection:
            rows = (await connection.execute(select(OUTBOX).order_by(OUTBOX.c.id))).all()
        known = {row_id for row_id, _ in self._pending}
        leftovers = [(r.id, Envelope.model_validate_json(r.envelope))
                     for r in rows if r.id not in known]
        self._pending.extendleft(reversed(leftovers))
        if leftovers:
            log.info("outbox: %d messages from an earlier run to publish", len(leftovers))

    async def _delete_confirmed(self) -> None:
        # exactly the rows confirmed: on PostgreSQL ids are taken at insert, not at commit, so a
        # lower id can still be committing elsewhere and must not be deleted unsent
        while self._confirmed:
            chunk, self._confirmed = self._confirmed[: self.batch], self._confirmed[self.batch :]
            async with self.store.transaction() as uow:
                await uow.execute(delete(OUTBOX).where(OUTBOX.c.id.in_(chunk)))

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
            except BusUnavailable:  # the bus has logged the outage: publish once it is back
                if self._stopping:
                    return
                await self.bus.until_connected(OUTAGE_RECHECK)
                self._wake.set()
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
