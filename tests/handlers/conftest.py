"""Services on the in-memory bus: their handlers' behaviour without a broker. Each test gets its
own `MemoryBroker` (a vhost of its own) and data directory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from events import Envelope, Message
from events.routing import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from services.memory_bus import MemoryBroker, MemoryBus, settled
from services.service import Service
from services.settings import Settings

S = TypeVar("S", bound=Service)


class Harness:
    """A `MemoryBroker`, the services started on it, and a bus of the test's own that sees every
    command and event published (`seen`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker = MemoryBroker()
        self.bus = MemoryBus(self.broker, settings, "test")
        self.services: list[Service] = []
        self.seen: list[Envelope] = []

    async def open(self) -> None:
        await self.bus.start()
        await self.bus.watch(((COMMANDS_EXCHANGE, "#"), (EVENTS_EXCHANGE, "#")),
                             lambda body: self.seen.append(Envelope.from_json(body)))

    async def start(self, kind: type[S], settings: Settings | None = None, **wiring: Any) -> S:
        settings = settings or self.settings
        service = kind(settings, bus=MemoryBus(self.broker, settings, kind.name), **wiring)
        await service.start()
        self.services.append(service)
        return service

    async def stop(self, service: Service) -> None:
        await service.stop()
        self.services.remove(service)

    async def close(self) -> None:
        for service in reversed(self.services):
            await service.stop()
        await self.bus.close()

    async def settle(self, timeout: float = 5.0) -> None:
        """Every message published so far has had its effect, and what that emitted too."""
        await settled(self.broker, *self.services, timeout=timeout)

    async def send(self, message: Message, *, user_id: str | None = None,
                   stream: str | None = None, correlation_id: str | None = None) -> Envelope:
        """Publish `message` as a client would, and wait for its effects."""
        job_id = getattr(message, "job_id", None)
        envelope = Envelope.wrap(message, stream=stream or f"job-{job_id}", user_id=user_id,
                                 correlation_id=correlation_id or job_id)
        await self.bus.publish(envelope)
        await self.settle()
        return envelope

    def types(self, *, about: str | None = None) -> list[str]:
        """The types of what was published, in order (only about one job, with `about`)."""
        return [e.type for e in self.seen if about is None or e.correlation_id == about]

    def of(self, kind: type[Message]) -> list[Any]:
        return [e.message() for e in self.seen if e.type == kind.type_name()]

    async def until(self, condition: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if loop.time() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)


def fast(data_dir: Path, **overrides: Any) -> Settings:
    """Seed defaults shrunk so failure paths play out in a fraction of a second."""
    return Settings(**{
        "amqp_url": "amqp://memory/", "data_dir": data_dir, "heartbeat_interval": 0.2,
        "heartbeat_timeout": 1.5, "host_heartbeat_interval": 0.2, "host_timeout": 1.5,
        "host_lease": 3.0, "restart_backoff": 0.05, "restart_backoff_max": 0.2,
        "stop_grace": 2.0, "request_timeout": 5.0, "handler_attempts": 3, **overrides})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return fast(tmp_path / "var")


@pytest.fixture
async def harness(settings: Settings) -> AsyncIterator[Harness]:
    bench = Harness(settings)
    await bench.open()
    yield bench
    await bench.close()


def ids(messages: Iterable[Message]) -> list[str]:
    return [getattr(m, "worker_id", "") for m in messages]


class ManualClock:
    """A service's clock that moves only when the test says so."""

    def __init__(self) -> None:
        from datetime import UTC, datetime

        self.now = datetime.now(UTC)

    def __call__(self) -> Any:
        return self.now

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self.now += timedelta(seconds=seconds)
