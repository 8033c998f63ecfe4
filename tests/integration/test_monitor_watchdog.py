"""The monitor on the real broker: heartbeat watchdog, host watchdog, status queries, replay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest

from events import (
    Envelope,
    HostHeartbeat,
    HostOnline,
    JobAccepted,
    JobQueued,
    JobRequested,
    PositionChanged,
    PositionMark,
    StrategyConfig,
    TradeClosed,
    WorkerHeartbeat,
    WorkerHeartbeats,
    WorkerSpawned,
    WorkerStopped,
)
from events.routing import EVENTS_EXCHANGE
from projections import ENDED_KEPT_HOURS
from services.bus import Bus, RpcError
from services.monitor import views
from services.monitor.service import MonitorService
from services.settings import Settings
from tests.integration.broker_helpers import collecting

pytestmark = pytest.mark.broker


def on_job(message, user: str = "alice") -> Envelope:
    return Envelope.wrap(message, stream=f"job-{message.job_id}", user_id=user,
                         correlation_id=message.job_id)


def worker_started(job: str = "j1", worker: str = "w1", host: str = "h1") -> list[Envelope]:
    return [
        on_job(JobRequested(job_id=job, worker_id=worker, strategy_id="scalping-btc",
                            broker_id="paper", credentials_sealed="sealed",
                            config=StrategyConfig(name="BTC", type="scalping"))),
        on_job(JobAccepted(job_id=job, worker_id=worker, tier="free", max_workers=1, in_use=0)),
        on_job(JobQueued(job_id=job, worker_id=worker)),
        on_job(WorkerSpawned(job_id=job, worker_id=worker, host_id=host, pid=4242)),
    ]


def heartbeat(pnl: float = 150.0, worker: str = "w1") -> WorkerHeartbeat:
    return WorkerHeartbeat(
        job_id="j1", worker_id=worker, host_id="h1", pid=4242, at=datetime.now(UTC),
        positions=(PositionMark(instrument="BTC-PERPETUAL", side="long", amount=2,
                                entry_price=50_000, mark_price=50_075, unrealized_pnl=pnl),),
    )


async def eventually(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared short settings, shrunk further: these tests wait out several timeouts."""
    return settings.model_copy(update={"heartbeat_interval": 0.1, "heartbeat_timeout": 0.8,
                                       "host_heartbeat_interval": 0.1, "host_timeout": 0.8})


@pytest.fixture
async def monitor(settings: Settings) -> AsyncIterator[MonitorService]:
    service = MonitorService(settings)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def bus(settings: Settings, monitor: MonitorService) -> AsyncIterator[Bus]:
    bus = Bus(settings, "test")
    await bus.start()
    yield bus
    await bus.close()


@pytest.fixture
async def reports(settings: Settings, monitor: MonitorService) -> AsyncIterator[list[Envelope]]:
    """Every HeartbeatMissed and HostLost that reaches the bus."""
    async with collecting(settings.amqp_url, (EVENTS_EXCHANGE, "worker.HeartbeatMissed"),
                          (EVENTS_EXCHANGE, "host.HostLost")) as seen:
        yield seen


async def beat_for(bus: Bus, seconds: float, interval: float, make: Callable[[], object]) -> float:
    """Heartbeats every `interval` for `seconds`; returns when the last one was sent."""
    deadline = time.monotonic() + seconds
    last = time.monotonic()
    while time.monotonic() < deadline:
        await bus.send_telemetry(make())
        last = time.monotonic()
        await asyncio.sleep(interval)
    return last


async def test_silent_worker_is_reported_once_per_silence_episode(
        settings: Settings, monitor: MonitorService, bus: Bus, reports: list[Envelope]) -> None:
    await bus.publish_many(worker_started())
    await eventually(lambda: "w1" in monitor.state.workers
                     and monitor.state.workers["w1"].status == "running", what="worker running")

    silent_since = await beat_for(bus, 1.5 * settings.heartbeat_timeout,
                                  settings.heartbeat_interval, heartbeat)
    assert reports == [], "reported while heartbeats were arriving"

    await eventually(lambda: len(reports) == 1, 3 * settings.heartbeat_timeout, "HeartbeatMissed")
    # judged from the last heartbeat (received a moment after it was sent), not earlier
    assert time.monotonic() - silent_since >= settings.heartbeat_timeout
    await asyncio.sleep(settings.heartbeat_timeout)
    assert len(reports) == 1, "reported the same silence twice"
    missed = reports[0]
    assert missed.type == "HeartbeatMissed"
    assert missed.payload["worker_id"] == "w1" and missed.payload["host_id"] == "h1"
    # over the timeout when judged; reported to the millisecond, so 0.8004 s shows as 0.8
    assert missed.payload["silent_for"] >= settings.heartbeat_timeout
    assert (missed.stream, missed.correlation_id, missed.user_id) == ("job-j1", "j1", "alice")

    await bus.send_telemetry(heartbeat())  # a sign of life ends the episode; silence again reports
    await eventually(lambda: len(reports) == 2, 3 * settings.heartbeat_timeout, "second report")


