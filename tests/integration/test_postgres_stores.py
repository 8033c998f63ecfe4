"""Every service's store on both backends: SQLite (the default) and PostgreSQL.

Each test runs once per backend. The PostgreSQL variant gets fresh databases (one per service,
`t_<id>_<service>`, created by `Store.open` itself and dropped afterwards), so it also proves
that a service creates its database at first start. It is skipped, saying why, only when no
PostgreSQL answers at `TEST_POSTGRES_DSN` [postgresql://root@127.0.0.1:5432/postgres];
`.ci/run` starts the local one.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
import sqlalchemy
from pydantic import ValidationError
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, StatementError

import services.database
from events import (
    CrashReason,
    Envelope,
    JobQueued,
    StartRunner,
    StrategyConfig,
    UpgradeEntitlement,
    WorkerCrashed,
)
from events.queries import DecideStart
from events.routing import EVENTS_EXCHANGE
from services.bus import AmqpBus
from services.entitlement.rows import PLANS, SLOTS
from services.entitlement.service import EntitlementService
from services.gateway.users import USERS, UserRow
from services.monitor.log import EventLog, EventLogMissing, event_log
from services.scheduler.rows import CIRCUITS, HOSTS, JOBS, HostRow
from services.scheduler.service import SchedulerService
from services.settings import Settings
from services.store import OUTBOX, PROCESSED, TIMERS, OutboxRelay, Store, UtcDateTime
from services.topology import ENTITLEMENT_INBOX, ENTITLEMENT_RPC
from services.worker_host.rows import LOCAL_WORKERS
from services.worker_host.service import WorkerHostService
from tests.integration.broker_helpers import until

PG_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://root@127.0.0.1:5432/postgres")
EVERY_TABLE = (
    *EntitlementService.tables,
    *SchedulerService.tables,
    *WorkerHostService.tables,
    UserRow.__table__,  # type: ignore[attr-defined]
)


@dataclass(frozen=True)
class Backend:
    name: str
    template: str  # RUNNER_DATABASE_URL: '{service}' becomes the service's name

    def url(self, service: str) -> str:
        return self.template.replace("{service}", service)

    def settings(self, base: Settings | None = None, **overrides: Any) -> Settings:
        values = {"database_url": self.template, **overrides}
        if base is None:
            return Settings(**values)
        return base.model_copy(update=values)


async def _postgres_unreachable() -> str | None:
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL not reachable at {PG_DSN} ({type(exc).__name__}: {exc})"
    await conn.close()
    return None


async def _drop_databases(prefix: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        names = await conn.fetch(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", prefix
        )
        for row in names:
            name = row["datname"].replace('"', '""')
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_postgres(tag: str = "t") -> AsyncIterator[Backend]:
    """A database-name prefix nobody uses yet; every database under it is dropped afterwards."""
    reason = await _postgres_unreachable()
    if reason:
        pytest.skip(reason)
    prefix = f"{tag}_{uuid.uuid4().hex[:10]}_"
    server = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield Backend("postgres", f"{server}/{prefix}{{service}}")
    finally:
        await _drop_databases(prefix)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path}/db/{{service}}.db")
        return
    async with fresh_postgres() as postgres:
        yield postgres


@pytest.fixture
async def postgres() -> AsyncIterator[Backend]:
    async with fresh_postgres() as backend:
        yield backend


def start_runner(user: str, job: str | None = None) -> Envelope:
    """A start as the gateway sends it (the entitlement service decides it)."""
    job = job or f"job-{uuid.uuid4().hex[:8]}"
    return Envelope.wrap(
        StartRunner(
            job_id=job,
            worker_id=f"w-{job}",
            strategy_id="hold-btc",
            broker_id="paper",
            credentials_sealed="sealed",
            config=StrategyConfig(name="hold", type="hold"),
        ),
        stream=f"job-{job}",
        user_id=user,
        correlation_id=job,
    )


async def lock_waiters(database: str) -> int:
    """How many sessions in `database` wait for a lock (a lock in pg_locks not granted)."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE NOT l.granted AND a.datname = $1", database)
    finally:
        await conn.close()


