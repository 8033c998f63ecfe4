"""The append-only event log: every command and event, in one global order, hash-chained.

- A row keeps the envelope JSON as received (validated, so it always parses back) and
  `hash = sha256(prev_hash + canonical_json(envelope_json))` (sorted keys, no whitespace):
  editing, reordering or deleting a row breaks the chain at that row (`verify`); a cut tail or
  rewritten later hashes show only against a head hash kept elsewhere (`head()`).
- One writer: `append` takes the batch's positions from the head inside its transaction
  (`BEGIN IMMEDIATE` on SQLite, an advisory lock on PostgreSQL), so positions are contiguous.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.schema import Table

from events import Envelope, model_for
from services.database import Database, DbConnection

GENESIS = "0" * 64
_ID_CHUNK = 500  # event ids per IN (...) lookup, far below every backend's parameter limit
_ADVISORY_KEY = int.from_bytes(hashlib.sha256(b"event_log").digest()[:8], "big", signed=True)

metadata = MetaData()

event_log = Table(
    "event_log",
    metadata,
    # On SQLite an INTEGER primary key is the rowid: the table itself is ordered by position,
    # so a page of the log is one range of the table (no separate position index to look up
    # first, nor to keep up on append).
    Column("position", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=False),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("type", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("stream", String(200), nullable=False),
    Column("user_id", String(200)),
    Column("correlation_id", String(200)),
    Column("causation_id", String(36)),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("envelope", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_event_log_stream", "stream"),
    Index("ix_event_log_user_id", "user_id"),
    Index("ix_event_log_type", "type"),
    Index("ix_event_log_occurred_at", "occurred_at"),
)


class EventLogMissing(LookupError):
    """The database (or its event_log table) does not exist."""


@dataclass(frozen=True, slots=True)
class Head:
    position: int
    hash: str


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first row whose chain does not hold, and why."""

    position: int
    event_id: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.position} (event_id {self.event_id}): {self.reason}"


# What comes before a float below 1e-4 as orjson writes it (`1e-7`, `0.00001`): from the start
# of its number token (the text's start, or after `:`, `,` or `[`) to its `e-` or its `0.0000`.
# A string may match too, which costs only the slower path.
_BEFORE_SMALL_FLOAT = {b"e-": re.compile(rb"(?:^|[:,\[])-?\d+(?:\.\d+)?\Z"),
                       b"0.0000": re.compile(rb"(?:^|[:,\[])-?\Z")}


