"""The worker-host on the in-memory bus with real worker processes: a dispatch starts one
process per (worker, attempt) and records its pid; a later attempt replaces an earlier intent;
a stop in the dispatch's batch stops the worker once started; no task of an ended worker is
kept; its reports commit together and in order, before its exit, even when a commit fails."""

from __future__ import annotations

import asyncio
import gc
import socket
import sqlite3
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy.exc import OperationalError

from events import (
    Envelope,
    JobDispatched,
    Message,
    OrderFilled,
    PositionChanged,
    StopRequested,
    StrategyConfig,
    TradeClosed,
    WorkerRestarted,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerStopped,
)
from services import store as store_module
from services.service import now
from services.store import UnitOfWork
from services.worker import protocol
from services.worker_host import rows
from services.worker_host.rows import LocalWorker
from services.worker_host.service import WorkerHostService
from services.worker_host.spawner import WorkerProcess
from tests.handlers.conftest import Harness

HOST = "h-1"
CREDENTIALS = {"apiKey": "k", "apiSecret": "s"}


@pytest.fixture
async def host(harness: Harness) -> WorkerHostService:
    return await harness.start(WorkerHostService,
                               harness.settings.model_copy(update={"host_id": HOST}))


def dispatched(service: WorkerHostService, n: int, attempt: int = 0) -> Envelope:
    return envelope(JobDispatched(
        job_id=f"j-{n}", worker_id=f"w-{n}", host_id=HOST, attempt=attempt, strategy_id="s-1",
        broker_id="paper",
        credentials_sealed=service.sealer.seal(CREDENTIALS, user_id="u-1", worker_id=f"w-{n}"),
        config=StrategyConfig(name="hold", type="hold", parameters={}),
        host_incarnation=service.incarnation))


def envelope(message: Message) -> Envelope:
    job = message.job_id  # type: ignore[attr-defined]
    return Envelope.wrap(message, stream=f"job-{job}", user_id="u-1", correlation_id=job)


def stopping(n: int) -> Envelope:
    return envelope(StopRequested(job_id=f"j-{n}", worker_id=f"w-{n}", host_id=HOST,
                                  flatten=False, reason="stopped by user"))


def earlier_intent(n: int, pid: int | None = 4242) -> LocalWorker:
    return LocalWorker(worker_id=f"w-{n}", job_id=f"j-{n}", user_id="u-1", attempt=0,
                       strategy_id="s-1", broker_id="paper", credentials_sealed="sealed",
                       config="{}", pid=pid, dispatched_at=now())


async def local_workers(service: WorkerHostService) -> list[tuple[str, int, int | None]]:
    async with service.store.transaction() as uow:
        return [(r.worker_id, r.attempt, r.pid) for r in await rows.every_worker(uow)]


async def test_a_dispatch_delivered_again_starts_one_process_and_records_its_pid(
        harness: Harness, host: WorkerHostService) -> None:
    dispatch = dispatched(host, 1)
    await harness.bus.publish_many([dispatch, dispatch])
    await harness.settle()
    await harness.bus.publish(dispatch)  # redelivered after the start
    await harness.settle()
    (spawned,) = harness.of(WorkerSpawned)
    assert await local_workers(host) == [("w-1", 0, spawned.pid)]
    assert list(host.live) == ["w-1"] and host.live["w-1"].pid == spawned.pid


async def test_a_later_attempt_replaces_the_earlier_ones_intent(
        harness: Harness, host: WorkerHostService) -> None:
    async with host.store.transaction() as uow:  # attempt 0's, left by an earlier run
        await rows.record_intent(uow, earlier_intent(2), replacing=False)
    await harness.bus.publish_many([dispatched(host, 2, attempt=1), dispatched(host, 2)])
    await harness.settle()
    (restarted,) = harness.of(WorkerRestarted)
    assert restarted.attempt == 1
    assert await local_workers(host) == [("w-2", 1, restarted.pid)]
    assert harness.of(WorkerSpawned) == []