def lock_waits(backend: Backend, url: str,
               monkeypatch: pytest.MonkeyPatch) -> Callable[[], Awaitable[None]]:
    """A wait, with a deadline, until a transaction waits for a lock another holds on `url`:
    pg_locks shows it on PostgreSQL; on SQLite, its BEGIN IMMEDIATE has been refused (seen
    through `services.database.busy`, which `_begin` asks before it tries again)."""
    refused = asyncio.Event()
    if backend.name != "postgres":
        real = services.database.busy

        def busy(exc: BaseException) -> bool:
            if real(exc):
                refused.set()
                return True
            return False

        monkeypatch.setattr(services.database, "busy", busy)

    async def wait() -> None:
        if backend.name == "postgres":
            database = url.rsplit("/", 1)[1]
            await until(lambda: lock_waiters(database), 10, "a transaction waiting")
        else:
            await asyncio.wait_for(refused.wait(), 10)

    return wait


class Sink:
    """A private queue on the events exchange: what the relays published, by event_id (delivery
    is at-least-once: two relays on one database may both publish a row before either deletes
    it, and consumers dedupe by event_id, as this does)."""

    def __init__(self) -> None:
        self.by_id: dict[str, Envelope] = {}

    @property
    def received(self) -> list[Envelope]:
        return list(self.by_id.values())

    async def start(self, amqp_url: str, *routing_keys: str) -> None:
        self.connection = await aio_pika.connect(amqp_url)
        channel = await self.connection.channel()
        await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        for key in routing_keys or ("#",):
            await queue.bind(EVENTS_EXCHANGE, routing_key=key)
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        envelope = Envelope.from_json(message.body)
        self.by_id.setdefault(str(envelope.event_id), envelope)

    def of(self, type_name: str) -> list[Envelope]:
        return [e for e in self.received if e.type == type_name]

    async def close(self) -> None:
        await self.connection.close()


# ---------------------------------------------------------------------------- schema and time


def test_database_url_must_name_each_service_and_gets_the_async_driver() -> None:
    with pytest.raises(ValidationError, match=re.escape("must contain '{service}'")):
        Settings(database_url="postgresql+asyncpg://db/runner")
    settings = Settings(database_url="postgresql://runner@db/runner_{service}")
    assert (
        settings.database_for("worker-host-h1")
        == "postgresql+asyncpg://runner@db/runner_worker-host-h1"
    )
    with pytest.raises(ValueError, match="longer than PostgreSQL's 63 bytes"):
        settings.database_for("worker-host-" + "h" * 60)


