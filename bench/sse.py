"""Event streams at scale: 1,000 concurrent `GET /events` subscribers on one gateway.

The monitor and the gateway run as real processes (no other service: nothing else consumes the
events published here); every subscriber streams the same user's events, so each event fans out
to all of them. Events are published at a steady pace; a subscriber times each event from its
`occurred_at` (stamped just before the publish) to its arrival, so the figure covers publish →
recorded in the log → read by the gateway's tail → delivered over HTTP, an upper bound of
"log append → delivered". The subscribers run in two processes of their own and read their
sockets raw (an HTTP client's own cost per chunk would be the figure, not the gateway's).
Memory per subscriber is the gateway's RSS growth with all of them connected, divided by
their number.

    .venv/bin/python -m bench.sse [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.report import Figure, at_most, percentile, scratch_with_services_log, table
from events import Envelope, OrderFilled
from services.bus import AmqpBus
from services.cli.local import LocalSystem
from services.settings import Settings

RATE = 10.0  # events per second
OCCURRED = b'"occurred_at":"'


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Subscriber(asyncio.Protocol):
    """One stream read at the socket (the HTTP client's own cost would swamp the gateway's):
    each event's latency from its `occurred_at`, parsed once per event for all subscribers."""

    stamps: dict[bytes, float] = {}  # noqa: RUF012 - shared by every subscriber of a process

    def __init__(self, expected: int, latencies: list[float], connected: asyncio.Event,
                 done: asyncio.Future[None]) -> None:
        self.expected, self.latencies = expected, latencies
        self.connected, self.done = connected, done
        self.buffer, self.seen, self.started = b"", 0, False

    def data_received(self, data: bytes) -> None:
        arrived = time.time()
        if not self.started:
            self.started = True
            self.connected.set()
        self.buffer += data
        at = self.buffer.find(OCCURRED)
        while at >= 0:
            start = at + len(OCCURRED)
            end = self.buffer.find(b'"', start)
            if end < 0:
                break
            stamp = self.buffer[start:end]
            moment = self.stamps.get(stamp)
            if moment is None:
                moment = self.stamps[stamp] = datetime.fromisoformat(stamp.decode()).timestamp()
            self.latencies.append((arrived - moment) * 1000)
            self.seen += 1
            at = self.buffer.find(OCCURRED, end)
        self.buffer = self.buffer[self.buffer.rfind(b"\n") + 1:] if at < 0 else self.buffer[at:]
        if self.seen >= self.expected and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"stream closed after {self.seen} events"))


async def _subscribe(url: str, token: str, streams: int, expected: int, after: int,
                     ready: Any) -> list[float]:
    """`streams` subscribers, each until it has `expected` events; every event's latency in ms."""
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").split(":")
    request = (f"GET /events?after={after}&type=OrderFilled HTTP/1.1\r\nHost: {host}\r\n"
               f"Authorization: Bearer {token}\r\n\r\n").encode()
    latencies: list[float] = []
    transports, done = [], []
    for _ in range(streams):
        connected, finished = asyncio.Event(), loop.create_future()
        transport, _ = await loop.create_connection(
            lambda c=connected, f=finished: _Subscriber(expected, latencies, c, f),
            host, int(port))
        transport.write(request)
        await asyncio.wait_for(connected.wait(), 30)
        transports.append(transport)
        done.append(finished)
    ready.send("connected")
    try:
        await asyncio.gather(*done)
    finally:
        for transport in transports:
            transport.close()
    return latencies


def _subscriber_process(url: str, token: str, streams: int, expected: int, after: int,
                        conn: Any) -> None:
    import uvloop

    latencies = uvloop.run(_subscribe(url, token, streams, expected, after, conn))
    conn.send(latencies)