async def test_silent_host_is_reported_lost_once_until_it_comes_back(
        settings: Settings, monitor: MonitorService, bus: Bus, reports: list[Envelope]) -> None:
    online = HostOnline(host_id="h9", capacity=4, hostname="box", pid=99)
    await bus.publish(Envelope.wrap(online, stream="host-h9"))
    await beat_for(bus, 1.5 * settings.host_timeout, settings.host_heartbeat_interval,
                   lambda: HostHeartbeat(host_id="h9", capacity=4, at=datetime.now(UTC)))
    assert reports == []
    await eventually(lambda: len(reports) == 1, 3 * settings.host_timeout, "HostLost")
    await asyncio.sleep(settings.host_timeout)
    assert [(r.type, r.payload["host_id"], r.stream) for r in reports] == [
        ("HostLost", "h9", "host-h9")]
    hosts = await bus.request("monitor.rpc", {"op": "hosts"})
    assert [(h["hostId"], h["lost"]) for h in hosts] == [("h9", True)]

    await bus.publish(Envelope.wrap(online, stream="host-h9"))  # back; silent again: lost again
    await eventually(lambda: len(reports) == 2, 3 * settings.host_timeout, "second HostLost")


async def test_status_has_the_seed_shape_with_heartbeat_marks(
        settings: Settings, monitor: MonitorService, bus: Bus) -> None:
    trading = [
        on_job(PositionChanged(job_id="j1", worker_id="w1", instrument="BTC-PERPETUAL",
                               side="long", amount=2, entry_price=50_000)),
        on_job(TradeClosed(job_id="j1", worker_id="w1", instrument="ETH-PERPETUAL", side="long",
                           amount=1, entry_price=3000, exit_price=3010, realized_pnl=10)),
        on_job(TradeClosed(job_id="j1", worker_id="w1", instrument="ETH-PERPETUAL", side="short",
                           amount=1, entry_price=3000, exit_price=3005, realized_pnl=-5)),
    ]
    await bus.publish_many([*worker_started(), *worker_started("j2", "w2"), *trading])
    await eventually(lambda: monitor.folded.position >= 11, what="events recorded")
    beat = heartbeat(pnl=150.0)
    await bus.send_telemetry(beat)
    await eventually(lambda: "w1" in monitor.liveness.beats, what="heartbeat seen")

    status = await bus.request("monitor.rpc", {"op": "status", "user_id": "alice"})
    assert status["queueStats"] == {"queuedJobs": 0, "runningWorkers": 2, "totalWorkers": 2,
                                    "failedJobs": 0}
    entry = next(e for e in status["workers"] if e["worker"]["workerId"] == "w1")
    assert set(entry) == {"worker", "positions", "stats"}
    worker = entry["worker"]
    assert set(worker) == {"workerId", "jobId", "userId", "strategyId", "brokerId", "status",
                           "pid", "hostId", "startedAt", "restartCount", "lastHeartbeat",
                           "reason"}
    assert (worker["status"], worker["pid"], worker["hostId"], worker["jobId"]) == (
        "running", 4242, "h1", "j1")
    assert worker["lastHeartbeat"] == int(beat.at.timestamp() * 1000)
    assert isinstance(worker["startedAt"], int)
    assert entry["positions"] == [{"instrumentName": "BTC-PERPETUAL", "side": "long", "amount": 2.0,
                                   "entryPrice": 50_000.0, "unrealizedPnL": 150.0}]
    assert entry["stats"] == {"totalTrades": 2, "winningTrades": 1, "losingTrades": 1,
                              "totalPnL": 5.0, "winRate": 50.0}
    other = next(e for e in status["workers"] if e["worker"]["workerId"] == "w2")
    assert other["worker"]["lastHeartbeat"] is None

    assert await bus.request("monitor.rpc", {"op": "worker", "worker_id": "w1"}) == entry
    with pytest.raises(RpcError, match="unknown worker"):
        await bus.request("monitor.rpc", {"op": "worker", "worker_id": "nope"})
    assert (await bus.request("monitor.rpc", {"op": "status", "user_id": "bob"}))["workers"] == []
    page = await bus.request("monitor.rpc", {"op": "log", "after": 9, "limit": 1})
    assert [row["position"] for row in page] == [10]
    assert page[0]["envelope"]["type"] in {"TradeClosed", "PositionChanged"}

    # The status just served is cached per worker; a heartbeat and an event each show at once.
    later = heartbeat(pnl=-20.0)
    await bus.send_telemetry(later)
    await eventually(lambda: monitor.liveness.beats["w1"].at == later.at, what="second beat")
    beaten = await bus.request("monitor.rpc", {"op": "worker", "worker_id": "w1"})
    status = await bus.request("monitor.rpc", {"op": "status", "user_id": "alice"})
    assert next(e for e in status["workers"] if e["worker"]["workerId"] == "w1") == beaten
    assert beaten["worker"]["lastHeartbeat"] == int(later.at.timestamp() * 1000)
    await bus.publish(on_job(PositionChanged(job_id="j1", worker_id="w1",
                                             instrument="BTC-PERPETUAL", side="long", amount=3,
                                             entry_price=50_100)))
    await eventually(lambda: monitor.folded.position >= 12, what="position change recorded")
    again = await bus.request("monitor.rpc", {"op": "status", "user_id": "alice"})
    entry = next(e for e in again["workers"] if e["worker"]["workerId"] == "w1")
    assert entry["worker"]["lastHeartbeat"] == int(later.at.timestamp() * 1000)
    assert [(p["amount"], p["unrealizedPnL"]) for p in entry["positions"]] == [(3.0, -20.0)]
    assert again == {"success": True} | views.status(monitor.state, "alice", monitor.liveness.beats)

    # A host's batch of its workers' beats counts as each of them.
    batch = WorkerHeartbeats(host_id="h1", beats=(heartbeat(-30.0), heartbeat(7.0, "w2")))
    await bus.send_telemetry(batch)
    await eventually(lambda: monitor.liveness.beats["w1"].at == batch.beats[0].at,
                     what="the batch seen")
    status = await bus.request("monitor.rpc", {"op": "status", "user_id": "alice"})
    shown = {e["worker"]["workerId"]: e["worker"]["lastHeartbeat"] for e in status["workers"]}
    assert shown == {b.worker_id: int(b.at.timestamp() * 1000) for b in batch.beats}


