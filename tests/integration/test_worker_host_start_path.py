"""The worker-host's start path on a real SQLite store with real worker processes, its inbox
batches fed directly (no broker): JobDispatched → the intent committed → a process forked →
its pid recorded with WorkerSpawned. The intent and the pid are Core statements, mixed with the
ORM handlers of the rest of a worker's life (a stop) in one transaction."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError
from sqlmodel import select

from events import (
    Envelope,
    JobDispatched,
    Message,
    OrderFilled,
    PositionChanged,
    StopRequested,
    StrategyConfig,
    TradeClosed,
)
from services import store as store_module
from services.bus import Delivery
from services.service import now
from services.settings import Settings
from services.store import OUTBOX, UnitOfWork
from services.worker import protocol
from services.worker_host.service import RECORD_PID, LocalWorker, WorkerHostService, _local
from services.worker_host.spawner import WorkerProcess

Batch = Any  # the inbox's batch handler: list[Delivery] -> failures by index
HOST = "h-1"
CREDENTIALS = {"apiKey": "k", "apiSecret": "s"}


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[tuple[WorkerHostService, Batch]]:
    """A worker-host with its store and fork-server open; yields it and its inbox handler."""
    service = WorkerHostService(Settings(data_dir=tmp_path, host_id=HOST, stop_grace=2.0))
    inbox: list[Batch] = []
    service.bus.consume_batches = lambda spec, handler, **_: inbox.append(handler)  # type: ignore[method-assign]
    await service.store.open()
    await service.setup()
    yield service, inbox[0]
    for worker in list(service.live.values()):
        worker.signal(signal.SIGKILL)
    await service._wait_all_exited(5.0)
    await service.spawner.close()
    await service.store.close()


def dispatched(service: WorkerHostService, n: int, attempt: int = 0) -> Delivery:
    message = JobDispatched(
        job_id=f"j-{n}", worker_id=f"w-{n}", host_id=HOST, attempt=attempt, strategy_id="s-1",
        broker_id="paper",
        credentials_sealed=service.sealer.seal(CREDENTIALS, user_id="u-1", worker_id=f"w-{n}"),
        config=StrategyConfig(name="hold", type="hold", parameters={}),
        host_incarnation=service.incarnation)
    return delivery(message)


def earlier_intent(n: int) -> LocalWorker:
    return LocalWorker(worker_id=f"w-{n}", job_id=f"j-{n}", user_id="u-1", attempt=0,
                       strategy_id="s-1", broker_id="paper", credentials_sealed="sealed",
                       config="{}", pid=4242, dispatched_at=now())


def delivery(message: Message) -> Delivery:
    job = message.job_id  # type: ignore[attr-defined]
    return Delivery(Envelope.wrap(message, stream=f"job-{job}", user_id="u-1",
                                  correlation_id=job), message)


async def emitted(service: WorkerHostService, *types: str) -> list[dict[str, Any]]:
    """The payloads of the envelopes of `types` committed to the outbox, in order."""
    async with service.store.reading() as session:
        rows = (await session.execute(select(OUTBOX.c.envelope).order_by(OUTBOX.c.id))).scalars()
        return [e["payload"] for e in map(json.loads, rows) if e["type"] in types]


async def rows(service: WorkerHostService) -> list[LocalWorker]:
    async with service.store.reading() as session:
        return list((await session.exec(select(LocalWorker))).all())


async def until(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


async def test_a_dispatch_delivered_again_starts_one_process_and_records_its_pid(
    host: tuple[WorkerHostService, Batch],
) -> None:
    service, inbox = host
    assert await inbox([dispatched(service, 1), dispatched(service, 1)]) == {}
    await until(lambda: emitted(service, "WorkerSpawned"))
    assert await inbox([dispatched(service, 1)]) == {}  # redelivered after the start
    await asyncio.sleep(0.3)

    [spawned] = await emitted(service, "WorkerSpawned")
    [row] = await rows(service)
    assert (row.worker_id, row.attempt) == ("w-1", 0)
    assert row.pid == spawned["pid"] == service.live["w-1"].pid
    assert list(service.live) == ["w-1"]


async def test_a_later_attempt_replaces_the_earlier_ones_intent(
    host: tuple[WorkerHostService, Batch],
) -> None:
    service, inbox = host
    async with service.store.transaction() as uow:  # attempt 0's, left by an earlier run
        uow.session.add(earlier_intent(2))

    assert await inbox([dispatched(service, 2, attempt=1), dispatched(service, 2)]) == {}
    await until(lambda: emitted(service, "WorkerRestarted"))
    [row] = await rows(service)
    [restarted] = await emitted(service, "WorkerRestarted")
    assert (row.attempt, row.pid) == (1, restarted["pid"])
    assert restarted["attempt"] == 1


async def test_a_read_of_a_worker_sees_a_core_change_in_the_same_transaction(
    host: tuple[WorkerHostService, Batch],
) -> None:
    service, _ = host
    async with service.store.transaction() as uow:
        uow.session.add(earlier_intent(4))
    async with service.store.transaction() as uow:
        loaded = await _local(uow, "w-4")  # held: the session's identity map keeps it
        assert loaded is not None and loaded.pid == 4242
        await (await uow.connection()).execute(RECORD_PID, {"started_worker": "w-4",
                                                            "started_pid": 4343})
        assert (await _local(uow, "w-4")) is loaded and loaded.pid == 4343


async def test_a_stop_in_the_dispatchs_batch_stops_the_worker_once_started(
    host: tuple[WorkerHostService, Batch],
) -> None:
    service, inbox = host
    stop = StopRequested(job_id="j-3", worker_id="w-3", host_id=HOST, flatten=False,
                         reason="stopped by user")
    assert await inbox([dispatched(service, 3), delivery(stop)]) == {}

    await until(lambda: emitted(service, "WorkerStopped"))
    [spawned] = await emitted(service, "WorkerSpawned")
    [stopped] = await emitted(service, "WorkerStopped")
    assert stopped["reason"] == "stopped by user" and stopped["exit_code"] == 0
    assert spawned["worker_id"] == "w-3"
    assert await rows(service) == [] and service.live == {}


async def test_no_task_of_an_ended_worker_is_kept(host: tuple[WorkerHostService, Batch]) -> None:
    """A host starts tasks for each worker (its launch, its supervision, its stop); once the
    worker has ended, none may still be referenced, or a long-lived host grows without bound."""
    service, inbox = host
    ids = range(6, 9)
    assert await inbox([dispatched(service, n) for n in ids]) == {}
    await until(lambda: _count(emitted(service, "WorkerSpawned"), len(ids)))
    stops = [StopRequested(job_id=f"j-{n}", worker_id=f"w-{n}", host_id=HOST, flatten=False,
                           reason="stopped by user") for n in ids]
    assert await inbox([delivery(stop) for stop in stops]) == {}
    await until(lambda: _count(emitted(service, "WorkerStopped"), len(ids)))
    await asyncio.sleep(0.1)  # the supervisors' last steps

    gc.collect()
    kept = [task.get_name() for task in gc.get_objects() if isinstance(task, asyncio.Task)
            and task.get_name().endswith(tuple(f"-w-{n}" for n in ids))]
    assert kept == []


async def _count(rows: Awaitable[list[Any]], n: int) -> bool:
    return len(await rows) == n


class _Exited:
    """A worker process that has exited with code 0."""

    pid, running = 4242, False

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
        uow.session.add(earlier_intent(n))  # the row its exit report removes
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
    host: tuple[WorkerHostService, Batch],
) -> None:
    service, _ = host
    commits = await supervise_exited(service, 5, trading_reports(5))
    assert commits == [["OrderFilled", "PositionChanged", "TradeClosed"], ["WorkerCrashed"]]
    assert await rows(service) == []


def _failing_reports(monkeypatch: pytest.MonkeyPatch, times: int | None) -> list[str]:
    """Makes the commit of a transaction that emits a report fail as a lost database does
    (`OperationalError`), `times` times (None: always); returns the failures' log."""
    failures: list[str] = []
    write_outbox = UnitOfWork._write_outbox
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
    host: tuple[WorkerHostService, Batch], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database fails twice as the fill commits: the store retries it, and everything
    after it waits, so the reports and the exit still commit once each, in order."""
    service, _ = host
    failures = _failing_reports(monkeypatch, times=2)
    commits = await supervise_exited(service, 6, trading_reports(6)[:2])
    assert len(failures) == 2
    assert [t for c in commits for t in c] == ["OrderFilled", "PositionChanged", "WorkerCrashed"]
    assert await rows(service) == []


async def test_a_report_that_cannot_be_committed_is_logged_and_supervision_goes_on(
    host: tuple[WorkerHostService, Batch], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fill whose commit fails for good (past the store's patience) is logged, whole, as
    lost; the worker's later report and its exit are still committed, so its slot is freed."""
    service, _ = host
    monkeypatch.setattr(store_module, "COMMIT_PATIENCE", 0.3)
    _failing_reports(monkeypatch, times=None)
    commits = await supervise_exited(service, 6, trading_reports(6)[:2])
    assert [t for c in commits for t in c] == ["PositionChanged", "WorkerCrashed"]
    [lost] = [r for r in caplog.records if "could not be committed" in r.getMessage()]
    assert "OrderFilled" in lost.getMessage() and '"order_id":"o-1"' in lost.getMessage()
    assert await rows(service) == []
