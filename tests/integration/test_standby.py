"""Replicas of a stateful service: the lease on PostgreSQL, a standby that takes over, a replica
that loses its lease and stops, and timers that fire once when two replicas race for them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from services.bus import AmqpBus, QueueMismatch
from services.entitlement.service import EntitlementService
from services.settings import Settings
from services.standby import PostgresLease
from services.store import Store
from services.topology import SCHEDULER_INBOX
from tests.integration.broker_helpers import until
from tests.integration.test_postgres_stores import PG_DSN, Backend, fresh_postgres, lock_waits


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path}/db/{{service}}.db")
        return
    async with fresh_postgres("sb") as postgres:
        yield postgres


@pytest.fixture
async def postgres() -> AsyncIterator[Backend]:
    async with fresh_postgres("sb") as backend:
        yield backend


async def holder_backends(database: str) -> list[int]:
    """The server pids of the sessions holding an advisory lock in `database`."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        rows = await conn.fetch(
            "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = $1", database)
        return [r["pid"] for r in rows]
    finally:
        await conn.close()


async def terminate(pids: list[int]) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        for pid in pids:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


async def test_one_replica_holds_the_lease_and_another_takes_it_once_its_session_ends(
    postgres: Backend,
) -> None:
    store = Store(postgres.url("scheduler"))
    await store.open()  # creates the database
    await store.close()
    first = PostgresLease(postgres.url("scheduler"), "scheduler")
    second = PostgresLease(postgres.url("scheduler"), "scheduler")
    try:
        assert await first.acquire() is True
        assert await second.acquire() is False
        assert await first.held() is True
        database = postgres.url("scheduler").rsplit("/", 1)[1]
        holders = await holder_backends(database)
        assert len(holders) == 1

        await terminate(holders)  # as when the holder's process dies: its session ends
        assert await first.held() is False
        assert await second.acquire() is True
        assert await first.acquire() is False
        await second.release()
        assert await first.acquire() is True
    finally:
        await first.release()
        await second.release()


@pytest.mark.broker
async def test_a_standby_takes_over_when_the_active_replica_stops(
    postgres: Backend, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The second replica stands by (nothing declared, nothing consumed) while the first is
    active, and starts when the first is gone; the first, if it finds its lease taken, exits."""
    caplog.set_level(logging.INFO, logger="services.service")
    settings = postgres.settings(settings)
    # the first checks its lease seldom, the standby tries often: the standby wins the race
    first = EntitlementService(settings.model_copy(update={"lease_poll": 1.0}))
    second = EntitlementService(settings.model_copy(update={"lease_poll": 0.05}))
    lost = asyncio.Event()
    first.on_lease_lost = lost.set
    await first.start()
    standing = asyncio.create_task(second.start())
    try:
        await until(lambda: any("standing by" in r.getMessage() for r in caplog.records), 10,
                    "the second replica standing by")
        assert not standing.done() and not second.active and second.ready is False

        # the first's lease connection breaks; the standby takes the lease before it can
        database = postgres.url("entitlement").rsplit("/", 1)[1]
        began = time.monotonic()
        await terminate(await holder_backends(database))
        await asyncio.wait_for(standing, timeout=10)
        took = time.monotonic() - began
        assert second.active and second.ready
        await asyncio.wait_for(lost.wait(), timeout=10)  # the first knows it must stop
        print(f"\nstandby active {took:.2f}s after the active replica's session ended")
    finally:
        if not standing.done():
            standing.cancel()
        for service in (first, second):
            if service.ready:
                await service.stop()


async def test_a_due_timer_fires_once_when_two_replicas_race_for_it(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two replicas' stores on one database take the same due timer at once: the second waits
    for the first's transaction and finds the timer gone."""
    stores = [Store(backend.url("scheduler")), Store(backend.url("scheduler"))]
    waiting = lock_waits(backend, backend.url("scheduler"), monkeypatch)
    for store in stores:
        await store.open()
    now = datetime.now(UTC)
    async with stores[0].transaction() as uow:
        await uow.set_timer("restart:j1", "restart", now - timedelta(seconds=1), job_id="j1")
    first_took, release = asyncio.Event(), asyncio.Event()

    async def take(store: Store, hold: bool) -> Any:
        async with store.transaction() as uow:
            row = await store.take_timer(uow, "restart:j1", now)
            if hold:
                first_took.set()
                await release.wait()  # the first is still firing it
            return row

    try:
        first = asyncio.create_task(take(stores[0], hold=True))
        await first_took.wait()
        second = asyncio.create_task(take(stores[1], hold=False))
        await waiting()
        assert not second.done()  # waits on the first's lock
        release.set()
        taken = await asyncio.gather(first, second)
        assert taken[0] is not None and taken[0].key == "restart:j1"
        assert taken[1] is None
    finally:
        for store in stores:
            await store.close()


@pytest.mark.broker
async def test_an_inbox_declared_by_an_older_version_is_named_with_what_to_do(
    settings: Settings,
) -> None:
    """A queue declared before it had a single active consumer cannot be changed: the service
    says which queue, and where the upgrade is described, instead of a broker error."""
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    old = {k: v for k, v in SCHEDULER_INBOX.arguments.items() if k != "x-single-active-consumer"}
    await channel.declare_queue(SCHEDULER_INBOX.name, durable=True, arguments=old)
    await connection.close()
    bus = AmqpBus(settings, "scheduler")
    try:
        with pytest.raises(QueueMismatch, match=r"the queue scheduler\.inbox exists with other "
                           r"arguments .* docs/OPERATIONS\.md"):
            await bus.start()
    finally:
        await bus.close()