async def test_datetimes_round_trip_as_utc_in_every_services_tables(backend: Backend) -> None:
    """A +02:00 time comes back as the same instant in UTC (tz-aware) from the services' tables;
    on PostgreSQL every datetime column of every service is TIMESTAMP WITH TIME ZONE (declared
    as UtcDateTime, none left to a library default); a naive time is refused."""
    store = Store(backend.url("worker-host-h1"), EVERY_TABLE)  # a name that needs quoting
    await store.open()
    try:
        moment = datetime(2026, 3, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
        job = {"strategy_id": "s", "broker_id": "paper", "credentials_sealed": "x",
               "config": "{}", "job_id": "j", "worker_id": "w", "user_id": "u"}
        async with store.transaction() as uow:
            await uow.execute(insert(PLANS).values(user_id="u", tier="pro", expires_at=moment))
            await uow.execute(insert(CIRCUITS).values(key="u|s", failures="[]", open_until=moment))
            await uow.execute(insert(JOBS).values(**job, state="running", started_at=moment))
            await uow.execute(insert(LOCAL_WORKERS).values(**job, dispatched_at=moment))
            await uow.execute(insert(USERS).values(user_id="u", token_hash="h",
                                                   created_at=moment))
            await uow.set_timer("t", "expire", moment)
        async with store.reading() as conn:
            read = [(await conn.execute(select(column))).scalar_one() for column in (
                PLANS.c.expires_at, CIRCUITS.c.open_until, JOBS.c.started_at,
                LOCAL_WORKERS.c.dispatched_at, USERS.c.created_at, TIMERS.c.due_at)]
        for value in read:
            assert value == moment and value.tzinfo is not None
            assert value.utcoffset() == timedelta(0)
        assert (await store.next_timer()).due_at == moment

        with pytest.raises(StatementError, match="naive datetime"):
            async with store.transaction() as uow:
                await uow.set_timer("naive", "expire", datetime(2026, 3, 1, 12, 0))

        if backend.name == "postgres":
            async with store.reading() as conn:
                types = (
                    await conn.execute(
                        text(
                            "SELECT table_name, column_name, data_type "
                            "FROM information_schema.columns WHERE table_schema = 'public' "
                            "AND data_type LIKE 'timestamp%'"
                        )
                    )
                ).all()
            declared = {
                (table.name, column.name)
                for table in store.tables
                for column in table.columns
                if isinstance(column.type, UtcDateTime)
            }
            assert {
                ("plans", "expires_at"),
                ("jobs", "started_at"),
                ("timers", "due_at"),
                ("local_workers", "dispatched_at"),
                ("users", "created_at"),
            } <= declared
            assert {(t, c) for t, c, _ in types} == declared
            assert {d for _, _, d in types} == {"timestamp with time zone"}
    finally:
        await store.close()


async def test_a_nullable_column_added_by_a_newer_version_is_added_to_an_old_table(
    backend: Backend,
) -> None:
    """An older scheduler store (its `hosts` table without `incarnation`) opens with the new
    code: the column is added, the rows are kept; a new NOT NULL column is refused, named."""
    url = backend.url("scheduler")
    old = Store(url)
    await old.open()
    async with old.db.begin() as conn:
        await conn.execute(text(
            "CREATE TABLE hosts (host_id VARCHAR(100) PRIMARY KEY, capacity INTEGER NOT NULL, "
            "online BOOLEAN NOT NULL)"))
        await conn.execute(text("INSERT INTO hosts VALUES ('h1', 4, true)"))
    await old.close()

    store = Store(url, (HostRow.__table__,))  # type: ignore[attr-defined]
    await store.open()
    try:
        async with store.transaction() as uow:
            row = (await uow.execute(select(HOSTS))).one()
            assert (row.capacity, row.incarnation) == (4, None)
            await uow.execute(HOSTS.update().values(incarnation="run-2"))
        async with store.reading() as conn:
            assert (await conn.execute(select(HOSTS.c.incarnation))).scalar() == "run-2"
    finally:
        await store.close()

    strict = sqlalchemy.Table(
        "hosts",
        sqlalchemy.MetaData(),
        sqlalchemy.Column("host_id", sqlalchemy.String(100), primary_key=True),
        sqlalchemy.Column("zone", sqlalchemy.String(10), nullable=False),
    )
    with pytest.raises(RuntimeError, match="hosts lacks column zone"):
        await Store(url, (strict,)).open()


async def test_a_missing_postgres_database_is_created_at_first_open(postgres: Backend) -> None:
    url = postgres.url("scheduler")
    name = url.rsplit("/", 1)[1]
    for _ in range(2):  # the second open finds it and leaves it alone
        store = Store(url, SchedulerService.tables)
        await store.open()
        await store.close()
    conn = await asyncpg.connect(PG_DSN)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 1
    finally:
        await conn.close()


async def test_replicas_opening_a_new_database_at_once_all_open_it(postgres: Backend) -> None:
    """Gateways (which serve side by side, with no lease) starting together on a database none
    has made yet: none fails to create the schema."""
    from services.gateway.service import GatewayService

    stores = [Store(postgres.url("gateway"), GatewayService.tables) for _ in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
    finally:
        for store in stores:
            await store.close()


# ---------------------------------------------------------------------------- exactly-once effect


async def test_the_same_envelope_processed_twice_has_one_effect(
    backend: Backend, tmp_path: Path
) -> None:
    """Redelivery, and two consumers taking the same message at once: one slot, one decision,
    one ledger row. (A concurrent loser fails on the ledger's key and is retried as a no-op.)"""
    settings = backend.settings(data_dir=tmp_path / "var")
    services = [EntitlementService(settings), EntitlementService(settings)]
    for service in services:
        await service.store.open()
    envelope = start_runner("alice")

    async def deliver(service: EntitlementService) -> bool:
        async with service.store.processing_many([envelope], ENTITLEMENT_INBOX.name) as (
            uow, fresh
        ):
            if not fresh:
                return False
            await service.on_start_runner(uow, envelope, envelope.message())
            return True

    try:
        assert await deliver(services[0]) is True
        assert await deliver(services[0]) is False  # redelivered: skipped
        racing = await asyncio.gather(
            *(deliver(s) for s in services for _ in range(3)), return_exceptions=True
        )
        assert all(r is False or isinstance(r, IntegrityError) for r in racing), racing
        assert await deliver(services[1]) is False  # the retry of a loser is a no-op

        async with services[0].store.reading() as conn:
            slots = (await conn.execute(select(func.count()).select_from(SLOTS))).scalar()
            ledger = (await conn.execute(select(PROCESSED))).all()
            outbox = (await conn.execute(select(OUTBOX))).all()
        assert slots == 1
        assert [(p.consumer, p.event_id) for p in ledger] == [
            (ENTITLEMENT_INBOX.name, str(envelope.event_id))
        ]
        assert [Envelope.model_validate_json(r.envelope).type for r in outbox] == [
            "JobRequested",
            "JobAccepted",
        ]
    finally:
        for service in services:
            await service.store.close()


async def test_the_ledger_forgets_ids_older_than_its_retention(backend: Backend) -> None:
    """`forget_processed` deletes the ids recorded before a time, oldest first, a chunk per
    transaction, and no other: a copy of a kept id is still skipped; a copy of a forgotten one
    is fresh again (why the retention must outlast any redelivery)."""
    store = Store(backend.url("scheduler"))
    await store.open()
    envelopes = [start_runner("alice") for _ in range(7)]
    try:
        async with store.processing_many(envelopes, "inbox") as (_, fresh):
            assert fresh == list(range(7))
        async with store.transaction() as uow:  # the first five were recorded a day ago
            old = [str(e.event_id) for e in envelopes[:5]]
            await uow.execute(
                update(PROCESSED).where(PROCESSED.c.event_id.in_(old))
                .values(recorded_at=PROCESSED.c.recorded_at - 86_400))
        commits: list[int] = []
        store.on_commit.append(lambda uow: commits.append(1))

        assert await store.forget_processed(time.time() - 3_600, chunk=2) == 5
        assert len(commits) == 3  # 2 + 2 + 1
        assert await store.forget_processed(time.time() - 3_600) == 0
        async with store.processing_many(envelopes[4:], "inbox") as (_, fresh):
            assert fresh == [0]  # the forgotten fifth is handled again; the two kept are not
    finally:
        await store.close()


async def test_the_scheduler_forgets_jobs_ended_before_a_time_and_no_live_one(
    backend: Backend,
) -> None:
    """`forget_rows` on a table keyed by one column (the ledger's key has two): the jobs ended
    before the cutoff go, a chunk per transaction; one ended since, and a live one, stay."""
    store = Store(backend.url("scheduler"), SchedulerService.tables)
    await store.open()
    at = datetime.now(UTC)
    ends = {"old-1": at - timedelta(days=9), "old-2": at - timedelta(days=8),
            "recent": at - timedelta(days=1), "live": None}
    try:
        async with store.transaction() as uow:
            await uow.execute(sqlalchemy.insert(JOBS), [
                {"job_id": job, "worker_id": f"w-{job}", "user_id": "alice", "strategy_id": "s",
                 "broker_id": "paper", "credentials_sealed": "sealed", "config": "{}",
                 "state": "running" if ended is None else "stopped", "ended_at": ended}
                for job, ended in ends.items()])
        assert await store.forget_rows(JOBS.c.ended_at, at - timedelta(days=7), chunk=1) == 2
        async with store.reading() as conn:
            kept = (await conn.execute(select(JOBS.c.job_id).order_by(JOBS.c.job_id))).scalars()
            kept = list(kept)
        assert kept == ["live", "recent"]
    finally:
        await store.close()


async def test_an_old_ledger_gets_its_times_at_the_upgrade(backend: Backend) -> None:
    """A store whose ledger predates `recorded_at` opens with the column and its index added,
    the old ids timed at the opening: kept for one retention from then, then forgotten."""
    url = backend.url("entitlement")
    old = Store(url)
    await old.open()
    async with old.db.begin() as conn:
        await conn.execute(text("DROP TABLE processed"))
        await conn.execute(text(
            "CREATE TABLE processed (consumer VARCHAR(100) NOT NULL, event_id VARCHAR(36) NOT "
            "NULL, PRIMARY KEY (consumer, event_id))"))
        await conn.execute(text("INSERT INTO processed VALUES ('inbox', 'a'), ('inbox', 'b')"))
    await old.close()

    opened = time.time()
    store = Store(url)
    await store.open()
    try:
        async with store.reading() as conn:
            indexes = await conn.run_sync(
                lambda sync: sqlalchemy.inspect(sync).get_indexes("processed"))
        assert [i["column_names"] for i in indexes] == [["recorded_at"]]
        assert await store.forget_processed(opened - 60) == 0
        assert await store.forget_processed(opened + 60) == 2
    finally:
        await store.close()


async def test_lock_holds_until_the_transaction_ends(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """`UnitOfWork.lock` (PostgreSQL: transaction-scoped advisory lock; SQLite: the write lock
    of BEGIN IMMEDIATE) keeps a second store, on its own connections, out until commit."""
    url = backend.url("entitlement")
    waiting = lock_waits(backend, url, monkeypatch)
    first, second = Store(url, EntitlementService.tables), Store(url, EntitlementService.tables)
    await first.open()
    await second.open()
    order: list[str] = []
    held = asyncio.Event()

    async def holder() -> None:
        async with first.transaction() as uow:
            await uow.lock("quota:alice")
            held.set()
            await waiting()  # held until the waiter waits for it
            order.append("first commits")

    async def waiter() -> None:
        await held.wait()
        async with second.transaction() as uow:
            await uow.lock("quota:alice")
            order.append("second locked")

    try:
        await asyncio.wait_for(asyncio.gather(holder(), waiter()), timeout=20)
        assert order == ["first commits", "second locked"]
    finally:
        await first.close()
        await second.close()



async def test_reads_do_not_wait_for_a_writer(backend: Backend) -> None:
    """`Store.reading` takes no write lock: a read answers (with the committed state) while
    another transaction holds the lock. On SQLite a read used to begin IMMEDIATE and queue."""
    store = Store(backend.url("gateway"), (UserRow.__table__,))  # type: ignore[attr-defined]
    await store.open()
    try:
        async with store.transaction() as uow:
            await uow.lock("users")
            await uow.execute(insert(USERS).values(user_id="u1", token_hash="h",
                                                   created_at=datetime.now(UTC)))
            async with asyncio.timeout(2):  # the old read waited out busy_timeout (30 s)
                async with store.reading() as conn:
                    assert (await conn.execute(select(USERS))).all() == []
        async with store.reading() as conn:
            assert list((await conn.execute(select(USERS.c.user_id))).scalars()) == ["u1"]
    finally:
        await store.close()


async def test_grouped_works_share_a_commit_and_a_failure_stays_with_its_caller(
    backend: Backend,
) -> None:
    """`Store.grouped`: works waiting at the same moment commit in one transaction; when one
    raises, the group is redone one by one, so only that caller fails and the rest commit."""
    store = Store(backend.url("probe"))
    await store.open()
    commits: list[int] = []
    store.on_commit.append(lambda uow: commits.append(len(uow.emitted)))

    def work(n: int) -> Callable[[Any], Any]:
        async def emit(uow: Any) -> int:
            uow.emit(JobQueued(job_id=f"j{n}", worker_id=f"w{n}"), stream=f"job-j{n}")
            if n == 7:
                raise ValueError("work 7 fails")
            return n

        return emit

    try:
        first = await asyncio.gather(*(store.grouped(work(n)) for n in range(5)))
        assert first == list(range(5))
        assert len(commits) < 5, commits  # shared: the first alone, the rest together
        commits.clear()
        second = await asyncio.gather(
            *(store.grouped(work(n)) for n in range(5, 10)), return_exceptions=True
        )
        assert [type(r).__name__ if isinstance(r, Exception) else r for r in second] == [
            5, 6, "ValueError", 8, 9
        ]
        async with store.reading() as conn:
            rows = (await conn.execute(select(OUTBOX))).all()
        jobs = sorted(Envelope.model_validate_json(r.envelope).payload["job_id"] for r in rows)
        assert jobs == sorted(f"j{n}" for n in (0, 1, 2, 3, 4, 5, 6, 8, 9))

        # Queued now, awaited later: a work queued after it (a worker's exit after its start)
        # never commits before it, even when it is awaited first.
        commits.clear()
        start = store.queue_grouped(work(10))
        assert await store.grouped(work(11)) == 11
        assert await start == 10
        async with store.reading() as conn:
            rows = (await conn.execute(select(OUTBOX).order_by(OUTBOX.c.id))).all()
        jobs = [Envelope.model_validate_json(r.envelope).payload["job_id"] for r in rows]
        assert jobs[-2:] == ["j10", "j11"]
    finally:
        await store.close()

# ---------------------------------------------------------------------------- on the real broker


@pytest.mark.broker
async def test_outbox_publishes_only_what_commits_and_survives_a_restart(
    backend: Backend, settings: Settings
) -> None:
    settings = backend.settings(settings)
    url = settings.database_for("probe")
    sink = Sink()
    bus = AmqpBus(settings, "probe")
    await bus.start()
    await sink.start(settings.amqp_url)
    store = Store(url)
    await store.open()
    relay = OutboxRelay(store, bus)
    relay.start()
    try:
        async with store.transaction() as uow:
            uow.emit(JobQueued(job_id="j1", worker_id="w1"), stream="job-j1")
            assert relay.lag == 0  # nothing handed to the relay before the commit
        assert relay.lag == 1
        await until(lambda: sink.of("JobQueued"), what="JobQueued published after commit")

        with pytest.raises(RuntimeError):
            async with store.transaction() as uow:
                uow.emit(JobQueued(job_id="j2", worker_id="w2"), stream="job-j2")
                raise RuntimeError("handler failed")
        await relay.stop()
        async with store.reading() as conn:
            assert (await conn.execute(select(OUTBOX))).all() == []

        # committed, then the service dies before publishing: the next start publishes it
        async with store.transaction() as uow:
            uow.emit(JobQueued(job_id="j3", worker_id="w3"), stream="job-j3")
        await store.close()
        store = Store(url)
        await store.open()
        relay = OutboxRelay(store, bus)
        relay.start()
        await until(lambda: len(sink.of("JobQueued")) == 2, what="j3 after the restart")
        assert [e.payload["job_id"] for e in sink.of("JobQueued")] == ["j1", "j3"]

        async def outbox_empty() -> bool:  # confirmed rows are deleted in batches, soon after
            async with store.reading() as conn:
                return (await conn.execute(select(OUTBOX))).all() == []

        await until(outbox_empty, what="the confirmed row deleted")
    finally:
        await relay.stop()
        await store.close()
        await sink.close()
        await bus.close()


@pytest.mark.broker
async def test_expiry_timer_fires_after_the_service_restarts(
    backend: Backend, settings: Settings
) -> None:
    """The entitlement service arms an expiry timer, stops before it is due; the next instance
    fires it: EntitlementExpired and EntitlementDowngraded, the plan back on free."""
    settings = backend.settings(settings)
    sink = Sink()
    await sink.start(settings.amqp_url, "#")
    first = EntitlementService(settings)
    await first.start()
    upgrade = Envelope.wrap(
        UpgradeEntitlement(tier="pro", days=1.5 / 86_400), stream="user-bob", user_id="bob"
    )
    try:
        async with first.store.processing_many([upgrade], ENTITLEMENT_INBOX.name) as (
            uow, fresh
        ):
            assert fresh == [0]
            await first.on_upgrade(uow, upgrade, upgrade.message())
        await until(lambda: sink.of("EntitlementUpgraded"), what="EntitlementUpgraded")
    finally:
        await first.stop()
    due = sink.of("EntitlementUpgraded")[0].payload["expires_at"]
    assert sink.of("EntitlementDowngraded") == []

    # the timer falls due while no entitlement service runs
    await until(lambda: datetime.now(UTC) > datetime.fromisoformat(due), what="the expiry")
    second = EntitlementService(settings)
    await second.start()
    try:
        await until(lambda: sink.of("EntitlementDowngraded"), what="EntitlementDowngraded")
        assert [e.type for e in sink.received if e.user_id == "bob"] == [
            "EntitlementUpgraded",
            "EntitlementExpired",
            "EntitlementDowngraded",
        ]
        expired = sink.of("EntitlementExpired")[0].payload["expired_at"]
        assert datetime.fromisoformat(expired) == datetime.fromisoformat(due)
        async with second.store.reading() as conn:
            plan = (await conn.execute(select(PLANS).where(PLANS.c.user_id == "bob"))).one()
            timers = (await conn.execute(select(TIMERS))).all()
        assert plan.tier == "free" and plan.expires_at is None and timers == []
    finally:
        await second.stop()
        await sink.close()


@pytest.mark.broker
async def test_free_user_twenty_parallel_starts_one_wins(
    backend: Backend, settings: Settings
) -> None:
    """Twenty starts for one free user, decided by two entitlement services on one database,
    both active (as when a replica has not yet noticed it lost its lease), so that only the
    database serialises them: exactly one JobAccepted.
    Redelivering the winner, or a new request for the same job, decides nothing again."""
    settings = backend.settings(settings)
    sink = Sink()
    await sink.start(settings.amqp_url, "job.JobAccepted", "job.JobRejected")
    services = [EntitlementService(settings), EntitlementService(settings, single_active=False)]
    handled = [0, 0]
    for n, service in enumerate(services):
        decide = service.on_start_runner

        async def counting(uow: Any, env: Envelope, event: Any, n: int = n,
                           decide=decide) -> Envelope | None:
            handled[n] += 1
            return await decide(uow, env, event)

        service.on_start_runner = counting  # type: ignore[method-assign]
        await service.start()
    publisher = AmqpBus(settings, "probe")
    await publisher.start()
    try:
        requests = [start_runner("carol") for _ in range(20)]
        # half through the inbox (its single active consumer: one service), half as the
        # gateway sends them (the RPC queue, served by both): both decide at once
        await asyncio.gather(
            publisher.publish_many(requests[:10]),
            *(publisher.request(ENTITLEMENT_RPC, DecideStart(envelope=r)) for r in requests[10:]))
        await until(lambda: len(sink.received) == 20, timeout=30, what="20 decisions")
        accepted, rejected = sink.of("JobAccepted"), sink.of("JobRejected")
        assert len(accepted) == 1 and len(rejected) == 19
        assert {e.payload["reason"] for e in rejected} == {"worker_limit"}
        assert sum(handled) == 20 and all(handled), handled  # both services decided some

        winner = next(r for r in requests if r.payload["job_id"] == accepted[0].payload["job_id"])
        await publisher.publish(winner)  # redelivery of the same event
        await publisher.publish(start_runner("carol", job=winner.payload["job_id"]))  # retry
        await until(lambda: sum(handled) == 21, what="the redelivery reached a service")
        for service in services:
            await until(lambda service=service: not service.busy, what="their outboxes")
        assert len(sink.received) == 20
        async with services[0].store.reading() as conn:
            slots = (await conn.execute(select(SLOTS))).all()
        assert [s.job_id for s in slots] == [winner.payload["job_id"]]
    finally:
        await publisher.close()
        for service in services:
            await service.stop()
        await sink.close()


# ---------------------------------------------------------------------------- the event log


def log_envelopes(n: int, tag: str) -> list[Envelope]:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        Envelope.wrap(
            JobQueued(job_id=f"{tag}{i}", worker_id=f"w{i}"),
            stream=f"job-{tag}{i}",
            user_id="dave",
            occurred_at=base + timedelta(seconds=i),
        )
        for i in range(n)
    ]


async def test_event_log_append_verify_read(backend: Backend) -> None:
    """Positions contiguous from 1 across batches and concurrent writers on their own engines,
    duplicates recorded once, the hash chain verifies, reads come back in order and a time
    filter works on UTC; an edited row breaks the chain at that row."""
    url = backend.url("monitor")
    store = Store(url)  # as the monitor: the log on its store's database
    await store.open()
    log = EventLog(store.db)
    await log.open()
    other = EventLog.at(url)
    try:
        first = log_envelopes(1500, "a")
        recorded = await log.append(first[:1000])
        assert [p for p, _ in recorded] == list(range(1, 1001))
        again = await log.append(first[500:])  # 500 already recorded: only the new 500
        assert [p for p, _ in again] == list(range(1001, 1501))

        batches = [log_envelopes(200, f"c{n}-") for n in range(6)]
        await asyncio.gather(
            *((log if n % 2 else other).append(batch) for n, batch in enumerate(batches))
        )
        assert await log.count() == 1500 + 1200
        assert [await log.count(n) for n in (0, 1, 1500, 2700, 9999)] == [0, 1, 1500, 2700, 2700]
        async with store.reading() as conn:
            positions = (
                (await conn.execute(select(event_log.c.position).order_by(event_log.c.position)))
                .scalars()
                .all()
            )
        assert positions == list(range(1, 2701))
        assert await log.verify() is None
        head = await log.head()
        assert head.position == 2700

        read = [e async for _, e in log.read(batch=700)]
        assert [str(e.event_id) for e in read[:1500]] == [str(e.event_id) for e in first]
        cutoff = datetime(2026, 1, 1, 2, 0, 9, tzinfo=timezone(timedelta(hours=2)))  # 00:00:09Z
        early = [e async for _, e in log.read(until_time=cutoff)]
        assert {e.payload["job_id"] for e in early if e.payload["job_id"].startswith("a")} == {
            f"a{i}" for i in range(10)
        }
        assert all(e.occurred_at.utcoffset() == timedelta(0) for e in read[:10])
        if backend.name == "postgres":
            async with store.reading() as conn:
                types = dict(
                    (
                        await conn.execute(
                            text(
                                "SELECT column_name, data_type FROM information_schema.columns "
                                "WHERE table_name = 'event_log' AND data_type LIKE 'timestamp%'"
                            )
                        )
                    ).all()
                )
            assert types == {
                "occurred_at": "timestamp with time zone",
                "recorded_at": "timestamp with time zone",
            }

        async with store.db.begin() as conn:
            await conn.execute(
                update(event_log)
                .where(event_log.c.position == 1234)
                .values(envelope=func.replace(event_log.c.envelope, '"w', '"x'))
            )
        broken = await log.verify()
        assert broken is not None and broken.position == 1234 and "hash" in broken.reason
    finally:
        await other.close()
        await store.close()


async def test_a_monitor_start_from_a_snapshot_and_the_tail(backend: Backend) -> None:
    """The monitor's start on each backend: a snapshot saved and found again, the log's tail
    read without the bodies the fold does not look at (SQLAlchemy's path on PostgreSQL), and
    the two folded together equal to folding every envelope."""
    from bench.replay import history
    from projections import fold
    from services.monitor.replay import replay
    from services.monitor.snapshot import Snapshots

    store = Store(backend.url("monitor"))
    await store.open()
    log = EventLog(store.db)
    await log.open()
    snapshots = Snapshots(store.db, log)
    await snapshots.open()
    try:
        envelopes = history(1500)
        await log.append(envelopes[:1000])
        await snapshots.save(await replay(log))
        await log.append(envelopes[1000:])
        start = await snapshots.latest()
        assert start is not None and start.position == 1000
        resumed = await replay(log, start=start)
        assert resumed.position == 1500
        assert resumed.state == fold(envelopes)
    finally:
        await store.close()


async def test_event_log_reader_refuses_a_missing_database(backend: Backend) -> None:
    """`runner replay` / `audit verify` must not create an empty log where there is none."""
    url = backend.url("nomonitor")
    if backend.name == "sqlite":
        with pytest.raises(EventLogMissing):
            EventLog.at(url, must_exist=True)
        return
    reader = EventLog.at(url, must_exist=True)
    try:
        with pytest.raises(Exception, match="does not exist"):
            await reader.ensure_exists()
    finally:
        await reader.close()
    conn = await asyncpg.connect(PG_DSN)
    try:
        name = url.rsplit("/", 1)[1]
        assert await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0
    finally:
        await conn.close()


async def test_restart_backoff_counts_from_the_crash_within_one_backoff_of_now(
    tmp_path: Path,
) -> None:
    """The scheduler's restart timer is due `backoff` after the host saw the process end (the
    crash's `occurred_at`), not after the news arrived; a crash time far off (another host's
    clock) moves it by at most one backoff: never before now, never later than now + backoff."""
    settings = Settings(data_dir=tmp_path / "var", restart_backoff=1.0, restart_backoff_max=1.0)
    scheduler = SchedulerService(settings)
    await scheduler.store.open()

    async def crash_at(worker: str, crashed: datetime) -> datetime:
        job = f"job-{worker}"
        async with scheduler.store.transaction() as uow:
            await uow.execute(insert(JOBS).values(
                job_id=job, worker_id=worker, user_id=worker, strategy_id="s", broker_id="paper",
                credentials_sealed="x", config="{}", state="running", host_id="h",
                started_at=crashed))
        crash = Envelope.wrap(
            WorkerCrashed(job_id=job, worker_id=worker, host_id="h", reason=CrashReason.EXITED),
            stream=f"job-{job}", user_id=worker, occurred_at=crashed,
        )
        async with scheduler.store.processing_many([crash], "scheduler.inbox") as (uow, fresh):
            assert fresh == [0]
            await scheduler.on_job_message(uow, crash, crash.message())
            scheduled = [e for e in uow.emitted if e.type == "WorkerRestartScheduled"]
        return datetime.fromisoformat(scheduled[0].payload["due_at"])

    try:
        recent = datetime.now(UTC) - timedelta(seconds=0.3)
        assert await crash_at("w1", recent) == recent + timedelta(seconds=1)
        before = datetime.now(UTC)
        long_ago = await crash_at("w2", before - timedelta(hours=1))  # a clock far behind
        assert before <= long_ago <= datetime.now(UTC)
        ahead = await crash_at("w3", before + timedelta(hours=1))  # a clock far ahead
        assert ahead <= datetime.now(UTC) + timedelta(seconds=1)
    finally:
        await scheduler.store.close()
