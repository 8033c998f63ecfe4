"""The monitor's wiring on the real broker: it records what is published, takes heartbeats from
the telemetry exchange, answers status over RPC, and its watchdog loop reports a silent worker
on the wall clock. (Its behaviour: tests/handlers/test_monitor.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from events import (
    Envelope,
    JobAccepted,
    JobQueued,
    JobRequested,
    Message,
    StrategyConfig,
    WorkerHeartbeat,
    WorkerSpawned,
)
from events.queries import StatusQuery
from events.routing import EVENTS_EXCHANGE
from services.bus import AmqpBus
from services.monitor.service import MonitorService
from services.settings import Settings
from services.topology import MONITOR_RPC
from tests.integration.broker_helpers import collecting, eventually

pytestmark = pytest.mark.broker


def on_job(message: Message) -> Envelope:
    job = message.job_id  # type: ignore[attr-defined]
    return Envelope.wrap(message, stream=f"job-{job}", user_id="alice", correlation_id=job)


def worker_started(job: str, worker: str) -> list[Envelope]:
    return [
        on_job(JobRequested(job_id=job, worker_id=worker, strategy_id="s", broker_id="paper",
                            credentials_sealed="sealed",
                            config=StrategyConfig(name="BTC", type="hold"))),
        on_job(JobAccepted(job_id=job, worker_id=worker, tier="free", max_workers=1, in_use=0)),
        on_job(JobQueued(job_id=job, worker_id=worker)),
        on_job(WorkerSpawned(job_id=job, worker_id=worker, host_id="h1", pid=4242)),
    ]


@pytest.fixture
async def monitor(settings: Settings) -> AsyncIterator[MonitorService]:
    service = MonitorService(settings.model_copy(update={"heartbeat_interval": 0.1,
                                                         "heartbeat_timeout": 0.8}))
    await service.start()
    yield service
    await service.stop()


async def test_records_takes_heartbeats_answers_status_and_reports_silence(
        settings: Settings, monitor: MonitorService) -> None:
    bus = AmqpBus(settings, "test")
    await bus.start()
    try:
        async with collecting(settings.amqp_url,
                              (EVENTS_EXCHANGE, "worker.HeartbeatMissed.#")) as missed:
            await bus.publish_many([*worker_started("j1", "w1"), *worker_started("j2", "w2")])
            beat = WorkerHeartbeat(job_id="j1", worker_id="w1", host_id="h1", pid=4242,
                                   at=datetime.now(UTC))
            await bus.send_telemetry(beat)
            await eventually(lambda: monitor.folded.position == 8
                             and "w1" in monitor.liveness.beats, 10, "the events and the beat")
            status = await bus.request(MONITOR_RPC, StatusQuery(user_id="alice"))
            shown = {e["worker"]["workerId"]: e["worker"]["lastHeartbeat"]
                     for e in status["workers"]}
            assert shown == {"w1": int(beat.at.timestamp() * 1000), "w2": None}
            await eventually(lambda: len(missed) == 2, 10, "both workers reported silent")
    finally:
        await bus.close()
    assert {e.payload["worker_id"] for e in missed} == {"w1", "w2"}
