"""Helpers for tests on the real broker: wait for a condition; take the one dead letter; collect
what is published; a gateway against stand-in services."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aio_pika
import httpx
import pytest

from events import Envelope, QueueResumed, StopRunner
from events.queries import Query
from services.bus import AmqpBus, Delivery, QueryHandler
from services.cli.local import free_port
from services.gateway.service import GatewayService
from services.service import Service
from services.settings import Settings
from services.topology import SCHEDULER_INBOX, rpc_queue

TOKEN = "test-admin-token-of-32-characters-at-least"


async def eventually(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def until(check: Callable[[], Any], timeout: float = 20.0,
                what: str = "the condition") -> Any:
    """Wait until `check()`, or what it returns when that is awaitable, is truthy (polled every
    50 ms), and return it; the test fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def until_queued(amqp_url: str, queue: str, count: int, timeout: float = 10.0) -> None:
    """Wait until `queue` holds `count` messages."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        deadline = time.monotonic() + timeout
        while (await channel.declare_queue(queue, passive=True)).declaration_result \
                .message_count < count:
            if time.monotonic() > deadline:
                pytest.fail(f"{queue} never held {count} messages")
            await asyncio.sleep(0.02)


async def drained(service: Service, collected: list[Envelope] | None = None,
                  timeout: float = 10.0) -> None:
    """Wait until `service` has published all it committed; with `collected` (see
    `collecting`), until all of it has arrived there too: a marker published after it on the
    same channel arrives after it (and is taken out again)."""
    await eventually(lambda: not service.busy, timeout, f"{service.name} to publish its outbox")
    if collected is None:
        return
    marker = Envelope.wrap(QueueResumed(running=0, ceiling=0), stream="test-marker")
    await service.bus.publish(marker)
    await eventually(lambda: any(e.event_id == marker.event_id for e in collected), timeout,
                     "the marker published after it")
    collected[:] = [e for e in collected if e.event_id != marker.event_id]


def queues(vhost: str) -> list[str]:
    """The names of the queues in `vhost`, as the broker has them now."""
    out = subprocess.run(["rabbitmqctl", "list_queues", "-q", "-p", vhost, "name"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def queue_counts(vhost: str, name: str) -> tuple[int, int]:
    """(ready, unacknowledged) as the broker sees them now."""
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "-p", vhost, "name", "messages_ready",
         "messages_unacknowledged"], capture_output=True, text=True, check=True, timeout=60).stdout
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return int(parts[1]), int(parts[2])
    raise LookupError(name)


async def the_only_dead_letter(amqp_url: str, dlq: str) -> aio_pika.abc.AbstractIncomingMessage:
    """Waits (up to 10 s) for a message on `dlq` and takes it; fails if there is none, or more."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(dlq)
        dead = None
        for _ in range(100):
            dead = await queue.get(no_ack=True, fail=False)
            if dead is not None:
                break
            await asyncio.sleep(0.1)
        assert dead is not None, f"nothing was dead-lettered to {dlq}"
        assert await queue.get(no_ack=True, fail=False) is None, f"more than one in {dlq}"
    return dead


@contextlib.asynccontextmanager
async def collecting(amqp_url: str, *bindings: tuple[str, str]
                     ) -> AsyncIterator[list[Envelope]]:
    """Every envelope published to the `(exchange, routing key)` bindings while inside, in the
    order the broker took them (an exclusive queue of the test's own)."""
    seen: list[Envelope] = []
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        for exchange, key in bindings:
            await queue.bind(exchange, routing_key=key)

        async def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            seen.append(Envelope.from_json(message.body))

        await queue.consume(collect, no_ack=True)
        yield seen
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def gateway_against(settings: Settings,
                          **fakes: Mapping[type[Query], QueryHandler]
                          ) -> AsyncIterator[httpx.AsyncClient]:
    """A real gateway whose services are `fakes` (query handlers by service name); yields an
    admin's HTTP client to it."""
    bus = AmqpBus(settings, "fakes")
    for service, handlers in fakes.items():
        bus.serve(rpc_queue(service), handlers)
    await bus.start()
    port = free_port()
    gateway = GatewayService(settings.model_copy(update={"http_port": port,
                                                         "admin_token": TOKEN}))
    await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            yield http
    finally:
        await gateway.stop()
        await bus.close()


def stop(worker_id: str) -> Envelope:
    """A StopRunner of `worker_id`, as the gateway sends it."""
    return Envelope.wrap(StopRunner(worker_id=worker_id, flatten=False, reason="test"),
                         stream=f"job-{worker_id}")


async def stops_collected(settings: Settings, name: str, received: list[str]) -> AmqpBus:
    """A started bus consuming the scheduler's inbox: the worker ids of the stops it gets go to
    `received`."""
    bus = AmqpBus(settings, name)

    async def collect(deliveries: list[Delivery]) -> None:
        received.extend(d.message.worker_id for d in deliveries  # type: ignore[attr-defined]
                        if isinstance(d.message, StopRunner))

    bus.consume_batches(SCHEDULER_INBOX, collect)
    await bus.start()
    return bus