async def test_a_stop_in_the_dispatchs_batch_stops_the_worker_once_started(
        harness: Harness, host: WorkerHostService) -> None:
    await harness.bus.publish_many([dispatched(host, 3), stopping(3)])
    await harness.until(lambda: harness.of(WorkerStopped), "the worker stopped")
    (stopped,) = harness.of(WorkerStopped)
    assert (stopped.reason, stopped.exit_code) == ("stopped by user", 0)
    assert [s.worker_id for s in harness.of(WorkerSpawned)] == ["w-3"]
    await harness.settle()
    assert await local_workers(host) == [] and host.live == {}


async def test_a_strategy_image_on_a_host_of_processes_fails_at_once_saying_why(
        harness: Harness, host: WorkerHostService) -> None:
    dispatch = dispatched(host, 5)
    config = StrategyConfig(name="hold", type="hold", parameters={}, image="runner-ta:1")
    message = dispatch.message().model_copy(update={"config": config})
    await harness.bus.publish(envelope(message))
    await harness.until(lambda: harness.of(WorkerSpawnFailed), "the spawn refused")
    (failed,) = harness.of(WorkerSpawnFailed)
    assert failed.permanent and "RUNNER_SPAWN_MODE=container" in failed.error
    assert harness.of(WorkerSpawned) == [] and host.live == {}


async def test_a_stop_for_a_worker_not_here_is_answered_at_once(
        harness: Harness, host: WorkerHostService) -> None:
    await harness.bus.publish(stopping(4))
    await harness.settle()
    (stopped,) = harness.of(WorkerStopped)
    assert stopped.reason == f"stopped by user (not running on host {HOST})"


async def test_no_task_of_an_ended_worker_is_kept(harness: Harness,
                                                  host: WorkerHostService) -> None:
    """A host starts tasks for each worker (its launch, its supervision, its stop); once the
    worker has ended, none may still be referenced, or a long-lived host grows without bound."""
    ids = range(6, 9)
    await harness.bus.publish_many([dispatched(host, n) for n in ids])
    await harness.until(lambda: len(harness.of(WorkerSpawned)) == len(ids), "the spawns")
    await harness.bus.publish_many([stopping(n) for n in ids])
    await harness.until(lambda: len(harness.of(WorkerStopped)) == len(ids), "the stops")
    names = tuple(f"-w-{n}" for n in ids)

    def of_the_workers() -> list[str]:
        return [task.get_name() for task in gc.get_objects() if isinstance(task, asyncio.Task)
                and task.get_name().endswith(names)]

    await harness.until(lambda: not [t for t in asyncio.all_tasks()
                                     if t.get_name().endswith(names)], "their last tasks")
    await harness.settle()
    gc.collect()
    assert of_the_workers() == []  # none still referenced, done or not


class _Exited:
    """A worker process that has exited with code 0."""

    pid, running, cause = 4242, False, ""

    async def wait(self) -> int:
        return 0


def trading_reports(n: int) -> list[Message]:
    ids = {"job_id": f"j-{n}", "worker_id": f"w-{n}"}
    return [
        OrderFilled(**ids, order_id="o-1", instrument="BTC", side="buy", amount=1.0, price=100.0),
        PositionChanged(**ids, instrument="BTC", side="long", amount=1.0, entry_price=100.0),
        TradeClosed(**ids, instrument="BTC", side="long", amount=1.0, entry_price=100.0,
                    exit_price=101.0, realized_pnl=1.0),
    ]


