"""The monitor on the in-memory bus, on a clock the test moves: the heartbeat and host
watchdogs report each silence once, status and worker queries in the seed's shape with the
heartbeats' marks, read-your-writes waits, a restart that replays into the same state, and
workers ended a week ago forgotten."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from events import (
    Envelope,
    HeartbeatMissed,
    HostHeartbeat,
    HostLost,
    HostOnline,
    JobAccepted,
    JobQueued,
    JobRequested,
    Message,
    PositionChanged,
    PositionMark,
    StrategyConfig,
    TradeClosed,
    WorkerHeartbeat,
    WorkerHeartbeats,
    WorkerSpawned,
    WorkerStopped,
)
from events.queries import HostsQuery, LogQuery, NotFound, StatusQuery, WorkerQuery
from projections import ENDED_KEPT_HOURS
from services.monitor import views
from services.monitor.service import MonitorService
from services.topology import MONITOR_RPC
from tests.handlers.conftest import Harness, ManualClock


def on_job(message: Message, user: str = "alice") -> Envelope:
    job = message.job_id  # type: ignore[attr-defined]
    return Envelope.wrap(message, stream=f"job-{job}", user_id=user, correlation_id=job)


def worker_started(job: str = "j1", worker: str = "w1", host: str = "h1") -> list[Envelope]:
    return [
        on_job(JobRequested(job_id=job, worker_id=worker, strategy_id="scalping-btc",
                            broker_id="paper", credentials_sealed="sealed",
                            config=StrategyConfig(name="BTC", type="scalping"))),
        on_job(JobAccepted(job_id=job, worker_id=worker, tier="free", max_workers=1, in_use=0)),
        on_job(JobQueued(job_id=job, worker_id=worker)),
        on_job(WorkerSpawned(job_id=job, worker_id=worker, host_id=host, pid=4242)),
    ]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def monitor(harness: Harness, clock: ManualClock) -> MonitorService:
    return await harness.start(MonitorService, clock=clock)


def heartbeat(clock: ManualClock, pnl: float = 150.0, worker: str = "w1") -> WorkerHeartbeat:
    return WorkerHeartbeat(
        job_id="j1", worker_id=worker, host_id="h1", pid=4242, at=clock(),
        positions=(PositionMark(instrument="BTC-PERPETUAL", side="long", amount=2,
                                entry_price=50_000, mark_price=50_075, unrealized_pnl=pnl),))


async def beat(harness: Harness, message: Message) -> None:
    await harness.bus.send_telemetry(message)
    await harness.settle()


async def query(harness: Harness, question: object) -> object:
    return await harness.bus.request(MONITOR_RPC, question)  # type: ignore[arg-type]


async def test_a_silent_worker_is_reported_once_per_silence_episode(
        harness: Harness, monitor: MonitorService, clock: ManualClock) -> None:
    timeout = monitor.settings.heartbeat_timeout
    await harness.bus.publish_many(worker_started())
    await harness.settle()
    await beat(harness, heartbeat(clock))
    clock.advance(timeout - 0.01)
    await monitor.check_liveness(clock())
    await harness.settle()
    assert harness.of(HeartbeatMissed) == []  # not silent long enough

    clock.advance(0.02)
    await monitor.check_liveness(clock())
    clock.advance(timeout)
    await monitor.check_liveness(clock())  # the same silence: not again
    await harness.settle()
    (missed,) = harness.of(HeartbeatMissed)
    assert (missed.worker_id, missed.host_id) == ("w1", "h1")
    assert missed.silent_for >= timeout
    (envelope,) = [e for e in harness.seen if e.type == "HeartbeatMissed"]
    assert (envelope.stream, envelope.correlation_id, envelope.user_id) == ("job-j1", "j1",
                                                                            "alice")

    await beat(harness, heartbeat(clock))  # a sign of life ends the episode
    clock.advance(timeout + 0.01)
    await monitor.check_liveness(clock())
    await harness.settle()
    assert len(harness.of(HeartbeatMissed)) == 2


async def test_no_silence_is_judged_while_the_bus_is_down_nor_from_before_it_came_back(
        harness: Harness, monitor: MonitorService, clock: ManualClock) -> None:
    timeout = monitor.settings.heartbeat_timeout
    await harness.bus.publish_many(worker_started())
    await harness.settle()
    await beat(harness, heartbeat(clock))
    harness.broker.go_offline()  # the monitor hears nothing, and judges no one
    clock.advance(timeout * 3)
    await monitor.check_liveness(clock())
    harness.broker.go_online()  # silence counts from here
    clock.advance(timeout - 0.01)
    await monitor.check_liveness(clock())
    await harness.settle()
    assert harness.of(HeartbeatMissed) == []

    clock.advance(0.02)
    await monitor.check_liveness(clock())
    await harness.settle()
    assert [m.worker_id for m in harness.of(HeartbeatMissed)] == ["w1"]


async def test_a_silent_host_is_reported_lost_once_until_it_comes_back(
        harness: Harness, monitor: MonitorService, clock: ManualClock) -> None:
    timeout = monitor.settings.host_timeout
    online = HostOnline(host_id="h9", capacity=4, hostname="box", pid=99)
    await harness.bus.publish(Envelope.wrap(online, stream="host-h9"))
    await beat(harness, HostHeartbeat(host_id="h9", capacity=4, at=clock()))
    clock.advance(timeout + 0.01)
    await monitor.check_liveness(clock())
    clock.advance(timeout)
    await monitor.check_liveness(clock())
    await harness.settle()
    assert [(h.host_id, e.stream) for h, e in zip(
        harness.of(HostLost), [e for e in harness.seen if e.type == "HostLost"],
        strict=True)] == [("h9", "host-h9")]
    hosts = await query(harness, HostsQuery())
    assert [(h["hostId"], h["lost"]) for h in hosts] == [("h9", True)]  # type: ignore[attr-defined]

    await harness.bus.publish(Envelope.wrap(online, stream="host-h9"))  # back, then silent
    await harness.settle()
    clock.advance(timeout + 0.01)
    await monitor.check_liveness(clock())
    await harness.settle()
    assert len(harness.of(HostLost)) == 2


async def test_status_has_the_seed_shape_with_heartbeat_marks(
        harness: Harness, monitor: MonitorService, clock: ManualClock) -> None:
    trading = [
        on_job(PositionChanged(job_id="j1", worker_id="w1", instrument="BTC-PERPETUAL",
                               side="long", amount=2, entry_price=50_000)),
        on_job(TradeClosed(job_id="j1", worker_id="w1", instrument="ETH-PERPETUAL", side="long",
                           amount=1, entry_price=3000, exit_price=3010, realized_pnl=10)),
        on_job(TradeClosed(job_id="j1", worker_id="w1", instrument="ETH-PERPETUAL", side="short",
                           amount=1, entry_price=3000, exit_price=3005, realized_pnl=-5)),
    ]
    await harness.bus.publish_many([*worker_started(), *worker_started("j2", "w2"), *trading])
    first = heartbeat(clock, pnl=150.0)
    await beat(harness, first)

    status = await query(harness, StatusQuery(user_id="alice"))
    assert status["queueStats"] == {"queuedJobs": 0, "runningWorkers": 2,  # type: ignore[index]
                                    "totalWorkers": 2, "failedJobs": 0}
    entry = next(e for e in status["workers"] if e["worker"]["workerId"] == "w1")  # type: ignore[index]
    assert set(entry) == {"worker", "positions", "stats"}
    worker = entry["worker"]
    assert set(worker) == {"workerId", "jobId", "userId", "strategyId", "brokerId", "status",
                           "pid", "hostId", "startedAt", "restartCount", "lastHeartbeat",
                           "reason"}
    assert (worker["status"], worker["pid"], worker["hostId"], worker["jobId"]) == (
        "running", 4242, "h1", "j1")
    assert worker["lastHeartbeat"] == int(first.at.timestamp() * 1000)
    assert isinstance(worker["startedAt"], int)
    assert entry["positions"] == [{"instrumentName": "BTC-PERPETUAL", "side": "long",
                                   "amount": 2.0, "entryPrice": 50_000.0,
                                   "unrealizedPnL": 150.0}]
    assert entry["stats"] == {"totalTrades": 2, "winningTrades": 1, "losingTrades": 1,
                              "totalPnL": 5.0, "winRate": 50.0}
    other = next(e for e in status["workers"] if e["worker"]["workerId"] == "w2")  # type: ignore[index]
    assert other["worker"]["lastHeartbeat"] is None

    assert await query(harness, WorkerQuery(worker_id="w1")) == entry
    with pytest.raises(NotFound, match="unknown worker"):
        await query(harness, WorkerQuery(worker_id="nope"))
    assert (await query(harness, StatusQuery(user_id="bob")))["workers"] == []  # type: ignore[index]
    page = await query(harness, LogQuery(after=9, limit=1))
    assert [row["position"] for row in page] == [10]  # type: ignore[attr-defined]

    # The status just served is cached per worker; a heartbeat and an event each show at once.
    clock.advance(1)
    later = heartbeat(clock, pnl=-20.0)
    await beat(harness, later)
    beaten = await query(harness, WorkerQuery(worker_id="w1"))
    status = await query(harness, StatusQuery(user_id="alice"))
    assert next(e for e in status["workers"] if e["worker"]["workerId"] == "w1") == beaten  # type: ignore[index]
    assert beaten["worker"]["lastHeartbeat"] == int(later.at.timestamp() * 1000)  # type: ignore[index]
    await harness.bus.publish(on_job(PositionChanged(
        job_id="j1", worker_id="w1", instrument="BTC-PERPETUAL", side="long", amount=3,
        entry_price=50_100)))
    await harness.settle()
    again = await query(harness, StatusQuery(user_id="alice"))
    entry = next(e for e in again["workers"] if e["worker"]["workerId"] == "w1")  # type: ignore[index]
    assert [(p["amount"], p["unrealizedPnL"]) for p in entry["positions"]] == [(3.0, -20.0)]
    assert again == {"success": True} | views.status(monitor.state, "alice",
                                                     monitor.liveness.beats)

    # A host's batch of its workers' beats counts as each of them.
    clock.advance(1)
    batch = WorkerHeartbeats(host_id="h1", beats=(heartbeat(clock, -30.0),
                                                  heartbeat(clock, 7.0, "w2")))
    await beat(harness, batch)
    status = await query(harness, StatusQuery(user_id="alice"))
    shown = {e["worker"]["workerId"]: e["worker"]["lastHeartbeat"] for e in status["workers"]}  # type: ignore[index]
    assert shown == {b.worker_id: int(b.at.timestamp() * 1000) for b in batch.beats}


async def test_status_waits_for_the_workers_it_is_told_are_known(
        harness: Harness, monitor: MonitorService) -> None:
    """Read-your-writes for the gateway: a status asked with `known` worker ids answers once
    the log shows them; one that never comes is waited for no longer than `wait`."""
    status = asyncio.create_task(query(harness, StatusQuery(user_id="alice", known=("w1",),
                                                            wait=3.0)))
    await harness.settle()
    assert not status.done(), "answered before the worker was recorded"
    await harness.bus.publish_many(worker_started())
    assert [e["worker"]["workerId"] for e in (await status)["workers"]] == ["w1"]  # type: ignore[index]

    asked = time.monotonic()
    late = await query(harness, StatusQuery(user_id="alice", known=("w1", "never"), wait=0.5))
    assert 0.5 <= time.monotonic() - asked < 2.0
    assert [e["worker"]["workerId"] for e in late["workers"]] == ["w1"]  # type: ignore[index]


async def test_a_restarted_monitor_replays_the_log_into_the_same_state(
        harness: Harness, clock: ManualClock) -> None:
    first = await harness.start(MonitorService, clock=clock)
    await harness.bus.publish_many([*worker_started(), *worker_started("j2", "w2", "h2")])
    await harness.settle()
    await harness.stop(first)
    # it stopped with a snapshot: the next start folds nothing before it; with snapshots off,
    # a start replays the whole log, to the same state
    for snapshots, started_at in ((harness.settings.snapshot_every, 8), (0, 0)):
        again = await harness.start(MonitorService, harness.settings.model_copy(
            update={"snapshot_every": snapshots}), clock=clock)
        assert again._snapshot_at == started_at
        assert again.state == first.state
        assert again.folded.position == first.folded.position == 8
        assert again.state.workers["w2"].host_id == "h2"
        await harness.stop(again)


async def test_a_worker_stopped_a_week_ago_leaves_the_status_and_the_monitors_memory(
        harness: Harness, monitor: MonitorService, clock: ManualClock) -> None:
    """Once the log's clock (a later start) is `ENDED_KEPT_HOURS` past a worker's end, the
    worker leaves the status, and the monitor drops its last beat and its cached entry too."""
    await harness.bus.publish_many(worker_started())
    await beat(harness, heartbeat(clock))
    stopped = on_job(WorkerStopped(job_id="j1", worker_id="w1", reason="stopped by user"))
    await harness.bus.publish(stopped)
    await harness.settle()
    before = await query(harness, StatusQuery(user_id="alice"))
    assert [e["worker"]["status"] for e in before["workers"]] == ["stopped"]  # type: ignore[index]
    assert "w1" in monitor._entries

    a_week_on = stopped.occurred_at + timedelta(hours=ENDED_KEPT_HOURS + 1)
    await harness.bus.publish_many([e.model_copy(update={"occurred_at": a_week_on})
                                    for e in worker_started("j2", "w2")])
    await harness.settle()
    after = await query(harness, StatusQuery(user_id="alice"))
    assert [e["worker"]["workerId"] for e in after["workers"]] == ["w2"]  # type: ignore[index]
    assert after["queueStats"]["totalWorkers"] == 1  # type: ignore[index]
    assert "w1" not in monitor.liveness.beats and "w1" not in monitor.liveness.worker_seen
    assert "w1" not in monitor._entries
