"""The monitor's recorder on the real broker, with the monitor as a real process.

Every published command and event ends up in the log exactly once: across a SIGKILL mid-batch
(redelivery), a re-publish of the same envelopes, poison messages, and a dropped connection.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import aio_pika
import pytest

from events import Envelope, JobQueued
from events.queries import HostsQuery
from events.routing import EVENTS_EXCHANGE
from services.bus import AmqpBus, PublishFailed
from services.monitor.log import EventLog
from services.settings import Settings
from services.topology import MONITOR_LOG, MONITOR_RPC
from tests.integration.broker_helpers import eventually, queue_counts

pytestmark = pytest.mark.broker

N = 3000


def envelopes(n: int, tag: str = "e") -> list[Envelope]:
    return [
        Envelope.wrap(JobQueued(job_id=f"{tag}{i}", worker_id=f"w{i}"), stream=f"job-{tag}{i}",
                      user_id=f"user-{i % 7}", correlation_id=f"{tag}{i}")
        for i in range(n)
    ]


@contextmanager
def monitor_process(settings: Settings, log_path: Path) -> Iterator[Callable[[], subprocess.Popen]]:
    """Start monitors (`runner service monitor`) on demand; whatever still runs is stopped after."""
    started: list[subprocess.Popen] = []
    env = {**os.environ, "RUNNER_AMQP_URL": settings.amqp_url,
           "RUNNER_DATA_DIR": str(settings.data_dir)}

    def start() -> subprocess.Popen:
        out = log_path.open("a")
        proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "service", "monitor"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def rows(settings: Settings) -> list[tuple[int, str, str]]:
    db = settings.data_dir / "monitor.db"
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=10) as conn:
        try:
            return conn.execute("SELECT position, event_id, recorded_at FROM event_log "
                                "ORDER BY position").fetchall()
        except sqlite3.OperationalError:  # table not created yet
            return []


async def monitor_ready(bus: AmqpBus, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "monitor exited"
        try:
            await bus.request(MONITOR_RPC, HostsQuery(), timeout=0.5)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def publish_all(bus: AmqpBus, items: list[Envelope], chunk: int = 250) -> None:
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        for attempt in range(50):  # a dropped connection is retried; duplicates are harmless
            try:
                await bus.publish_many(part)
                break
            except PublishFailed:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.2)


def assert_exactly_once(settings: Settings, published: list[Envelope]) -> None:
    recorded = rows(settings)
    assert len(recorded) == len(published)
    assert [p for p, _, _ in recorded] == list(range(1, len(published) + 1))
    assert {e for _, e, _ in recorded} == {str(e.event_id) for e in published}


async def verify_chain(settings: Settings) -> None:
    log = EventLog.at(settings.database_for("monitor"), must_exist=True)
    try:
        assert await log.verify() is None
    finally:
        await log.close()


@pytest.fixture
async def bus(settings: Settings):
    bus = AmqpBus(settings, "test")
    await bus.start()
    yield bus
    await bus.close()


async def test_backlog_and_republished_duplicates_are_recorded_once(
        settings: Settings, bus: AmqpBus, tmp_path: Path, vhost: str) -> None:
    await bus.declare(MONITOR_LOG)
    published = envelopes(N)
    await publish_all(bus, published, chunk=1000)
    with monitor_process(settings, tmp_path / "monitor.log") as start:
        await monitor_ready(bus, start())
        await eventually(lambda: len(rows(settings)) >= N, 30, f"{N} rows")
        await publish_all(bus, published[:500] + published[-500:])
        await eventually(lambda: queue_counts(vhost, MONITOR_LOG.name) == (0, 0), 30,
                         "the duplicates handled and acked")
    assert_exactly_once(settings, published)
    await verify_chain(settings)
    with sqlite3.connect(settings.data_dir / "monitor.db") as db:
        stored = dict(db.execute("SELECT event_id, envelope FROM event_log"))
    assert all(stored[str(e.event_id)] == e.to_json().decode() for e in published)

    times = [datetime.fromisoformat(at) for _, _, at in rows(settings)]
    elapsed = (max(times) - min(times)).total_seconds()
    print(f"\nrecorder: {N} events recorded in {elapsed:.3f}s between first and last commit "
          f"({N / max(elapsed, 1e-3):,.0f} events/s)")


async def test_sigkill_mid_batch_then_restart_records_every_event_once(
        settings: Settings, bus: AmqpBus, tmp_path: Path, vhost: str) -> None:
    published = envelopes(N)
    with monitor_process(settings, tmp_path / "monitor.log") as start:
        first = start()
        await monitor_ready(bus, first)
        publishing = asyncio.create_task(publish_all(bus, published, chunk=100))
        await eventually(lambda: len(rows(settings)) >= 700, 30, "the first rows")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = len(rows(settings))
        await publishing
        assert killed_at < N, "killed too late to prove anything"

        second = start()
        await monitor_ready(bus, second)
        await publish_all(bus, published[200:700])  # the same envelopes again: recorded once
        await eventually(lambda: len(rows(settings)) >= N, 30, f"{N} rows after the restart")
        await eventually(lambda: queue_counts(vhost, MONITOR_LOG.name) == (0, 0), 30,
                         "every delivery handled and acked")
    assert_exactly_once(settings, published)
    await verify_chain(settings)


async def test_poison_is_dead_lettered_with_a_reason_and_good_messages_around_it_recorded(
        settings: Settings, bus: AmqpBus, tmp_path: Path) -> None:
    before, after = envelopes(20, "a"), envelopes(20, "b")
    unknown = Envelope(type="NoSuchEvent", version=1, stream="job-x", payload={"job_id": "x"})
    with monitor_process(settings, tmp_path / "monitor.log") as start:
        await monitor_ready(bus, start())
        await publish_all(bus, before)
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(EVENTS_EXCHANGE)
            await exchange.publish(aio_pika.Message(b"\x00not json{", message_id="garbage"),
                                   routing_key="job.Garbage")
            await exchange.publish(aio_pika.Message(unknown.to_json(), message_id="unknown"),
                                   routing_key="job.NoSuchEvent")
        await publish_all(bus, after)
        await eventually(lambda: len(rows(settings)) >= 40, 15, "the good messages")

        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            dlq = await channel.get_queue("dlq.monitor")
            poison = {}
            for _ in range(50):
                message = await dlq.get(no_ack=True, fail=False)
                if message is None:
                    if len(poison) == 2:
                        break
                    await asyncio.sleep(0.1)
                    continue
                poison[message.message_id] = message
    assert_exactly_once(settings, before + after)
    assert set(poison) == {"garbage", "unknown"}
    assert poison["garbage"].body == b"\x00not json{"
    assert "invalid" in str(poison["garbage"].headers["x-poison-reason"])
    assert "unknown type" in str(poison["unknown"].headers["x-poison-reason"])


async def test_events_after_a_dropped_connection_are_still_recorded(
        settings: Settings, bus: AmqpBus, tmp_path: Path, vhost: str) -> None:
    before, after = envelopes(50, "a"), envelopes(50, "b")
    with monitor_process(settings, tmp_path / "monitor.log") as start:
        monitor = start()
        await monitor_ready(bus, monitor)
        await publish_all(bus, before)
        await eventually(lambda: len(rows(settings)) >= 50, 15, "rows before the drop")

        subprocess.run(
            ["rabbitmqctl", "close_all_connections", "-p", vhost, "test: connection drop"],
            check=True, capture_output=True, timeout=60)
        await publish_all(bus, after)  # retried until the connection is back
        await eventually(lambda: len(rows(settings)) >= 100, 20, "rows after the drop")
        await monitor_ready(bus, monitor)  # and the status RPC is served again
    assert_exactly_once(settings, before + after)
