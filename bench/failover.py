"""Broker node loss: `kill -9` of the busiest node of a private three-node RabbitMQ cluster
(`tests.rabbit_nodes`) under publish and consume traffic: kill → publishing and consuming again
(issue 21's budget; bench/RESULTS.md says how it is taken).

    .venv/bin/python -m bench.failover [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console

from bench.report import Figure, at_most, percentile, table
from events import Envelope, StopRunner
from services.bus import AmqpBus, Delivery
from services.logs import QUIET_LIBRARIES
from services.settings import Settings
from services.topology import SCHEDULER_INBOX
from tests.rabbit_nodes import RabbitCluster

INTERVAL = 0.01  # seconds between publishes
TARGET_S = 2.0


class Probe:
    """A publisher and a consumer on the cluster: when each message was sent and consumed."""

    def __init__(self, url: str) -> None:
        self.publisher = AmqpBus(Settings(amqp_url=url, request_timeout=5.0), "bench-publisher")
        self.consumer = AmqpBus(Settings(amqp_url=url), "bench-consumer")
        self.consumer.consume_batches(SCHEDULER_INBOX, self._consumed)
        self.sent: dict[int, float] = {}  # sequence → when its publish began
        self.confirmed: dict[int, float] = {}
        self.consumed: dict[int, float] = {}
        self.failed = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        await self.publisher.start()
        self._task = asyncio.create_task(self._publish())

    async def _consumed(self, deliveries: list[Delivery]) -> None:
        now = time.monotonic()
        for delivery in deliveries:
            message = delivery.message
            if isinstance(message, StopRunner):
                self.consumed.setdefault(int(message.worker_id), now)

    async def _publish(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            self.sent[seq] = time.monotonic()
            envelope = Envelope.wrap(StopRunner(worker_id=str(seq), flatten=False, reason="bench"),
                                     stream="bench")
            try:
                await self.publisher.publish(envelope)
                self.confirmed[seq] = time.monotonic()
            except Exception:  # the bus is moving to another node: the next one is tried
                self.failed += 1
            await asyncio.sleep(INTERVAL)

    def again_after(self, killed: float) -> tuple[float | None, float | None]:
        """Seconds from `killed` to the first confirm, and to the first consumption, of a
        message sent after it (None: not yet)."""
        after = [seq for seq, sent in self.sent.items() if sent >= killed]
        confirmed = [self.confirmed[s] for s in after if s in self.confirmed]
        consumed = [self.consumed[s] for s in after if s in self.consumed]
        return ((min(confirmed) - killed) if confirmed else None,
                (min(consumed) - killed) if consumed else None)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.publisher.close()
        await self.consumer.close()


def node_of(bus: AmqpBus, cluster: RabbitCluster) -> str:
    port = bus._connection.url.port  # type: ignore[union-attr]
    return next(name for name, node in cluster.nodes.items() if node.port == port)


async def measure(kills: int,
                  console: Console) -> tuple[list[float], list[float], int, int]:
    for noisy in QUIET_LIBRARIES:  # their reconnect attempts; the bus says what matters
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        cluster = RabbitCluster(Path(tmp), size=3)
        await asyncio.to_thread(cluster.start)
        probe = Probe(cluster.url)
        try:
            await probe.start()
            consumed_again, published_again = [], []
            for n in range(kills):
                await asyncio.sleep(1.0)  # traffic flowing a while before the kill (pacing)
                busy = Counter([cluster.leaders()[SCHEDULER_INBOX.name],
                                node_of(probe.publisher, cluster),
                                node_of(probe.consumer, cluster)])
                victim = busy.most_common(1)[0][0]
                cluster.kill(victim)
                killed = time.monotonic()
                deadline = killed + 30
                while None in (again := probe.again_after(killed)):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"kill {n + 1}: nothing published and consumed "
                                           "within 30 s")
                    await asyncio.sleep(0.01)
                published, consumed = again
                published_again.append(published)  # type: ignore[arg-type]
                consumed_again.append(consumed)  # type: ignore[arg-type]
                console.print(f"kill {n + 1}/{kills} of {victim} ({dict(busy)}): publishing "
                              f"{published:.2f} s, consuming {consumed:.2f} s after")
                await asyncio.to_thread(cluster.restart, victim)
            deadline = time.monotonic() + 10
            while (lost := set(probe.confirmed) - set(probe.consumed)) and (
                    time.monotonic() < deadline):
                await asyncio.sleep(0.05)  # a confirmed message still on its way
            return consumed_again, published_again, len(lost), probe.failed
        finally:
            await probe.close()
            cluster.close()


async def run(quick: bool) -> list[Figure]:
    consumed, published, lost, failed = await measure(3 if quick else 10, Console(stderr=True))
    again = [max(c, p) for c, p in zip(consumed, published, strict=True)]
    p99 = percentile(again, 99)
    return [
        Figure(
            "broker node killed → publishing and consuming again, p99",
            p99 * 1000,
            "ms",
            target=f"≤ {TARGET_S * 1000:g} ms",
            met=at_most(p99, TARGET_S) and lost == 0,
            higher_is_better=False,
            note=f"n={len(consumed)} kills of a 3-node cluster's busiest node (p99 of so few: "
                 f"the slowest); p50 {statistics.median(again) * 1000:.0f}; first confirm p50 "
                 f"{statistics.median(published) * 1000:.0f}, first consumption p50 "
                 f"{statistics.median(consumed) * 1000:.0f}; confirmed but never consumed: "
                 f"{lost}; publishes refused during the failovers: {failed}",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    figures = asyncio.run(run(parser.parse_args().quick))
    Console().print(table(figures, "failover"))


if __name__ == "__main__":
    main()