async def supervise_exited(service: WorkerHostService, n: int,
                           reports: list[Message]) -> list[list[str]]:
    """Supervises worker `n`, which sent `reports` and exited with code 0; returns the types each
    commit emitted."""
    async with service.store.transaction() as uow:
        await rows.record_intent(uow, earlier_intent(n), replacing=False)
    commits: list[list[str]] = []
    service.store.on_commit.append(lambda uow: commits.append([e.type for e in uow.emitted]))
    reader = asyncio.StreamReader()
    reader.feed_data(b"".join(protocol.encode(protocol.Report(
        event=r.type_name(), payload=r.model_dump(mode="json"))) for r in reports))
    reader.feed_eof()
    ours, theirs = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=ours)
    await service._supervise(WorkerProcess(f"w-{n}", f"j-{n}", "u-1", 0, _Exited(), reader,
                                           writer))
    theirs.close()
    return commits


async def test_reports_read_together_commit_together_in_order_before_the_exit(
        host: WorkerHostService) -> None:
    commits = await supervise_exited(host, 5, trading_reports(5))
    assert commits == [["OrderFilled", "PositionChanged", "TradeClosed"], ["WorkerCrashed"]]
    assert await local_workers(host) == []


def _failing_reports(monkeypatch: pytest.MonkeyPatch, times: int | None) -> list[str]:
    """Makes the commit of a transaction that emits a report fail as a lost database does,
    `times` times (None: always); returns the failures' log."""
    failures: list[str] = []
    write_outbox: Callable[[UnitOfWork], Awaitable[None]] = UnitOfWork._write_outbox
    disk_io_error = sqlite3.OperationalError("disk I/O error")
    disk_io_error.sqlite_errorcode = sqlite3.SQLITE_IOERR_WRITE  # type: ignore[attr-defined]

    async def failing(uow: UnitOfWork) -> None:
        if any(e.type == "OrderFilled" for e in uow.emitted) and (
                times is None or len(failures) < times):
            failures.append(uow.emitted[0].type)
            raise OperationalError("INSERT INTO outbox", {}, disk_io_error)
        await write_outbox(uow)

    monkeypatch.setattr(UnitOfWork, "_write_outbox", failing)
    return failures


async def test_a_report_whose_commit_fails_transiently_is_retried_in_order(
        host: WorkerHostService, monkeypatch: pytest.MonkeyPatch) -> None:
    failures = _failing_reports(monkeypatch, times=2)
    commits = await supervise_exited(host, 6, trading_reports(6)[:2])
    assert len(failures) == 2
    assert [t for c in commits for t in c] == ["OrderFilled", "PositionChanged", "WorkerCrashed"]
    assert await local_workers(host) == []


async def test_a_report_that_cannot_be_committed_is_logged_and_supervision_goes_on(
        host: WorkerHostService, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(store_module, "COMMIT_PATIENCE", 0.3)
    _failing_reports(monkeypatch, times=None)
    commits = await supervise_exited(host, 6, trading_reports(6)[:2])
    assert [t for c in commits for t in c] == ["PositionChanged", "WorkerCrashed"]
    [lost] = [r for r in caplog.records if "could not be committed" in r.getMessage()]
    assert "OrderFilled" in lost.getMessage() and '"order_id":"o-1"' in lost.getMessage()
    assert await local_workers(host) == []


async def test_a_restarted_host_reports_what_its_earlier_run_left(harness: Harness) -> None:
    """A worker started by the earlier run crashed (host restarted), one only intended failed to
    spawn, one being stopped stopped: each end reported once, and the table emptied."""
    settings = harness.settings.model_copy(update={"host_id": HOST})
    first = WorkerHostService(settings)
    await first.store.open()
    async with first.store.transaction() as uow:
        await rows.record_intent(uow, earlier_intent(1, pid=2**22 + 1), replacing=False)
        await rows.record_intent(uow, earlier_intent(2, pid=None), replacing=False)
        await rows.record_intent(uow, earlier_intent(3, pid=2**22 + 3), replacing=False)
        await rows.mark_stopping(uow, "w-3", False, "stopped by user")
    await first.store.close()
    again = await harness.start(WorkerHostService, settings)
    await harness.settle()
    assert sorted(harness.types()) == ["HostOnline", "WorkerCrashed", "WorkerSpawnFailed",
                                       "WorkerStopped"]
    assert await local_workers(again) == []
