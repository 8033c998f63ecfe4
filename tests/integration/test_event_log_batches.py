"""`Bus.consume_batches` on the real broker: ack only after the batch commits, one multiple-ack
per batch that acks nothing uncommitted, a refused message retried then dead-lettered alone, and
a consumer killed between receiving and committing loses nothing."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from events import Envelope, JobQueued
from services.bus import AmqpBus, Delivery
from services.settings import Settings
from services.topology import MONITOR_LOG
from tests.integration.broker_helpers import eventually, queue_counts, the_only_dead_letter

pytestmark = pytest.mark.broker


def envelopes(n: int, tag: str = "e") -> list[Envelope]:
    return [Envelope.wrap(JobQueued(job_id=f"{tag}{i}", worker_id=f"w{i}"), stream=f"job-{tag}{i}")
            for i in range(n)]


class Ledger:
    """A committed store keyed by event id (what the event log is to the recorder)."""

    def __init__(self) -> None:
        self.committed: dict[str, int] = {}
        self.batches: list[int] = []

    def commit(self, batch: list[Delivery]) -> None:
        self.batches.append(len(batch))
        for delivery in batch:
            key = str(delivery.envelope.event_id)
            self.committed[key] = self.committed.get(key, 0) + 1


async def test_no_message_is_acked_before_its_batch_commits(settings: Settings,
                                                            vhost: str) -> None:
    ledger, gate, holding = Ledger(), asyncio.Event(), asyncio.Event()

    async def handler(batch: list[Delivery]) -> None:
        if len(ledger.batches) == 1:  # the second batch waits, uncommitted
            holding.set()
            await gate.wait()
        if not all(str(d.envelope.event_id) in ledger.committed for d in batch):
            ledger.commit([d for d in batch if str(d.envelope.event_id) not in ledger.committed])
        else:
            ledger.batches.append(len(batch))

    publisher = AmqpBus(settings, "test")
    await publisher.start()
    await publisher.declare(MONITOR_LOG)
    published = envelopes(25)
    await publisher.publish_many(published)
    consumer = AmqpBus(settings, "consumer")
    consumer.consume_batches(MONITOR_LOG, handler, max_batch=10, prefetch=20)
    await consumer.start()
    try:
        await asyncio.wait_for(holding.wait(), 10)
        # batch 1 committed and acked; batch 2 in the handler, uncommitted, and the rest
        # prefetched or waiting: exactly the committed ones are gone from the queue (the
        # broker's figures lag by its statistics interval, so wait for them to settle)
        first = len(ledger.committed)
        assert 1 <= first <= 10
        counts: list[tuple[int, int]] = []

        def only_the_first_acked() -> bool:
            counts.append(queue_counts(vhost, MONITOR_LOG.name))
            ready, unacked = counts[-1]
            return ready + unacked == 25 - first and unacked > 0

        await eventually(only_the_first_acked, 15, "only the first batch acked")
        assert len(ledger.committed) == first
        gate.set()
        await eventually(lambda: len(ledger.committed) == 25, 10, "every message committed")
        await eventually(lambda: queue_counts(vhost, MONITOR_LOG.name) == (0, 0), 10,
                         "every message acked")
    finally:
        await consumer.close()
        await publisher.close()
    assert set(ledger.committed) == {str(e.event_id) for e in published}
    assert set(ledger.committed.values()) == {1}


async def test_a_batch_committed_after_the_connection_dropped_is_redelivered_not_misacked(
        settings: Settings, vhost: str) -> None:
    ledger, gate, holding = Ledger(), asyncio.Event(), asyncio.Event()

    async def handler(batch: list[Delivery]) -> None:
        if not ledger.batches:
            holding.set()
            await gate.wait()  # the connection drops while this batch is uncommitted
        ledger.commit(batch)

    publisher = AmqpBus(settings, "test")
    await publisher.start()
    await publisher.declare(MONITOR_LOG)
    first = envelopes(10, "a")
    await publisher.publish_many(first)
    consumer = AmqpBus(settings, "consumer")
    consumer.consume_batches(MONITOR_LOG, handler, max_batch=10, prefetch=20)
    await consumer.start()
    try:
        await asyncio.wait_for(holding.wait(), 10)
        subprocess.run(["rabbitmqctl", "close_all_connections", "-p", vhost, "test: drop"],
                       check=True, capture_output=True, timeout=60)
        await eventually(consumer.connected, 15, "the consumer reconnected")
        await eventually(lambda: queue_counts(vhost, MONITOR_LOG.name) == (0, 10), 15,
                         "the first 10 delivered again, to the new channel")
        gate.set()  # commits the old delivery, whose ack cannot go to the new channel
        second = envelopes(10, "b")
        for _ in range(50):
            try:
                await publisher.publish_many(second)
                break
            except Exception:
                await asyncio.sleep(0.2)
        await eventually(lambda: len(ledger.committed) == 20, 15, "both rounds committed")
        await eventually(lambda: queue_counts(vhost, MONITOR_LOG.name) == (0, 0), 15,
                         "every message acked")
    finally:
        await consumer.close()
        await publisher.close()
    assert set(ledger.committed) == {str(e.event_id) for e in first + second}


async def test_a_refused_message_is_retried_then_dead_lettered_alone(settings: Settings) -> None:
    ledger = Ledger()

    async def handler(batch: list[Delivery]) -> dict[int, str]:
        refused = {i: "refused by the store" for i, d in enumerate(batch)
                   if d.envelope.payload["job_id"] == "bad"}
        ledger.commit([d for i, d in enumerate(batch) if i not in refused])
        return refused

    publisher = AmqpBus(settings, "test")
    await publisher.start()
    await publisher.declare(MONITOR_LOG)
    good = envelopes(30)
    bad = Envelope.wrap(JobQueued(job_id="bad", worker_id="w"), stream="job-bad")
    await publisher.publish_many([*good[:15], bad, *good[15:]])
    consumer = AmqpBus(settings, "monitor")
    consumer.consume_batches(MONITOR_LOG, handler, max_batch=10)
    await consumer.start()
    try:
        await eventually(lambda: len(ledger.committed) == 30, 15, "the good messages")
        dead = await the_only_dead_letter(settings.amqp_url, "dlq.monitor")
    finally:
        await consumer.close()
        await publisher.close()
    assert dead.message_id == str(bad.event_id)
    reason = str(dead.headers["x-poison-reason"])
    assert reason.startswith(f"handler failed {settings.handler_attempts} times")
    assert "refused by the store" in reason
    assert set(ledger.committed.values()) == {1}


# ------------------------------------------------------------------ a consumer killed mid-batch


def _consume_into(amqp_url: str, data_dir: str, database: str, hang: bool) -> None:
    """A consumer process committing each batch into SQLite; with `hang`, it marks that a batch
    arrived and never commits it."""

    async def main() -> None:
        async def handler(batch: list[Delivery]) -> None:
            if hang:
                Path(database + ".received").write_text(str(len(batch)))
                await asyncio.Event().wait()
            with sqlite3.connect(database) as db:
                db.executemany("INSERT OR IGNORE INTO seen VALUES (?)",
                               [(str(d.envelope.event_id),) for d in batch])

        bus = AmqpBus(Settings(amqp_url=amqp_url, data_dir=Path(data_dir)), "monitor")
        bus.consume_batches(MONITOR_LOG, handler, max_batch=100)
        await bus.start()
        await asyncio.Event().wait()

    asyncio.run(main())


async def test_a_consumer_killed_between_receive_and_commit_loses_nothing(
        settings: Settings, data_dir: Path) -> None:
    database = str(data_dir / "seen.db")
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE seen (event_id TEXT PRIMARY KEY)")
    publisher = AmqpBus(settings, "test")
    await publisher.start()
    await publisher.declare(MONITOR_LOG)
    published = envelopes(50)
    await publisher.publish_many(published)
    spawn = multiprocessing.get_context("spawn")
    first = spawn.Process(target=_consume_into,
                          args=(settings.amqp_url, str(data_dir), database, True))
    first.start()
    second = None
    try:
        await eventually(lambda: Path(database + ".received").exists(), 20, "a batch received")
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)
        with sqlite3.connect(database) as db:
            assert db.execute("SELECT count(*) FROM seen").fetchone()[0] == 0

        second = spawn.Process(target=_consume_into,
                               args=(settings.amqp_url, str(data_dir), database, False))
        second.start()

        def recorded() -> int:
            with sqlite3.connect(database) as db:
                return db.execute("SELECT count(*) FROM seen").fetchone()[0]

        await eventually(lambda: recorded() == 50, 20, "every message recorded after restart")
    finally:
        for proc in (first, second):
            if proc is not None and proc.is_alive():
                proc.kill()
                proc.join(10)
        await publisher.close()
    with sqlite3.connect(database) as db:
        seen = {row[0] for row in db.execute("SELECT event_id FROM seen")}
    assert seen == {str(e.event_id) for e in published}