async def test_status_waits_for_the_workers_it_is_told_are_known(
        monitor: MonitorService, bus: Bus) -> None:
    """Read-your-writes for the gateway: a status asked with `known` worker ids answers once
    the log shows them; one that never comes is waited for no longer than `wait`."""
    asked = time.monotonic()
    status = asyncio.create_task(bus.request(
        "monitor.rpc", {"op": "status", "user_id": "alice", "known": ["w1"], "wait": 3.0}))
    await asyncio.sleep(0.3)
    assert not status.done(), "answered before the worker was recorded"
    await bus.publish_many(worker_started())
    assert [e["worker"]["workerId"] for e in (await status)["workers"]] == ["w1"]
    assert time.monotonic() - asked < 2.0

    asked = time.monotonic()
    late = await bus.request("monitor.rpc", {"op": "status", "user_id": "alice",
                                             "known": ["w1", "never"], "wait": 0.5})
    assert 0.5 <= time.monotonic() - asked < 2.0
    assert [e["worker"]["workerId"] for e in late["workers"]] == ["w1"]
    for bad in ("w1", [{"w": 1}]):
        with pytest.raises(RpcError, match="'known' must be a list"):
            await bus.request("monitor.rpc", {"op": "status", "known": bad})


async def test_a_restarted_monitor_replays_the_log_into_the_same_state(settings: Settings) -> None:
    first = MonitorService(settings)
    await first.start()
    bus = Bus(settings, "test")
    await bus.start()
    try:
        await bus.publish_many([*worker_started(), *worker_started("j2", "w2", "h2")])
        await eventually(lambda: first.folded.position >= 8, what="events recorded")
        await first.stop()
        # it stopped with a snapshot: the next start folds nothing before it; with snapshots
        # off, a start replays the whole log, to the same state
        for snapshots, started_at in ((settings.snapshot_every, 8), (0, 0)):
            again = MonitorService(settings.model_copy(update={"snapshot_every": snapshots}))
            await again.start()
            try:
                assert again._snapshot_at == started_at
                assert again.state == first.state
                assert again.folded.position == first.folded.position == 8
                assert again.state.workers["w2"].host_id == "h2"
            finally:
                await again.stop()
    finally:
        await bus.close()


async def test_a_worker_stopped_a_week_ago_leaves_the_status_and_the_monitors_memory(
        monitor: MonitorService, bus: Bus) -> None:
    """Once the log's clock (a later start) is `ENDED_KEPT_HOURS` past a worker's end, the
    worker leaves the status, and the monitor drops its last beat and its cached entry too."""
    await bus.publish_many(worker_started())
    await eventually(lambda: monitor.folded.position >= 4, what="the start recorded")
    await bus.send_telemetry(heartbeat())
    await eventually(lambda: "w1" in monitor.liveness.beats, what="its heartbeat")
    stopped = on_job(WorkerStopped(job_id="j1", worker_id="w1", reason="stopped by user"))
    await bus.publish(stopped)
    await eventually(lambda: monitor.folded.position >= 5, what="the stop recorded")
    before = await bus.request("monitor.rpc", {"op": "status", "user_id": "alice"})
    assert [e["worker"]["status"] for e in before["workers"]] == ["stopped"]
    assert "w1" in monitor._entries

    a_week_on = stopped.occurred_at + timedelta(hours=ENDED_KEPT_HOURS + 1)
    await bus.publish_many([e.model_copy(update={"occurred_at": a_week_on})
                            for e in worker_started("j2", "w2")])
    await eventually(lambda: monitor.folded.position >= 9, what="the next start recorded")
    after = await bus.request("monitor.rpc", {"op": "status", "user_id": "alice"})
    assert [e["worker"]["workerId"] for e in after["workers"]] == ["w2"]
    assert after["queueStats"]["totalWorkers"] == 1
    assert "w1" not in monitor.liveness.beats and "w1" not in monitor.liveness.worker_seen
    assert "w1" not in monitor._entries
