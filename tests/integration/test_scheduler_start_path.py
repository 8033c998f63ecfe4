"""The scheduler's start path on a real SQLite store, its inbox batches fed directly (no broker):
JobRequested → JobAccepted → JobQueued and JobDispatched → WorkerSpawned → running. These steps
are Core statements, mixed with the ORM handlers of the rest of a job's life in one transaction,
so batches here mix the two on one job."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from events import (
    Envelope,
    HostOnline,
    JobAccepted,
    JobRequested,
    Message,
    StopRunner,
    StrategyConfig,
    WorkerSpawned,
)
from services.bus import Delivery
from services.scheduler.service import QUEUE_JOB, JobRow, SchedulerService, State, _job
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
