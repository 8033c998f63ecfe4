"""The bus in memory, for handler tests without a broker. `MemoryBus` has `AmqpBus`'s delivery
semantics: topic routing with the topology's bindings, an unroutable publish refused, batches
acked after the handler returns, failed and unacked deliveries redelivered at the head of their
queue with their delivery count, poison and repeated failures dead-lettered with the reason,
order per queue, transient telemetry, request/reply with typed refusals. The `MemoryBroker`
the buses of one test share stands for one vhost."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from events import Envelope, Message, UnknownMessageType, model_for
from events.queries import Query
from events.routing import DEAD_LETTER_EXCHANGE, RPC_EXCHANGE, exchange_for, routing_key
from services.bus import (
    BatchHandler,
    BusUnavailable,
    Delivery,
    PublishFailed,
    QueryHandler,
    RawJson,
    Reply,
    RpcError,
    RpcTimeout,
    TelemetryHandler,
    WatchCallback,
    answer,
    decode_delivery,
    decoded,
    inflated,
    poison_reason,
    redelivery_backoff,
    reply_body,
)
from services.settings import Settings
from services.topology import STATIC_QUEUES, QueueSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stored:
    """A message in a queue, with the properties a consumer reads."""

    body: bytes
    type: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    exchange: str = ""
    routing_key: str = ""
    delivery_count: int = 0
    reply: asyncio.Future[Reply] | None = None

    def returned(self) -> Stored:
        return replace(self, delivery_count=self.delivery_count + 1,
                       headers={**self.headers, "x-delivery-count": self.delivery_count + 1})


class MemoryQueue:
    def __init__(self, spec: QueueSpec) -> None:
        self.spec = spec
        self.messages: deque[Stored] = deque()
        self.arrived = asyncio.Event()
        self.consumers = 0

    def put(self, message: Stored, *, at_head: bool = False) -> None:
        if at_head:
            self.messages.appendleft(message)
        else:
            self.messages.append(message)
            if self.spec.max_length is not None and len(self.messages) > self.spec.max_length:
                self.messages.popleft()  # drop-head, as the topology asks
        self.arrived.set()

    def take(self, most: int) -> list[Stored]:
        taken = [self.messages.popleft() for _ in range(min(most, len(self.messages)))]
        if not self.messages:
            self.arrived.clear()
        return taken


@functools.lru_cache(maxsize=4096)
def topic_matches(binding: str, routing_key: str) -> bool:
    """Whether a topic exchange routes `routing_key` to `binding` (`*` one word, `#` any)."""

    def match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
        if not pattern:
            return not words
        if pattern[0] == "#":
            return any(match(pattern[1:], words[i:]) for i in range(len(words) + 1))
        return bool(words) and pattern[0] in ("*", words[0]) and match(pattern[1:], words[1:])

    return match(tuple(binding.split(".")), tuple(routing_key.split(".")))


class MemoryBroker:
    """Exchanges, queues and bindings in memory (one vhost); see module doc."""

    def __init__(self) -> None:
        self.queues: dict[str, MemoryQueue] = {}
        self._bindings: list[tuple[str, str, str]] = []  # exchange, binding key, queue
        self.busy = 0  # deliveries being handled now
        self._online = asyncio.Event()
        self._online.set()
        self._buses: list[MemoryBus] = []

    @property
    def online(self) -> bool:
        return self._online.is_set()

    def go_offline(self) -> None:
        """An outage: every publish and call fails with `BusUnavailable` until `go_online`."""
        self._online.clear()

    def go_online(self) -> None:
        """The outage ends: each bus's `on_reconnected` callbacks run."""
        if not self._online.is_set():
            self._online.set()
            for bus in self._buses:
                bus.reconnected()

    def declare(self, spec: QueueSpec) -> MemoryQueue:
        queue = self.queues.get(spec.name)
        if queue is None:
            queue = self.queues[spec.name] = MemoryQueue(spec)
        for exchange, key in spec.bindings:
            if (exchange, key, spec.name) not in self._bindings:
                self._bindings.append((exchange, key, spec.name))
        return queue

    def delete(self, name: str) -> None:
        self.queues.pop(name, None)
        self._bindings = [b for b in self._bindings if b[2] != name]

    def route(self, exchange: str, routing_key: str, message: Stored) -> bool:
        """Put `message` in every queue bound to it; False when none is."""
        if not self.online:
            raise BusUnavailable("broker unreachable")
        targets = list(dict.fromkeys(
            queue for source, key, queue in self._bindings
            if source == exchange and topic_matches(key, routing_key)))
        for name in targets:
            self.queues[name].put(replace(message, exchange=exchange, routing_key=routing_key))
        return bool(targets)

    def idle(self) -> bool:
        """Nothing waiting in a consumed queue and nothing being handled."""
        return self.busy == 0 and not any(q.messages for q in self.queues.values() if q.consumers)

    def dead_letters(self, service: str) -> list[Stored]:
        """What waits in `dlq.<service>` (taken out)."""
        queue = self.queues.get(f"dlq.{service}")
        return queue.take(len(queue.messages)) if queue else []


