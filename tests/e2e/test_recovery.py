"""Crash detection and recovery with real processes: kill -9, kill -STOP, a strategy that always
crashes (restarts exhausted, then its circuit opens)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio

from events import Envelope
from services.cli.client import GatewayError
from tests.e2e.conftest import System, start_body
from tests.e2e.test_lifecycle import alive

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    """The system with its fault drill (the `chaos` strategy) enabled."""
    system_ = System(tmp_path_factory.mktemp("system"), RUNNER_ENABLE_CHAOS="1")
    await system_.start()
    yield system_
    await system_.stop()


def of(worker_id: str, *types: str):
    return lambda e: e.type in types and e.payload.get("worker_id") == worker_id


def pick(log: list[Envelope], worker_id: str, *types: str) -> list[Envelope]:
    return [e for e in log if of(worker_id, *types)(e)]


async def test_killed_worker_is_crashed_at_once_and_restarted_under_the_same_id(
    running: System,
) -> None:
    _, client = await running.user()
    wid = (await client.start(**start_body("hold", amount=2)))["workerId"]
    first = await running.wait_for_worker(client, wid, lambda e: e["positions"])
    pid = first["worker"]["pid"]

    killed_at = datetime.now(UTC)
    os.kill(pid, signal.SIGKILL)

    again = await running.wait_for_worker(
        client,
        wid,
        lambda e: e["worker"]["restartCount"] == 1 and e["worker"]["status"] == "running",
    )
    assert again["worker"]["pid"] != pid and alive(again["worker"]["pid"])
    log = await running.wait_for_log(lambda ev: pick(ev, wid, "WorkerRestarted"))
    crashed = pick(log, wid, "WorkerCrashed")
    assert len(crashed) == 1
    assert crashed[0].payload["reason"] == "exited" and crashed[0].payload["exit_code"] == -9
    assert (
        crashed[0].occurred_at - killed_at
    ).total_seconds() < 1.0  # from the exit, not a timeout
    assert [
        e.type
        for e in log
        if of(wid, "WorkerCrashed", "WorkerRestartScheduled", "WorkerRestarted")(e)
    ] == ["WorkerCrashed", "WorkerRestartScheduled", "WorkerRestarted"]
    # The paper account survived the crash: the restarted hold found its position, no new order.
    assert len(pick(log, wid, "OrderFilled")) == 1
    assert again["positions"][0]["amount"] == 2


async def test_hung_worker_gets_heartbeat_missed_then_is_killed_and_restarted(
    running: System,
) -> None:
    _, client = await running.user()
    wid = (await client.start(**start_body("hold", amount=1)))["workerId"]
    # (the first beat may reach the monitor before WorkerSpawned, which brings the pid)
    entry = await running.wait_for_worker(
        client, wid, lambda e: e["worker"]["lastHeartbeat"] and e["worker"]["pid"]
    )
    pid = entry["worker"]["pid"]

    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()

    again = await running.wait_for_worker(
        client,
        wid,
        lambda e: e["worker"]["restartCount"] == 1 and e["worker"]["status"] == "running",
        timeout=30,
    )
    # the heartbeat timeout (2.5 s) from its last heartbeat, at most one interval (0.3 s) earlier
    assert time.monotonic() - stopped_at >= 2.5 - 0.3
    assert not alive(pid)  # the hung process was killed before the restart
    assert again["worker"]["pid"] != pid
    log = await running.wait_for_log(lambda ev: pick(ev, wid, "WorkerRestarted"))
    sequence = [
        e.type for e in log if of(wid, "HeartbeatMissed", "WorkerCrashed", "WorkerRestarted")(e)
    ]
    assert sequence == ["HeartbeatMissed", "WorkerCrashed", "WorkerRestarted"]
    assert pick(log, wid, "WorkerCrashed")[0].payload["reason"] == "heartbeat_timeout"


async def test_always_crashing_strategy_exhausts_restarts_then_its_circuit_opens(
    running: System,
) -> None:
    user, client = await running.user()
    body = start_body("chaos", crashAfter=0.2, exitCode=7)
    wid = (await client.start(**body))["workerId"]

    failed = await running.wait_for_worker(
        client, wid, lambda e: e["worker"]["status"] == "failed", timeout=40
    )
    assert failed["worker"]["restartCount"] == 3
    log = await running.log()
    crashes = pick(log, wid, "WorkerCrashed")
    assert len(crashes) == 4 and all(c.payload["exit_code"] == 7 for c in crashes)
    assert len(pick(log, wid, "WorkerRestarted")) == 3
    exhausted = pick(log, wid, "RestartsExhausted")
    assert len(exhausted) == 1 and exhausted[0].payload["attempts"] == 3
    assert any(e.type == "CircuitOpened" and e.user_id == user for e in log)

    with pytest.raises(GatewayError) as refused:
        await client.start(**body)
    assert refused.value.status == 429 and "circuit" in str(refused.value)
    # The failed job freed its slot; once the cool-down is over, the circuit closes again.
    await running.wait_for_log(lambda ev: any(e.type == "CircuitClosed" and e.user_id == user
                                              for e in ev), timeout=20)
    retried = await client.start(**body)
    assert retried["success"]


async def test_dispatch_queued_for_a_host_run_that_died_never_starts(running: System) -> None:
    """A worker-host killed with a JobDispatched still in its queue: its next run refuses that
    dispatch (the scheduler may have moved the attempt meanwhile) and the job restarts as its
    next attempt. Kept last: it restarts the module's only worker-host."""
    _, client = await running.user()
    running.supervisor.kill("worker-host host-1", restart=False)
    wid = (await client.start(**start_body("hold", amount=1)))["workerId"]
    await running.wait_for_log(lambda ev: pick(ev, wid, "JobDispatched"))
    await running.supervisor.revive("worker-host host-1")

    entry = await running.wait_for_worker(
        client, wid, lambda e: e["worker"]["status"] == "running", timeout=30
    )
    assert entry["worker"]["restartCount"] >= 1
    log = await running.log()
    assert not pick(log, wid, "WorkerSpawned")  # attempt 0 never ran
    assert any(
        e.payload["reason"] == "host_lost" and "earlier run" in e.payload["detail"]
        for e in pick(log, wid, "WorkerCrashed")
    )