def _loads(text: str) -> Any:
    """`json.loads` through orjson (which reads integers beyond 64 bits as floats), or `json`
    for what orjson refuses (NaN, lone surrogates)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _small_float_in(text: bytes) -> bool:
    """Whether orjson's `text` may hold a float below 1e-4: only the few characters before each
    `e-` or `0.0000` are matched (UUIDs hold many an `e-`), since no number orjson writes is
    longer than 24."""
    for mark, before in _BEFORE_SMALL_FLOAT.items():
        at = text.find(mark)
        while at != -1:
            if before.search(text, max(at - 32, 0), at):
                return True
            at = text.find(mark, at + 1)
    return False


def canonical_json(envelope_json: str) -> bytes:
    """`json.dumps(_loads(envelope_json), sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)` in UTF-8, the form every hash of the chain is over. orjson writes the
    same bytes, faster, but for floats below 1e-4 (`0.00001` against `1e-05`), which
    `_small_float_in` finds in its output, and what it cannot write: `json` writes those."""
    value = _loads(envelope_json)
    try:
        fast = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        if not _small_float_in(fast):
            return fast
    except orjson.JSONEncodeError:
        pass
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, envelope_json: str) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical_json(envelope_json)).hexdigest()


@dataclass(frozen=True, slots=True)
class Page:
    """A page of the log: its rows (position, type, envelope JSON) in order, only those of the
    types asked for, and how many rows of other types lie among them (`skipped`), up to `last`,
    the position the page ends at."""

    rows: list[tuple[int, str, str]]
    skipped: int
    last: int


def _sqlite_page(path: str, after: int, limit: int, until: int | None,
                 types: Collection[str] | None) -> Page:
    """A page of the log read with the stdlib driver, without SQLAlchemy's row layer, read-only
    (WAL: a consistent snapshot while the monitor writes). Rows of the other types are only
    counted (`+type`: the scan stays in position order, off the type index)."""
    bound = [after, until if until is not None else 2**63 - 1]
    only = "" if types is None else f" AND +type IN ({','.join('?' * len(types))})"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT position, type, envelope FROM event_log WHERE position > ? AND position <= ?"
            f"{only} ORDER BY position LIMIT ?", [*bound, *(types or ()), limit],
        ).fetchall()
        if len(rows) == limit:
            bound[1] = rows[-1][0]
        count, last = conn.execute(
            "SELECT count(*), max(position) FROM event_log WHERE position > ? AND position <= ?",
            bound).fetchone()
    return Page(rows, count - len(rows), last or after)


SEALED = "credentials_sealed"  # the payload field holding a user's sealed credentials
SEALED_REFERENCE = "sha256:"


def withheld(envelope: Envelope) -> Envelope:
    """The envelope as the log keeps it: sealed credentials replaced by a reference to them (the
    blob's digest, which the scheduler's store can be matched against), so a leaked sealing key
    opens nothing in the log or its backups. The blob itself lives in the scheduler's and the
    worker-host's stores, and goes with the job's retention."""
    sealed = envelope.payload.get(SEALED)
    if not isinstance(sealed, str) or sealed.startswith(SEALED_REFERENCE):
        return envelope
    reference = SEALED_REFERENCE + hashlib.sha256(sealed.encode()).hexdigest()
    return envelope.model_copy(update={"payload": {**envelope.payload, SEALED: reference}})


def _utc(moment: datetime) -> datetime:
    """Stored as UTC; SQLite drops the offset, so normalise before writing or comparing."""
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


_COLUMNS = tuple(column.name for column in event_log.columns)
_SQLITE_INSERT = (f"INSERT INTO event_log ({', '.join(_COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(_COLUMNS))})")
_SQLITE_EXISTING = ("SELECT event_id FROM event_log"
                    " WHERE event_id IN (SELECT value FROM json_each(?))")


async def _insert(conn: DbConnection, rows: list[tuple[Any, ...]]) -> None:
    """Insert `rows` (values in `event_log`'s column order, one `recorded_at`). On SQLite
    through the driver's own `executemany`, each time bound as SQLAlchemy binds it, without
    SQLAlchemy's per-row parameter processing."""
    if conn.dialect.name != "sqlite":
        await conn.execute(event_log.insert(),
                           [dict(zip(_COLUMNS, row, strict=True)) for row in rows])
        return
    stamp = event_log.c.recorded_at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
    assert stamp is not None  # SQLite stores a time as text
    recorded_at = stamp(rows[0][10])  # one time for the whole batch
    values = [(*row[:9], stamp(row[9]), recorded_at, *row[11:]) for row in rows]
    await conn.run_sync(lambda sync: sync.exec_driver_sql(_SQLITE_INSERT, values))


class EventLog:
    """The log on a `Database` (shared with the owner's Store, or its own)."""

    def __init__(self, engine: Database) -> None:
        self.engine = engine
        self.sqlite_file = engine.sqlite_file  # other processes can read that file too
        self._append_lock = asyncio.Lock()
        self._owns_engine = False

    @classmethod
    def at(cls, url: str, *, must_exist: bool = False) -> EventLog:
        """A log on its own engine. `must_exist`: for readers (replay, audit) that must not create
        an empty database where there is none; raises `EventLogMissing`."""
        if must_exist and url.startswith("sqlite"):
            database = make_url(url).database
            if not database or database == ":memory:" or not Path(database).is_file():
                raise EventLogMissing(f"no event log database at {database or url}")
        log = cls(Database(url))
        log._owns_engine = True
        return log

    async def open(self) -> None:
        """Create the table and its indexes if missing."""
        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def ensure_exists(self) -> None:
        """Raise `EventLogMissing` unless the event_log table is there (for readers)."""
        async with self.engine.connect() as conn:
            present = await conn.run_sync(lambda sync: inspect(sync).has_table("event_log"))
        if not present:
            raise EventLogMissing("the database has no event_log table")

    async def close(self) -> None:
        if self._owns_engine:
            await self.engine.dispose()

    # ------------------------------------------------------------------ writing

    async def append(self, envelopes: Sequence[Envelope]) -> list[tuple[int, Envelope]]:
        """Record `envelopes` in order in one transaction; returns the newly recorded ones with
        their positions. An `event_id` already in the log (or earlier in the batch) is skipped,
        so a redelivered message is recorded once. Telemetry is never recorded."""
        batch: dict[str, Envelope] = {}
        for envelope in envelopes:
            if model_for(envelope.type).kind != "telemetry":
                batch.setdefault(str(envelope.event_id), envelope)
        if not batch:
            return []
        async with self._append_lock, self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_KEY})
            for present in await self._existing(conn, list(batch)):
                del batch[present]
            if not batch:
                return []
            head = await self._head(conn)
            position, prev = head.position, head.hash
            recorded_at = datetime.now(UTC)
            rows: list[tuple[Any, ...]] = []
            recorded: list[tuple[int, Envelope]] = []
            for event_id, envelope in batch.items():
                position += 1
                body = withheld(envelope).model_dump_json()
                digest = chain_hash(prev, body)
                rows.append((
                    position, event_id, envelope.type, envelope.version,
                    model_for(envelope.type).kind,  # known: checked above
                    envelope.stream, envelope.user_id, envelope.correlation_id,
                    str(envelope.causation_id) if envelope.causation_id else None,
                    _utc(envelope.occurred_at), recorded_at, body, prev, digest,
                ))
                recorded.append((position, envelope))
                prev = digest
            await _insert(conn, rows)
        return recorded

    @staticmethod
    async def _existing(conn: DbConnection, event_ids: list[str]) -> set[str]:
        """The ones of `event_ids` already in the log; on SQLite in one statement, the ids
        passed as one JSON array."""
        if conn.dialect.name == "sqlite":
            ids = orjson.dumps(event_ids).decode()
            return await conn.run_sync(
                lambda sync: set(sync.exec_driver_sql(_SQLITE_EXISTING, (ids,)).scalars()))
        found: set[str] = set()
        for start in range(0, len(event_ids), _ID_CHUNK):
            chunk = event_ids[start : start + _ID_CHUNK]
            result = await conn.execute(
                select(event_log.c.event_id).where(event_log.c.event_id.in_(chunk))
            )
            found.update(result.scalars())
        return found

    @staticmethod
    async def _head(conn: DbConnection) -> Head:
        row = (
            await conn.execute(
                select(event_log.c.position, event_log.c.hash)
                .order_by(event_log.c.position.desc())
                .limit(1)
            )
        ).first()
        return Head(row.position, row.hash) if row else Head(0, GENESIS)

    # ------------------------------------------------------------------ reading

    async def head(self) -> Head:
        """The last recorded position and its hash (`Head(0, GENESIS)` when empty)."""
        async with self.engine.connect() as conn:
            return await self._head(conn)

    async def hash_at(self, position: int) -> str | None:
        """The chain hash of the row at `position` (None if the log has no such row)."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(event_log.c.hash).where(event_log.c.position == position))
            return result.scalar_one_or_none()

    async def count(self, until_position: int | None = None) -> int:
        """The rows in the log (up to `until_position`)."""
        # All rows less those after the bound, in one statement (one snapshot): an unbounded
        # count reads the smallest index and those after are a short range at the end, while a
        # bounded count would read the whole table.
        query = select(func.count()).select_from(event_log)
        if until_position is not None:
            query = select(query.scalar_subquery() - select(func.count()).where(
                event_log.c.position > until_position).scalar_subquery())
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def page(self, after_position: int = 0, limit: int = 1000,
                   until_position: int | None = None,
                   until_time: datetime | None = None) -> list[tuple[int, str]]:
        """Up to `limit` rows after `after_position` as (position, envelope JSON), in order."""
        page = await self._page(after_position, limit, until_position, until_time, None)
        return [(position, body) for position, _, body in page.rows]

    async def _page(self, after_position: int, limit: int, until_position: int | None,
                    until_time: datetime | None, types: Collection[str] | None) -> Page:
        """Keyset paging: each page is its own short read, so a long replay never holds the
        database (on SQLite every transaction of a shared engine takes the write lock)."""
        if until_time is None and self.sqlite_file is not None:
            # the bulk of a replay: skip SQLAlchemy's row layer
            return await asyncio.to_thread(
                _sqlite_page, self.sqlite_file, after_position, limit, until_position, types)
        bounds = [event_log.c.position > after_position]
        if until_position is not None:
            bounds.append(event_log.c.position <= until_position)
        if until_time is not None:
            bounds.append(event_log.c.occurred_at <= _utc(until_time))
        query = (select(event_log.c.position, event_log.c.type, event_log.c.envelope)
                 .where(*bounds).order_by(event_log.c.position).limit(limit))
        if types is not None:
            query = query.where(event_log.c.type.in_(types))
        async with self.engine.connect() as conn:
            rows: list[tuple[int, str, str]] = [tuple(row) for row in await conn.execute(query)]  # type: ignore[misc]
            if len(rows) == limit:
                bounds.append(event_log.c.position <= rows[-1][0])
            count, last = (await conn.execute(
                select(func.count(), func.max(event_log.c.position)).where(*bounds))).one()
        return Page(rows, count - len(rows), last or after_position)

    async def pages(self, after_position: int = 0, until_position: int | None = None,
                    until_time: datetime | None = None, batch: int = 5000,
                    types: Collection[str] | None = None) -> AsyncIterator[Page]:
        """The log after `after_position` in order, in pages of up to `batch` rows, up to the
        head it has when they start (or `until_position`); with `types`, rows of other types
        are only counted (`Page.skipped`). The next page is fetched while the caller works on
        this one."""
        head = (await self.head()).position
        until_position = head if until_position is None else min(until_position, head)

        def fetch(after: int) -> asyncio.Future[Page]:
            return asyncio.ensure_future(
                self._page(after, batch, until_position, until_time, types))

        ahead = fetch(after_position)
        try:
            while True:
                page = await ahead
                full = len(page.rows) == batch
                if full:
                    ahead = fetch(page.last)
                if page.rows or page.skipped:
                    yield page
                if not full:
                    return
        finally:
            if not ahead.done():
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ahead

    async def read(self, after_position: int = 0, until_position: int | None = None,
                   until_time: datetime | None = None,
                   batch: int = 1000) -> AsyncIterator[tuple[int, Envelope]]:
        """Every recorded envelope after `after_position`, in log order, fetched `batch` rows at
        a time. `until_time` keeps the events that had occurred by then (the clocks of different
        services may disagree slightly, so this filters rather than stopping at the first later
        one)."""
        async for page in self.pages(after_position, until_position, until_time, batch):
            for position, _, body in page.rows:
                yield position, Envelope.from_json(body)

    async def verify(self, until_position: int | None = None,
                     batch: int = 5000) -> ChainBreak | None:
        """Walk the chain from the first row; the first row that breaks it, or None if intact."""
        prev, expected = GENESIS, 1
        columns = (event_log.c.position, event_log.c.event_id, event_log.c.envelope,
                   event_log.c.prev_hash, event_log.c.hash)
        while True:
            query = (select(*columns).where(event_log.c.position >= expected)
                     .order_by(event_log.c.position).limit(batch))
            if until_position is not None:
                query = query.where(event_log.c.position <= until_position)
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
            for row in rows:
                if row.position != expected:
                    return ChainBreak(row.position, row.event_id,
                                      f"position gap: row {expected} is missing")
                if row.prev_hash != prev:
                    return ChainBreak(row.position, row.event_id,
                                      "prev_hash does not match the previous row's hash")
                try:
                    digest = chain_hash(prev, row.envelope)
                    envelope_id = _loads(row.envelope).get("event_id")
                except (ValueError, AttributeError):
                    return ChainBreak(row.position, row.event_id, "envelope is not a JSON object")
                if digest != row.hash:
                    return ChainBreak(row.position, row.event_id, "hash mismatch")
                if envelope_id != row.event_id:
                    return ChainBreak(row.position, row.event_id,
                                      "event_id column differs from the envelope")
                prev, expected = row.hash, expected + 1
            if len(rows) < batch:
                return None