class MemoryBus:
    """A service's bus on a `MemoryBroker` (the `services.bus.Bus` interface)."""

    def __init__(self, broker: MemoryBroker, settings: Settings, service: str) -> None:
        self.broker, self.settings, self.service = broker, settings, service
        self._starts: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._reconnected: list[Callable[[], None]] = []
        broker._buses.append(self)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        for spec in STATIC_QUEUES:
            self.broker.declare(spec)
        for start in self._starts:
            await start()
        self._started = True

    def connected(self) -> bool:
        return self._started and self.broker.online

    async def until_connected(self, timeout: float | None = None) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.broker._online.wait(), timeout)
        return self.broker.online

    def on_reconnected(self, callback: Callable[[], None]) -> None:
        self._reconnected.append(callback)

    def reconnected(self) -> None:
        if self._started:
            for callback in self._reconnected:
                callback()

    async def stop_consuming(self) -> None:
        """Stop every consumer; what it held unacked goes back to its queue (redelivered)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        await self.stop_consuming()
        self._started = False
        with contextlib.suppress(ValueError):
            self.broker._buses.remove(self)

    async def declare(self, spec: QueueSpec) -> None:
        self.broker.declare(spec)

    # ---------------------------------------------------------------- publishing

    async def publish(self, envelope: Envelope) -> None:
        await self.publish_many([envelope])

    async def publish_many(self, envelopes: Iterable[Envelope]) -> None:
        """Route them all in order, then yield once, as a confirm's round trip would."""
        for envelope in envelopes:
            model = model_for(envelope.type)
            key = routing_key(model, envelope.payload)
            if not self.broker.route(exchange_for(model), key,
                                     Stored(envelope.to_json(), envelope.type,
                                            {"app_id": self.service})):
                raise PublishFailed(f"unroutable: no queue bound to {exchange_for(model)}/{key}")
        await asyncio.sleep(0)

    async def send_telemetry(self, message: Message) -> None:
        kind = type(message)
        self.broker.route(exchange_for(kind), routing_key(kind, message),
                          Stored(message.model_dump_json().encode(), message.type_name()))

    # ---------------------------------------------------------------- consuming

    def consume_batches(self, spec: QueueSpec, handler: BatchHandler, *, max_batch: int = 1000,
                        linger: float = 0.0, prefetch: int | None = None) -> None:
        async def start() -> None:
            queue = self.broker.declare(spec)
            self._consume(queue, lambda: self._batches(queue, handler, max_batch),
                          f"{spec.name}-batches")

        self._starts.append(start)

    def subscribe_telemetry(self, spec: QueueSpec, handler: TelemetryHandler) -> None:
        async def start() -> None:
            queue = self.broker.declare(spec)
            self._consume(queue, lambda: self._samples(queue, handler), f"{spec.name}-telemetry")

        self._starts.append(start)

    async def watch(self, bindings: Iterable[tuple[str, str]], callback: WatchCallback) -> None:
        spec = QueueSpec(f"{self.service}.watch.{uuid.uuid4().hex[:12]}",
                         bindings=tuple(bindings), kind="transient", auto_delete=True)
        queue = self.broker.declare(spec)

        async def view(message: Stored) -> None:
            result = callback(message.body)
            if asyncio.iscoroutine(result):
                await result

        self._consume(queue, lambda: self._each(queue, view), spec.name)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))  # type: ignore[arg-type]

    def _consume(self, queue: MemoryQueue, consumer: Callable[[], Awaitable[None]],
                 name: str) -> None:
        """Run `consumer()` on `queue` until this bus stops consuming."""
        async def consuming() -> None:
            queue.consumers += 1
            try:
                await consumer()
            finally:
                queue.consumers -= 1

        self._spawn(consuming(), name)

    async def _batches(self, queue: MemoryQueue, handler: BatchHandler, max_batch: int) -> None:
        while True:
            await queue.arrived.wait()
            if not queue.messages:
                continue
            unacked = queue.take(max_batch)
            self.broker.busy += 1
            try:
                unacked = await self._handle(queue, handler, unacked)  # the rest is acked
                if unacked:
                    await asyncio.sleep(redelivery_backoff(max(m.delivery_count + 1
                                                               for m in unacked)))
            finally:  # nacked, or the consumer went away: redelivered, at the head
                for message in reversed(unacked):
                    queue.put(message.returned(), at_head=True)
                self.broker.busy -= 1

    async def _handle(self, queue: MemoryQueue, handler: BatchHandler,
                      batch: list[Stored]) -> list[Stored]:
        """Handle one batch; returns the deliveries to redeliver (the rest are acked)."""
        deliveries: list[Delivery] = []
        delivered: list[Stored] = []
        for message in batch:
            try:
                deliveries.append(decode_delivery(message.body))
                delivered.append(message)
            except (ValidationError, UnknownMessageType, ValueError) as exc:
                self._dead_letter(queue, message, poison_reason(exc))
        if not deliveries:
            return []
        try:
            failed = await handler(deliveries) or {}
        except Exception as exc:
            failed = dict.fromkeys(range(len(deliveries)), poison_reason(exc))
        retry = []
        for index, reason in failed.items():
            message, attempt = delivered[index], delivered[index].delivery_count + 1
            if attempt >= self.settings.handler_attempts:
                log.error("%s: %s failed %d times, dead-lettered: %s", queue.spec.name,
                          deliveries[index].envelope.type, attempt, reason)
                self._dead_letter(queue, message, f"handler failed {attempt} times: {reason}")
            else:
                retry.append(message)
        return retry

    def _dead_letter(self, queue: MemoryQueue, message: Stored, reason: str) -> None:
        headers = {**message.headers, "x-poison-reason": reason,
                   "x-poison-service": self.service,
                   "x-original-exchange": message.exchange,
                   "x-original-routing-key": message.routing_key}
        self.broker.route(DEAD_LETTER_EXCHANGE, queue.spec.name, replace(message, headers=headers))

    async def _samples(self, queue: MemoryQueue, handler: TelemetryHandler) -> None:
        async def sample(message: Stored) -> None:
            try:
                decoded_sample = model_for(message.type or "").model_validate_json(message.body)
            except (ValidationError, UnknownMessageType, ValueError):
                return
            result = handler(decoded_sample)
            if asyncio.iscoroutine(result):
                await result

        await self._each(queue, sample)

    async def _each(self, queue: MemoryQueue, handle: Callable[[Stored], Awaitable[None]]) -> None:
        while True:
            await queue.arrived.wait()
            for message in queue.take(len(queue.messages)):
                self.broker.busy += 1
                try:
                    await handle(message)
                finally:
                    self.broker.busy -= 1

    # ---------------------------------------------------------------- request / reply

    def serve(self, spec: QueueSpec, handlers: Mapping[type[Query], QueryHandler]) -> None:
        async def start() -> None:
            queue = self.broker.declare(spec)

            async def respond(message: Stored) -> None:
                reply = await answer(handlers, message.type or "", message.body, spec.name)
                if message.reply is not None and not message.reply.done():
                    message.reply.set_result(reply)

            async def serve_all() -> None:
                while True:
                    await queue.arrived.wait()
                    for message in queue.take(len(queue.messages)):
                        self._spawn(respond(message), f"{spec.name}-answer")

            self._consume(queue, serve_all, f"{spec.name}-server")

        self._starts.append(start)

    async def request(self, spec: QueueSpec, query: Query, timeout: float | None = None) -> Any:
        return decoded(await self.request_raw(spec, query, timeout), spec.name)

    async def request_raw(self, spec: QueueSpec, query: Query,
                          timeout: float | None = None) -> RawJson:
        body, encoding = await self.request_encoded(spec, query, timeout)
        return RawJson(inflated(body, encoding))

    async def request_encoded(self, spec: QueueSpec, query: Query,
                              timeout: float | None = None) -> tuple[bytes, str | None]:
        reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        try:
            self.broker.route(RPC_EXCHANGE, spec.name,
                              Stored(query.model_dump_json().encode(), query.type_name(),
                                     reply=reply))
        except BusUnavailable:
            raise
        except PublishFailed as exc:
            raise RpcError(f"{spec.name}: the bus is unavailable ({exc})") from None
        try:
            answered = await asyncio.wait_for(reply, timeout or self.settings.request_timeout)
        except TimeoutError:
            raise RpcTimeout(f"{spec.name} did not answer in time") from None
        return reply_body(answered, spec.name)


async def settled(broker: MemoryBroker, *services: Any, timeout: float = 5.0) -> None:
    """Wait until nothing is queued, handled, committing or left to publish by `services`: every
    message the last action caused has had its effect. Raises TimeoutError past `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    quiet = 0
    while quiet < 3:  # idle for a few turns of the loop: nothing was about to start
        busy = not broker.idle() or any(service.busy for service in services)
        quiet = 0 if busy else quiet + 1
        if loop.time() > deadline:
            raise TimeoutError("the memory bus did not settle")
        await asyncio.sleep(0 if quiet else 0.001)