async def _round(local: LocalSystem, bus: AmqpBus, token: str, gateway_pid: int, subscribers: int,
                 events: int, after: int) -> tuple[list[float], float, int, int]:
    """`subscribers` streams (in up to two processes) receiving `events` published at `RATE`:
    every delivery's latency (ms), the gateway's CPU seconds meanwhile, and its RSS (KiB)
    before and with them connected."""
    processes = min(2, subscribers)
    context = multiprocessing.get_context("spawn")
    workers, pipes = [], []
    rss_before = _rss_kib(gateway_pid)
    try:
        for n in range(processes):
            ours, theirs = context.Pipe()
            share = subscribers // processes + (n < subscribers % processes)
            process = context.Process(target=_subscriber_process, daemon=True,
                                      args=(local.base_url, token, share, events, after, theirs))
            process.start()
            workers.append(process)
            pipes.append(ours)
        for pipe in pipes:
            if not await asyncio.to_thread(pipe.poll, 120):
                raise RuntimeError("the subscribers did not connect in time")
            pipe.recv()
        rss_connected = _rss_kib(gateway_pid)
        cpu_before, begin = _cpu_seconds(gateway_pid), time.perf_counter()
        for n in range(events):
            await asyncio.sleep(max(0.0, begin + n / RATE - time.perf_counter()))
            fill = OrderFilled(job_id="job-bench", worker_id="worker-bench",
                               order_id=uuid.uuid4().hex, instrument="BTC-PERPETUAL",
                               side="buy", amount=1, price=50_000)
            await bus.publish(Envelope.wrap(fill, stream="job-bench", user_id="watcher",
                                            correlation_id="job-bench"))
        latencies: list[float] = []
        for pipe in pipes:
            if not await asyncio.to_thread(pipe.poll, 120):
                raise RuntimeError("the subscribers did not get every event in time")
            latencies += pipe.recv()
        cpu = _cpu_seconds(gateway_pid) - cpu_before
    finally:
        for process in workers:
            process.kill()
    assert len(latencies) == subscribers * events, f"{len(latencies)} delivered"
    return latencies, cpu, rss_before, rss_connected


async def run(quick: bool, subscribers: int | None = None) -> list[Figure]:
    subscribers = subscribers or (200 if quick else 1000)
    events = int(RATE * (2.0 if quick else 10.0))
    with scratch_with_services_log() as (tmp, log):
        local = LocalSystem(tmp / "var", log=log,  # a thousand streams on one token
                            env={"RUNNER_RATE_LIMIT": "0"})
        local.supervisor.children = [c for c in local.supervisor.children
                                     if c.service in ("monitor", "gateway")]
        await local.start()
        bus = AmqpBus(Settings(amqp_url=local.amqp_url), "bench")
        try:
            gateway_pid = next(c.process.pid for c in local.supervisor.children
                               if c.service == "gateway" and c.process is not None)
            token = await local.admin.add_user("watcher")
            await bus.start()
            alone, _, _, _ = await _round(local, bus, token, gateway_pid, 1, events, 0)
            latencies, cpu, rss_before, rss_connected = await _round(
                local, bus, token, gateway_pid, subscribers, events, events)
            rss_after = _rss_kib(gateway_pid)
        finally:
            await bus.close()
            await local.stop()
    delivered = len(latencies)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    per_subscriber = (rss_connected - rss_before) / subscribers
    return [
        Figure(f"event stream, publish → delivered to {subscribers} subscribers, p50", p50,
               "ms", reference=percentile(alone, 50), reference_name="1 subscriber",
               higher_is_better=False, note=f"{events} events at {RATE:g}/s"),
        Figure(f"event stream, publish → delivered to {subscribers} subscribers, p99", p99,
               "ms", reference=percentile(alone, 99), reference_name="1 subscriber",
               target="≤ 50 ms", met=at_most(p99, 50), higher_is_better=False,
               note=f"n={delivered}"),
        Figure("gateway memory per connected subscriber", per_subscriber, "KiB",
               higher_is_better=False,
               note=f"RSS {rss_before // 1024} → {rss_connected // 1024} MiB connected, "
                    f"{rss_after // 1024} MiB after the events"),
        Figure("gateway CPU per delivered event", cpu / delivered * 1e6, "µs",
               higher_is_better=False, note=f"{cpu:.2f} s CPU for {delivered} deliveries"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--subscribers", type=int, default=None)
    args = parser.parse_args()
    figures = asyncio.run(run(args.quick, args.subscribers))
    Console().print(table(figures, "event streams"))


if __name__ == "__main__":
    main()
