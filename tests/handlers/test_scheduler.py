"""The scheduler on the in-memory bus: the start path in the commit that queues a job, the
spawn throttle, stops, crashes and restarts by its timer, lost hosts, the circuit breaker, and
ended jobs forgotten after the retention."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from events import (
    CircuitOpened,
    CrashReason,
    Envelope,
    HostLost,
    HostOnline,
    JobAccepted,
    JobDispatched,
    JobRejected,
    JobRequested,
    StopRunner,
    StrategyConfig,
    WorkerCrashed,
    WorkerRestartScheduled,
    WorkerSpawned,
)
from services.scheduler import rows
from services.scheduler.lifecycle import Job, State
from services.scheduler.service import SchedulerService
from services.settings import Settings
from tests.handlers.conftest import Harness

SPEC = {"strategy_id": "s-1", "broker_id": "paper", "credentials_sealed": "sealed",
        "config": StrategyConfig(name="hold", type="hold", parameters={})}


def ids(n: int) -> dict[str, str]:
    return {"job_id": f"j-{n}", "worker_id": f"w-{n}"}


def requested(n: int) -> JobRequested:
    return JobRequested(**ids(n), **SPEC)


def accepted(n: int) -> JobAccepted:
    return JobAccepted(**ids(n), tier="pro", max_workers=10, in_use=1)


@pytest.fixture
async def scheduler(harness: Harness) -> SchedulerService:
    service = await harness.start(SchedulerService,
                                  harness.settings.model_copy(update={"spawn_concurrency": 2}))
    await harness.send(HostOnline(host_id="h-1", capacity=10, hostname="box", pid=1,
                                  incarnation="run-1"), stream="host-h-1")
    return service


async def job(service: SchedulerService, n: int) -> Job:
    async with service.store.transaction() as uow:
        found = await rows.load_job(uow, job_id=f"j-{n}")
    assert found is not None
    return found


async def send_all(harness: Harness, *messages: object, user: str = "u-1") -> None:
    """Publish `messages` together (they arrive in one batch), then wait for their effects."""
    await harness.bus.publish_many(
        Envelope.wrap(message, stream="job-x", user_id=user,  # type: ignore[arg-type]
                      correlation_id=getattr(message, "job_id", None)) for message in messages)
    await harness.settle()


async def test_a_job_requested_and_accepted_together_is_dispatched_in_that_commit(
        harness: Harness, scheduler: SchedulerService) -> None:
    commits: list[list[str]] = []
    scheduler.store.on_commit.append(lambda uow: commits.append([e.type for e in uow.emitted]))
    await send_all(harness, requested(1), accepted(1))
    assert ["JobQueued", "JobDispatched"] in commits
    (dispatched,) = harness.of(JobDispatched)
    assert (dispatched.host_id, dispatched.attempt, dispatched.host_incarnation) == (
        "h-1", 0, "run-1")
    assert dispatched.config == SPEC["config"]
    assert ((await job(scheduler, 1)).state, (await job(scheduler, 1)).user_id) == (
        State.DISPATCHED, "u-1")

    spawned = await harness.send(WorkerSpawned(**ids(1), host_id="h-1", pid=42, attempt=0))
    running = await job(scheduler, 1)
    assert (running.state, running.started_at) == (State.RUNNING, spawned.occurred_at)


async def test_accepted_twice_queues_once_and_a_stale_spawn_changes_nothing(
        harness: Harness, scheduler: SchedulerService) -> None:
    await send_all(harness, requested(1))
    await send_all(harness, accepted(1), accepted(1))  # two envelopes, one job
    await send_all(harness, WorkerSpawned(**ids(1), host_id="h-9", pid=42, attempt=3))
    assert harness.types(about="j-1") == ["JobRequested", "JobAccepted", "JobAccepted",
                                          "JobQueued", "JobDispatched", "WorkerSpawned"]
    assert (await job(scheduler, 1)).state == State.DISPATCHED


async def test_a_decision_for_a_job_not_requested_here_is_retried_then_dead_lettered(
        harness: Harness, scheduler: SchedulerService) -> None:
    await send_all(harness, accepted(7))
    (dead,) = harness.broker.dead_letters("scheduler")
    assert "accepted before it was requested here" in dead.headers["x-poison-reason"]


async def test_a_decision_older_than_the_retention_about_a_job_not_here_is_ignored(
        harness: Harness, scheduler: SchedulerService) -> None:
    old = datetime.now(UTC) - timedelta(seconds=scheduler.settings.ledger_retention + 60)
    await harness.bus.publish(Envelope.wrap(accepted(7), stream="job-j-7", user_id="u-1",
                                            occurred_at=old))
    await harness.settle()
    assert harness.broker.dead_letters("scheduler") == []
    assert harness.types(about="j-7") == []


async def test_a_stop_in_the_batch_that_queues_the_job_stops_it_for_good(
        harness: Harness, scheduler: SchedulerService) -> None:
    await send_all(harness, requested(1), accepted(1),
                   StopRunner(worker_id="w-1", flatten=False, reason="by user"))
    assert harness.types(about="j-1")[-2:] == ["StopRequested", "WorkerStopped"]
    assert "JobDispatched" not in harness.types()
    await send_all(harness, WorkerSpawned(**ids(1), host_id="h-1", pid=42, attempt=0))
    assert (await job(scheduler, 1)).state == State.STOPPED  # a late report never revives it


async def test_placement_keeps_to_the_spawn_throttle_and_places_more_as_workers_run(
        harness: Harness, scheduler: SchedulerService) -> None:
    await send_all(harness, *(requested(n) for n in range(4)), *(accepted(n) for n in range(4)))
    assert [d.job_id for d in harness.of(JobDispatched)] == ["j-0", "j-1"]  # oldest first
    await send_all(harness, WorkerSpawned(**ids(0), host_id="h-1", pid=42, attempt=0))
    assert [d.job_id for d in harness.of(JobDispatched)] == ["j-0", "j-1", "j-2"]
    assert [(await job(scheduler, n)).state for n in range(4)] == [
        State.RUNNING, State.DISPATCHED, State.DISPATCHED, State.QUEUED]


async def test_a_crash_restarts_the_job_by_its_timer_as_the_next_attempt(
        harness: Harness, scheduler: SchedulerService) -> None:
    await send_all(harness, requested(1), accepted(1))
    await send_all(harness, WorkerSpawned(**ids(1), host_id="h-1", pid=42, attempt=0))
    await send_all(harness, WorkerCrashed(**ids(1), host_id="h-1", attempt=0,
                                          reason=CrashReason.EXITED, exit_code=1))
    assert harness.of(WorkerRestartScheduled)[0].attempt == 1
    await harness.until(lambda: len(harness.of(JobDispatched)) == 2, "the restart's dispatch")
    assert harness.of(JobDispatched)[1].attempt == 1


async def test_a_strategy_crashing_repeatedly_opens_its_circuit(
        harness: Harness, scheduler: SchedulerService) -> None:
    for n in range(3):
        await send_all(harness, requested(n), accepted(n))
        await send_all(harness, WorkerSpawned(**ids(n), host_id="h-1", pid=42, attempt=0))
        await send_all(harness, WorkerCrashed(**ids(n), host_id="h-1", attempt=0,
                                              reason=CrashReason.EXITED, exit_code=1))
    (opened,) = harness.of(CircuitOpened)
    assert opened.strategy_id == "s-1" and harness.seen[-1].stream == "circuit-u-1|s-1"


async def test_a_lost_host_crashes_its_jobs_which_are_placed_again_later(
        harness: Harness, scheduler: SchedulerService) -> None:
    await send_all(harness, requested(1), accepted(1))
    await send_all(harness, WorkerSpawned(**ids(1), host_id="h-1", pid=42, attempt=0))
    await harness.send(HostLost(host_id="h-1", silent_for=3.0), stream="host-h-1")
    (crash,) = harness.of(WorkerCrashed)
    assert crash.reason == CrashReason.HOST_LOST
    (scheduled,) = harness.of(WorkerRestartScheduled)
    assert scheduled.delay == scheduler.settings.host_fenced_within
    assert (await job(scheduler, 1)).state == State.CRASHED


async def test_an_ended_job_is_forgotten_one_retention_after_its_end_and_a_live_one_never(
        harness: Harness, scheduler: SchedulerService) -> None:
    await send_all(harness, requested(1), accepted(1))
    await send_all(harness, WorkerSpawned(**ids(1), host_id="h-1", pid=41, attempt=0))
    await send_all(harness, requested(2), accepted(2),
                   StopRunner(worker_id="w-2", flatten=False, reason="by user"))
    await send_all(harness, requested(3),
                   JobRejected(job_id="j-3", reason="worker_limit", detail="full"))
    assert (await job(scheduler, 1)).ended_at is None
    for n, state in ((2, State.STOPPED), (3, State.REJECTED)):
        ended = await job(scheduler, n)
        assert ended.state == state and abs(time.time() - ended.ended_at.timestamp()) < 60  # type: ignore[union-attr]

    assert await scheduler.forget_ended(time.time() - 3600) == 0  # within the retention
    assert await scheduler.store.forget_rows(rows.JOBS.c.ended_at,
                                             datetime.now(UTC) + timedelta(1), chunk=1) == 2
    async with scheduler.store.reading() as connection:
        assert list((await connection.execute(select(rows.JOBS.c.job_id))).scalars()) == ["j-1"]
    seen = len(harness.seen)
    await send_all(harness, StopRunner(worker_id="w-2", flatten=True, reason="again"),
                   WorkerSpawned(**ids(2), host_id="h-1", pid=42, attempt=0))
    assert harness.types()[seen:] == ["StopRunner", "WorkerSpawned"]  # and nothing more
    assert (await job(scheduler, 1)).state == State.RUNNING


async def test_the_retention_loop_forgets_ended_jobs_while_the_scheduler_runs(
        harness: Harness) -> None:
    await harness.start(SchedulerService, harness.settings.model_copy(
        update={"ledger_retention": 0.5, "ledger_prune_every": 0.1}))
    await send_all(harness, requested(1), accepted(1),
                   StopRunner(worker_id="w-1", flatten=False, reason="by user"))
    service = harness.services[-1]

    async def jobs() -> list[str]:
        async with service.store.reading() as connection:
            return list((await connection.execute(select(rows.JOBS.c.job_id))).scalars())

    assert await jobs() == ["j-1"]
    left = ["j-1"]

    async def forgotten() -> bool:
        left[:] = await jobs()
        return not left

    from tests.integration.broker_helpers import until
    await until(forgotten, 10, "the stopped job to be forgotten")


async def test_jobs_ended_before_the_upgrade_are_timed_at_the_next_start(tmp_path: Path) -> None:
    """A store from before `ended_at`: at its next opening the column and its index are added,
    and the ended jobs get the opening's time, the live ones none."""
    settings = Settings(data_dir=tmp_path)
    old = SchedulerService(settings)
    await old.store.open()
    async with old.store.transaction() as uow:
        for n, state in ((1, State.RUNNING), (2, State.STOPPED), (3, State.FAILED)):
            await uow.execute(insert(rows.JOBS).values(
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
            assert abs(time.time() - (await job(service, n)).ended_at.timestamp()) < 60  # type: ignore[union-attr]
    finally:
        await service.store.close()
    with sqlite3.connect(tmp_path / "scheduler.db") as db:
        assert "ix_jobs_ended_at" in {row[1] for row in db.execute("PRAGMA index_list(jobs)")}
