"""The scheduler's start path on a real SQLite store, its inbox batches fed directly (no broker):
JobRequested → JobAccepted → JobQueued and JobDispatched → WorkerSpawned → running. These steps
are Core statements, mixed with the ORM handlers of the rest of a job's life in one transaction,
so batches here mix the two on one job."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert
from sqlmodel import select

from events import (
    Envelope,
    HostOnline,
    JobAccepted,
    JobRejected,
    JobRequested,
    Message,
    StopRunner,
    StrategyConfig,
    WorkerSpawned,
)
from services.bus import Delivery
from services.scheduler.service import (
    JOBS,
    QUEUE_JOB,
    JobRow,
    SchedulerService,
    State,
    _job,
)
from services.settings import Settings
from services.store import OUTBOX

Batch = Any  # the inbox's batch handler: list[Delivery] -> failures by index

SPEC = {"strategy_id": "s-1", "broker_id": "paper", "credentials_sealed": "sealed",
        "config": StrategyConfig(name="hold", type="hold", parameters={})}


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[tuple[SchedulerService, Batch]]:
    """A scheduler with its store open and one host online; yields it and its inbox handler."""
    service = SchedulerService(Settings(data_dir=tmp_path, spawn_concurrency=2))
    inbox: list[Batch] = []
    service.bus.consume_batches = lambda spec, handler, **_: inbox.append(handler)  # type: ignore[method-assign]
    await service.store.open()
    await service.setup()
    await inbox[0]([delivery(HostOnline(host_id="h-1", capacity=10, hostname="box", pid=1,
                                        incarnation="run-1"))])
    yield service, inbox[0]
    await service.store.close()


def delivery(message: Message, user: str = "u-1") -> Delivery:
    job = getattr(message, "job_id", None)
    return Delivery(Envelope.wrap(message, stream=f"job-{job}", user_id=user,
                                  correlation_id=job), message)


def ids(n: int) -> dict[str, str]:
    return {"job_id": f"j-{n}", "worker_id": f"w-{n}"}


def accepted(n: int) -> JobAccepted:
    return JobAccepted(**ids(n), tier="pro", max_workers=10, in_use=1)


async def emitted(service: SchedulerService) -> list[tuple[str, dict[str, Any]]]:
    """(type, payload) of every envelope committed to the outbox, in order."""
    async with service.store.reading() as session:
        rows = (await session.execute(select(OUTBOX.c.envelope).order_by(OUTBOX.c.id))).scalars()
        return [(e["type"], e["payload"]) for e in map(json.loads, rows)]


async def job(service: SchedulerService, n: int) -> JobRow:
    async with service.store.reading() as session:
        return (await session.exec(select(JobRow).where(JobRow.job_id == f"j-{n}"))).one()


async def test_a_job_requested_and_accepted_in_one_batch_is_dispatched_in_its_commit(
    scheduler: tuple[SchedulerService, Batch],
) -> None:
    service, inbox = scheduler
    assert await inbox([delivery(JobRequested(**ids(1), **SPEC)), delivery(accepted(1))]) == {}

    events = await emitted(service)
    assert [t for t, _ in events] == ["JobQueued", "JobDispatched"]
    assert events[1][1] | {"config": None} == {
        **ids(1), **SPEC, "config": None, "host_id": "h-1", "attempt": 0,
        "host_incarnation": "run-1"}
    assert events[1][1]["config"] == SPEC["config"].model_dump(mode="json")
    row = await job(service, 1)
    assert (row.state, row.host_id, row.user_id) == (State.DISPATCHED, "h-1", "u-1")

    spawned = delivery(WorkerSpawned(**ids(1), host_id="h-1", pid=42, attempt=0))
    assert await inbox([spawned]) == {}
    row = await job(service, 1)
    assert (row.state, row.host_id) == (State.RUNNING, "h-1")
    assert row.started_at == spawned.envelope.occurred_at


async def test_accepted_twice_queues_once_and_a_stale_spawn_changes_nothing(
    scheduler: tuple[SchedulerService, Batch],
) -> None:
    service, inbox = scheduler
    await inbox([delivery(JobRequested(**ids(1), **SPEC))])
    await inbox([delivery(accepted(1)), delivery(accepted(1))])  # two envelopes, one job
    await inbox([delivery(WorkerSpawned(**ids(1), host_id="h-9", pid=42, attempt=3))])

    assert [t for t, _ in await emitted(service)] == ["JobQueued", "JobDispatched"]
    row = await job(service, 1)
    assert (row.state, row.host_id, row.started_at) == (State.DISPATCHED, "h-1", None)


async def test_a_decision_for_a_job_not_requested_here_is_retried(
    scheduler: tuple[SchedulerService, Batch],
) -> None:
    service, inbox = scheduler
    failed = await inbox([delivery(accepted(7))])
    assert "accepted before it was requested here" in failed[0]
    assert await emitted(service) == []


async def test_a_decision_older_than_the_retention_about_a_job_not_here_is_ignored(
    scheduler: tuple[SchedulerService, Batch],
) -> None:
    """Its job ended and was forgotten (a job is requested before it is decided): retrying it
    could never succeed, so it is not dead-lettered as a decision come too early."""
    service, inbox = scheduler
    old = datetime.now(UTC) - timedelta(seconds=service.settings.ledger_retention + 60)
    envelope = Envelope.wrap(accepted(7), stream="job-j-7", user_id="u-1", occurred_at=old)
    assert await inbox([Delivery(envelope, envelope.message())]) == {}
    assert await emitted(service) == []


async def test_a_stop_in_the_batch_that_queues_the_job_stops_it_for_good(
    scheduler: tuple[SchedulerService, Batch],
) -> None:
    service, inbox = scheduler
    stop = StopRunner(worker_id="w-1", flatten=False, reason="by user")
    await inbox([delivery(JobRequested(**ids(1), **SPEC)), delivery(accepted(1)),
                 delivery(stop)])

    assert [t for t, _ in await emitted(service)] == ["JobQueued", "StopRequested",
                                                       "WorkerStopped"]
    assert (await job(service, 1)).state == State.STOPPED

    await inbox([delivery(WorkerSpawned(**ids(1), host_id="h-1", pid=42, attempt=0))])
    assert (await job(service, 1)).state == State.STOPPED  # a late report never revives it


async def test_placement_keeps_to_the_spawn_throttle_and_places_more_as_workers_run(
    scheduler: tuple[SchedulerService, Batch],
) -> None:
    service, inbox = scheduler
    await inbox([delivery(JobRequested(**ids(n), **SPEC)) for n in range(4)]
                + [delivery(accepted(n)) for n in range(4)])
    dispatched = [p["job_id"] for t, p in await emitted(service) if t == "JobDispatched"]
    assert dispatched == ["j-0", "j-1"]  # spawn_concurrency 2, oldest first

    await inbox([delivery(WorkerSpawned(**ids(0), host_id="h-1", pid=42, attempt=0))])
    dispatched = [p["job_id"] for t, p in await emitted(service) if t == "JobDispatched"]
    assert dispatched == ["j-0", "j-1", "j-2"]
    assert [(await job(service, n)).state for n in range(4)] == [
        State.RUNNING, State.DISPATCHED, State.DISPATCHED, State.QUEUED]


async def test_an_orm_read_of_a_job_sees_what_a_core_statement_changed_in_its_transaction(
    scheduler: tuple[SchedulerService, Batch],
) -> None:
    service, inbox = scheduler
    await inbox([delivery(JobRequested(**ids(1), **SPEC))])
    async with service.store.transaction() as uow:
        loaded = await _job(uow, job_id="j-1")
        assert loaded is not None and loaded.state == State.REQUESTED
        await (await uow.connection()).execute(QUEUE_JOB, {"accepted_job": "j-1"})
        again = await _job(uow, job_id="j-1")
        assert again is not None and again.state == State.QUEUED


async def test_an_ended_job_is_forgotten_one_retention_after_its_end_and_a_live_one_never(
    scheduler: tuple[SchedulerService, Batch],
) -> None:
    """Stopped and rejected jobs are timed when they end and deleted (with their sealed
    credentials) once `forget_ended`'s cutoff passes that time, in chunks; a running job stays,
    and a late message about a forgotten job changes nothing."""
    service, inbox = scheduler
    await inbox([delivery(JobRequested(**ids(1), **SPEC)), delivery(accepted(1))])
    await inbox([delivery(WorkerSpawned(**ids(1), host_id="h-1", pid=41, attempt=0))])
    await inbox([delivery(JobRequested(**ids(2), **SPEC)), delivery(accepted(2)),
                 delivery(StopRunner(worker_id="w-2", flatten=False, reason="by user"))])
    await inbox([delivery(JobRequested(**ids(3), **SPEC)),
                 delivery(JobRejected(job_id="j-3", reason="worker_limit", detail="full"))])
    assert (await job(service, 1)).ended_at is None
    for n, state in ((2, State.STOPPED), (3, State.REJECTED)):
        row = await job(service, n)
        assert row.state == state
        assert abs(time.time() - row.ended_at.timestamp()) < 60

    assert await service.forget_ended(time.time() - 3600) == 0  # ended within the retention
    assert await service.store.forget_rows(JOBS.c.ended_at, datetime.now(UTC) + timedelta(1),
                                           chunk=1) == 2
    async with service.store.reading() as session:
        assert (await session.exec(select(JobRow.job_id))).all() == ["j-1"]

    before = await emitted(service)
    await inbox([delivery(StopRunner(worker_id="w-2", flatten=True, reason="again")),
                 delivery(WorkerSpawned(**ids(2), host_id="h-1", pid=42, attempt=0))])
    assert await emitted(service) == before
    assert (await job(service, 1)).state == State.RUNNING


async def test_the_retention_loop_forgets_ended_jobs_while_the_scheduler_runs(
    scheduler: tuple[SchedulerService, Batch],
) -> None:
    service, inbox = scheduler
    service.settings = service.settings.model_copy(
        update={"ledger_retention": 0.5, "ledger_prune_every": 0.1})
    await inbox([delivery(JobRequested(**ids(1), **SPEC)), delivery(accepted(1)),
                 delivery(StopRunner(worker_id="w-1", flatten=False, reason="by user"))])
    pruning = asyncio.create_task(service._forget_old_processed())
    try:
        for _ in range(100):
            async with service.store.reading() as session:
                if not (await session.exec(select(JobRow))).all():
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the stopped job was never forgotten")
    finally:
        pruning.cancel()


async def test_jobs_ended_before_the_upgrade_are_timed_at_the_next_start(tmp_path: Path) -> None:
    """A store from before `ended_at`: at its next opening the column and its index are added,
    and the ended jobs get the opening's time (their retention counts from then), the live ones
    none."""
    settings = Settings(data_dir=tmp_path)
    old = SchedulerService(settings)
    await old.store.open()
    async with old.store.transaction() as uow:
        for n, state in ((1, State.RUNNING), (2, State.STOPPED), (3, State.FAILED)):
            await (await uow.connection()).execute(insert(JOBS).values(
                **ids(n), user_id="u-1", strategy_id="s", broker_id="paper",
                credentials_sealed="sealed", config="{}", state=state))
    await old.store.close()
    with sqlite3.connect(tmp_path / "scheduler.db") as db:
        db.execute("DROP INDEX ix_jobs_ended_at")
        db.execute("ALTER TABLE jobs DROP COLUMN ended_at")

    service = SchedulerService(settings)
    await service.store.open()  # the upgrade and its backfills
    try:
        assert (await job(service, 1)).ended_at is None
        for n in (2, 3):
            assert abs(time.time() - (await job(service, n)).ended_at.timestamp()) < 60
    finally:
        await service.store.close()
    with sqlite3.connect(tmp_path / "scheduler.db") as db:
        assert "ix_jobs_ended_at" in {row[1] for row in db.execute("PRAGMA index_list(jobs)")}
