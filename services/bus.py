"""The one publish path and the one consume path. FastStream's RabbitBroker holds the robust
connection, declares the topology and publishes; every consumer is a plain aio-pika one.

Publishing: persistent messages, publisher confirms awaited, an unroutable (returned) or nacked
publish raises `PublishFailed` — never silence. `publish_many` pipelines confirms.

Consuming (`consume_batches`; every service inbox and the event log): the deliveries that have
arrived are handed over as one batch, committed by the handler in one transaction (group commit),
and acked after it returns, with one `basic.ack(multiple=True)` for the batch's last delivery,
which acks exactly that batch (class doc of `_BatchConsumer`). A message that cannot be decoded
(bad JSON, unknown type, invalid payload) is dead-lettered at once with its reason; a delivery the
handler could not commit is retried with a short backoff and dead-lettered with the error after
`handler_attempts` deliveries, while the rest of its batch is acked. Poison never crash-loops a
consumer and never vanishes. It runs on aio-pika directly, on a channel of its own with one
consumer: FastStream's per-message handler stack cost more CPU than recording the message.

Request/reply: direct reply-to over aio-pika, many calls in flight at once on both sides
(FastStream's `broker.request` is serialised by a lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import orjson
from aiormq.abc import DeliveredMessage
from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from pydantic import ValidationError
from yarl import URL

from events import Envelope, Message, UnknownMessageType, model_for
from events.routing import DEAD_LETTER_EXCHANGE, exchange_for, routing_key_for
from services import metrics
from services.settings import Settings
from services.topology import EXCHANGES, STATIC_QUEUES, QueueSpec

log = logging.getLogger(__name__)

TelemetryHandler = Callable[[Message], Awaitable[None] | None]
RpcHandler = Callable[[dict[str, Any]], Awaitable[Any]]

REPLY_TO = "amq.rabbitmq.reply-to"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message of a batch, decoded and validated."""

    envelope: Envelope
    message: Message


# Returns the deliveries (by index in the batch) it could not commit, with why; raising means
# none of the batch was committed.
BatchHandler = Callable[[list[Delivery]], Awaitable[Mapping[int, str] | None]]


COMPRESS_REPLIES_FROM = 32 * 1024  # bytes
AMQP_HEARTBEAT = 10  # seconds; RabbitMQ's 60 s default notices a silently cut link too late


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=str)


def with_heartbeat(amqp_url: str) -> str:
    """The broker URL with an AMQP heartbeat, unless it sets one itself."""
    url = URL(amqp_url)
    return amqp_url if "heartbeat" in url.query else str(url.update_query(heartbeat=AMQP_HEARTBEAT))


class PublishFailed(RuntimeError):
    """The broker did not take responsibility for a message (nacked, returned, or lost)."""


class RpcError(RuntimeError):
    """A request/reply call failed or timed out; the message says why, without internals."""


class RpcTimeout(RpcError):
    """No answer came in time (the service may still act on the request)."""


class RawJson(bytes):
    """An RPC result already encoded as JSON: replied as is, and `Bus.request_raw` hands it
    on as is (a large status document is never decoded and re-encoded on its way)."""


def poison_reason(exc: BaseException) -> str:
    """A short, secret-free description of why a message is poison."""
    if isinstance(exc, ValidationError):
        fields = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        return f"invalid message: {fields}"[:500]
    if isinstance(exc, UnknownMessageType):
        return f"unknown type: {exc}"[:500]
    return f"{type(exc).__name__}: {exc}"[:500]


class Bus:
    """A service's connection to the bus: declares its topology, publishes, consumes, calls."""

    def __init__(self, settings: Settings, service: str) -> None:
        self.settings = settings
        self.service = service
        self.broker = RabbitBroker(
            with_heartbeat(settings.amqp_url),
            app_id=service,
            reconnect_interval=1.0,
            graceful_timeout=max(settings.stop_grace, 5.0),
            logger=logging.getLogger(f"faststream.{service}"),
            log_level=logging.DEBUG,
        )
        self._queues: list[QueueSpec] = []
        self._declared: list[Any] = []  # robust objects are restored only while referenced
        self._pending: dict[str, asyncio.Future[aio_pika.abc.AbstractIncomingMessage]] = {}
        self._rpc_channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._publish_channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._consumers: list[_BatchConsumer | _TelemetryConsumer | _RpcServer] = []
        self._started = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect, declare exchanges and this service's queues and bindings, start consumers."""
        await self.broker.connect()
        for spec in EXCHANGES:
            self._declared.append(await self.broker.declare_exchange(_exchange(spec.name)))
        # The whole static topology, not only our queues: whichever service starts first, no
        # message for another one is lost for want of its queue.
        for spec in (*STATIC_QUEUES, *self._queues):
            await self._declare_bindings(spec)
        self._publish_channel = await self._channel()
        await self.broker.start()
        for consumer in self._consumers:
            await consumer.start()
        self._started = True

    def connected(self) -> bool:
        """Whether the broker connection is up right now (for fencing decisions)."""
        connection = getattr(self.broker, "_connection", None)
        return bool(
            connection is not None and not connection.is_closed and connection.connected.is_set()
        )

    async def stop_consuming(self) -> None:
        """Cancel our consumers and wait for in-flight handlers (up to the graceful timeout)."""
        for consumer in self._consumers:
            await consumer.stop(self.broker.config.graceful_timeout or 5.0)

    async def close(self) -> None:
        """Stop consuming, let in-flight handlers finish (graceful timeout), disconnect."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RpcError("bus closed"))
        for consumer in self._consumers:
            await consumer.stop(self.broker.config.graceful_timeout or 5.0)
        await self.broker.stop()
        self._started = False

    async def _channel(self, prefetch: int | None = None) -> aio_pika.abc.AbstractRobustChannel:
        """A new channel, each call (FastStream's `Channel` settings hash by identity): keep it."""
        return await self.broker.config.channel_manager.get_channel(
            Channel(prefetch_count=prefetch)
        )

    async def _declare_bindings(self, spec: QueueSpec) -> None:
        queue = await self.broker.declare_queue(_queue(spec))
        self._declared.append(queue)
        for exchange, key in spec.bindings:
            await queue.bind(exchange, routing_key=key)

    async def declare(self, spec: QueueSpec) -> None:
        """Declare a queue and its bindings now (for queues no handler of ours consumes)."""
        await self._declare_bindings(spec)

    # ---------------------------------------------------------------- publishing

    async def publish(self, envelope: Envelope) -> None:
        """Publish one message and wait for the broker's confirm. Raises `PublishFailed`."""
        model = model_for(envelope.type)
        await self._publish_raw(
            envelope.to_json(),
            exchange=exchange_for(model),
            routing_key=routing_key_for(model),
            persistent=model.kind != "telemetry",
            message_id=str(envelope.event_id),
            message_type=envelope.type,
        )

    async def publish_many(self, envelopes: Iterable[Envelope]) -> None:
        """Publish in order with pipelined confirms; raises if any one was not confirmed."""
        results = await asyncio.gather(
            *(self.publish(e) for e in envelopes), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise PublishFailed(f"{len(failures)} of {len(results)} not confirmed: {failures[0]}")

    async def send_telemetry(self, message: Message) -> None:
        """Transient telemetry (dropped when nobody listens), returning once the broker has
        confirmed it: a host renews its lease on its heartbeat's confirm."""
        if self._publish_channel is None:
            return
        exchange = await self._publish_channel.get_exchange(
            exchange_for(type(message)), ensure=False
        )
        await exchange.publish(
            aio_pika.Message(
                message.model_dump_json().encode(),
                type=message.type_name(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            ),
            routing_key=routing_key_for(type(message)),
            mandatory=False,
        )

    async def _publish_raw(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        persistent: bool = True,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        message_type: str | None = None,
    ) -> None:
        channel = self._publish_channel
        if channel is None:
            raise PublishFailed("bus not started")
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            if persistent
            else aio_pika.DeliveryMode.NOT_PERSISTENT,
            headers=headers,
            message_id=message_id,
            type=message_type,
            app_id=self.service,
        )
        try:
            target = self._exchanges.get(exchange)
            if target is None:
                target = self._exchanges[exchange] = await channel.get_exchange(
                    exchange, ensure=False
                )
            result = await target.publish(
                message,
                routing_key=routing_key,
                mandatory=True,
                timeout=self.settings.request_timeout,
            )
        except Exception as exc:  # connection loss, nack, timeout: the caller must retry
            raise PublishFailed(f"publish to {exchange}/{routing_key} failed: {exc!r}") from exc
        if isinstance(result, DeliveredMessage):
            raise PublishFailed(f"unroutable: no queue bound to {exchange}/{routing_key}")

    # ---------------------------------------------------------------- consuming

    def consume_batches(self, spec: QueueSpec, handler: BatchHandler, *, max_batch: int = 1000,
                        linger: float = 0.0, prefetch: int | None = None) -> None:
        """Consume `spec` in batches: `handler(deliveries)` gets the decoded messages that have
        arrived (up to `max_batch`; what came while the previous batch committed, and, with a
        `linger`, what comes that much longer while the consumer is behind) and commits them;
        they are acked once it returns. Poison is dead-lettered with its reason; a delivery
        the handler reports failed (or all of them, if it raises) is retried and, after
        `handler_attempts` deliveries, dead-lettered with the error, while the rest of its batch
        is acked. `prefetch` [2 × max_batch] lets the next batch arrive while one commits."""
        self._queues.append(spec)
        self._consumers.append(_BatchConsumer(
            self, spec, handler, max_batch=max_batch, linger=linger,
            prefetch=prefetch or 2 * max_batch))

    def subscribe_telemetry(self, spec: QueueSpec, handler: TelemetryHandler) -> None:
        """Consume transient telemetry without acks; undecodable samples are dropped (they carry
        no history, and the next sample replaces a lost one)."""
        self._queues.append(spec)
        self._consumers.append(_TelemetryConsumer(self, spec, handler))

    async def _dead_letter(
        self, spec: QueueSpec, raw: aio_pika.abc.AbstractIncomingMessage, reason: str
    ) -> None:
        headers = dict(raw.headers or {})
        headers |= {
            "x-poison-reason": reason,
            "x-poison-service": self.service,
            "x-original-exchange": raw.exchange or "",
            "x-original-routing-key": raw.routing_key or "",
        }
        await self._publish_raw(
            raw.body,
            exchange=DEAD_LETTER_EXCHANGE,
            routing_key=spec.name,
            headers=headers,
            message_id=raw.message_id,
            message_type=raw.type,
        )

    async def watch(
        self,
        bindings: Iterable[tuple[str, str]],
        callback: Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]],
    ) -> None:
        """Look at traffic without taking it from anyone (viewers such as `runner events tail`):
        a private exclusive auto-delete queue bound to `bindings`, consumed with auto-ack."""
        channel = await self._channel(prefetch=1000)
        # named by us: a robust channel cannot re-declare a server-named (amq.gen-*) queue
        queue = await channel.declare_queue(
            f"{self.service}.watch.{uuid.uuid4().hex[:12]}",
            exclusive=True,
            auto_delete=True,
            durable=False,
        )
        self._declared.append(queue)
        for exchange, key in bindings:
            await queue.bind(exchange, routing_key=key)
        await queue.consume(callback, no_ack=True)

    # ---------------------------------------------------------------- request / reply

    def serve(self, spec: QueueSpec, handler: RpcHandler) -> None:
        """Answer JSON requests on `spec`: the reply's body is the handler's result as JSON
        (a `RawJson` result as is) with header `ok` true, or the error message as a JSON string
        with `ok` false. Replies from `COMPRESS_REPLIES_FROM` bytes on (a status of a thousand
        workers, a page of the log) are deflated; `request_raw` inflates them."""
        self._queues.append(spec)
        self._consumers.append(_RpcServer(self, spec, handler))

    async def request(self, queue: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """Call a service's RPC queue; returns its result or raises `RpcError` with its error."""
        raw = await self.request_raw(queue, body, timeout)
        try:
            return orjson.loads(memoryview(raw))  # orjson takes no bytes subclass
        except ValueError:
            raise RpcError(f"{queue} sent a malformed reply") from None

    async def request_raw(
        self, queue: str, body: dict[str, Any], timeout: float | None = None
    ) -> RawJson:
        """`request`, with the result as the JSON bytes it came in."""
        reply, encoding = await self.request_encoded(queue, body, timeout)
        return RawJson(_inflated(reply, encoding))

    async def request_encoded(
        self, queue: str, body: dict[str, Any], timeout: float | None = None
    ) -> tuple[bytes, str | None]:
        """`request_raw`, with the result as it travelled: its JSON bytes, deflated (encoding
        "deflate") from `COMPRESS_REPLIES_FROM` bytes on, else as they are (None); for callers
        that pass a large reply on as it is (the gateway, to an HTTP client accepting it)."""
        channel = await self._reply_channel()
        called = time.perf_counter()
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[aio_pika.abc.AbstractIncomingMessage] = (
            asyncio.get_running_loop().create_future())
        self._pending[correlation_id] = future
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    _dumps(body),
                    correlation_id=correlation_id,
                    reply_to=REPLY_TO,
                    content_type="application/json",
                    expiration=timeout or self.settings.request_timeout,
                ),
                routing_key=queue,
                mandatory=False,
            )
            reply = await asyncio.wait_for(future, timeout or self.settings.request_timeout)
        except TimeoutError:
            metrics.rpc_called(self.service, queue, body, time.perf_counter() - called, "timeout")
            raise RpcTimeout(f"{queue} did not answer in time") from None
        finally:
            self._pending.pop(correlation_id, None)
        metrics.rpc_called(self.service, queue, body, time.perf_counter() - called,
                           "ok" if reply.headers.get("ok") is True else "error")
        encoding = reply.content_encoding or None
        if encoding not in (None, "deflate"):
            raise RpcError(f"{queue} sent a reply in an unknown encoding {encoding!r}")
        if reply.headers.get("ok") is not True:
            try:
                error = orjson.loads(_inflated(reply.body, encoding))
            except ValueError:
                error = None
            raise RpcError(error if isinstance(error, str) else "request failed")
        return reply.body, encoding

    async def _reply_channel(self) -> aio_pika.abc.AbstractRobustChannel:
        if self._rpc_channel is None or self._rpc_channel.is_closed:
            channel = await self._channel()
            # a passive declare registers the pseudo-queue with the robust channel, so its
            # consumer is restored after a reconnect (ensure=False was not: replies then failed)
            queue = await channel.get_queue(REPLY_TO)
            await queue.consume(self._on_reply, no_ack=True)
            self._rpc_channel = channel
            self._declared.append(queue)
        return self._rpc_channel

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)


def _inflated(body: bytes, encoding: str | None) -> bytes:
    if encoding is None:
        return body
    try:
        return zlib.decompress(body)
    except zlib.error:
        raise RpcError("malformed reply (bad deflate data)") from None


class _BatchConsumer:
    """`Bus.consume_batches`: one task takes every delivery that has arrived (up to
    `max_batch`), runs the handler on them in delivery order, settles them, and takes the next.
    So a batch holds what arrived while the previous one committed: a lone message at idle is
    handled at once, and under load batches grow by themselves (natural batching). With a
    `linger`, a consumer that is behind (messages were waiting when it finished a batch) also
    waits that long for a batch to fill: fewer, larger commits when throughput matters, and no
    delay at all when it does not.

    Why one multiple-ack is exact: the channel is ours alone (FastStream's channel manager keys
    channels by `Channel` instance) and carries this one consumer, so its delivery tags number
    exactly our deliveries, in order. A batch is a run of consecutive deliveries, and every
    earlier delivery has been settled (acked, dead-lettered or nacked) before the batch commits,
    so acking the batch's highest tag with `multiple=True` acks this batch and nothing else: no
    message is acked before the transaction holding it has committed. After a reconnect the new
    channel numbers its deliveries from 1 again; messages that came on the old channel cannot be
    settled any more and are skipped (the broker redelivers them; the handler must be idempotent,
    as every consumer here is).
    """

    def __init__(self, bus: Bus, spec: QueueSpec, handler: BatchHandler, *, max_batch: int,
                 linger: float, prefetch: int) -> None:
        self.bus, self.spec, self.handler = bus, spec, handler
        self.max_batch, self.linger, self.prefetch = max_batch, linger, prefetch
        self._incoming: deque[aio_pika.abc.AbstractIncomingMessage] = deque()
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._subscription = _Subscription(bus, spec)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"{self.spec.name}-batches")
        await self._subscription.consume(self._on_message, prefetch=self.prefetch, no_ack=False)

    async def stop(self, timeout: float) -> None:
        """Stop receiving, commit and settle what has arrived, then end (graceful)."""
        if self._task is None:
            return
        self._stopping = True
        await self._subscription.cancel(timeout)
        self._arrived.set()
        self._full.set()
        task, self._task = self._task, None
        _, pending = await asyncio.wait({task}, timeout=timeout)
        if pending:  # unsettled deliveries are redelivered once the channel closes
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._incoming.append(message)
        self._arrived.set()
        if len(self._incoming) >= self.max_batch:
            self._full.set()

    async def _run(self) -> None:
        incoming, behind = self._incoming, False
        while True:
            if not incoming:
                if self._stopping:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if behind and self.linger > 0 and len(incoming) < self.max_batch and (
                    not self._stopping):
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.linger)
            batch = [incoming.popleft() for _ in range(min(len(incoming), self.max_batch))]
            try:
                await self._process(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # unsettled: redelivered when the channel closes
                log.exception("%s: settling a batch of %d failed", self.spec.name, len(batch))
            behind = bool(incoming)

    async def _process(self, raws: list[aio_pika.abc.AbstractIncomingMessage]) -> None:
        begun = time.perf_counter()
        deliveries: list[Delivery] = []
        delivered: list[aio_pika.abc.AbstractIncomingMessage] = []
        dead: list[tuple[aio_pika.abc.AbstractIncomingMessage, str]] = []
        for raw in raws:
            try:
                envelope = Envelope.from_json(raw.body)
                deliveries.append(Delivery(envelope, envelope.message()))
                delivered.append(raw)
            except (ValidationError, UnknownMessageType, ValueError) as exc:
                dead.append((raw, poison_reason(exc)))
        failed: Mapping[int, str] = {}
        if deliveries:
            try:
                failed = await self.handler(deliveries) or {}
            except Exception as exc:
                failed = dict.fromkeys(range(len(deliveries)), poison_reason(exc))
        retry: list[aio_pika.abc.AbstractIncomingMessage] = []
        attempts_allowed = self.bus.settings.handler_attempts
        for index, reason in failed.items():
            raw = delivered[index]
            attempt = int((raw.headers or {}).get("x-delivery-count") or 0) + 1
            if attempt >= attempts_allowed:
                log.error("%s: %s failed %d times, dead-lettered: %s", self.spec.name,
                          deliveries[index].envelope.type, attempt, reason)
                dead.append((raw, f"handler failed {attempt} times: {reason}"))
            else:
                log.warning("%s: %s failed (delivery %d), will retry: %s", self.spec.name,
                            deliveries[index].envelope.type, attempt, reason)
                retry.append(raw)
        if dead:
            results = await asyncio.gather(
                *(self.bus._dead_letter(self.spec, raw, reason) for raw, reason in dead),
                return_exceptions=True)
            retry += [raw for (raw, _), result in zip(dead, results, strict=True)
                      if isinstance(result, BaseException)]
        if retry:
            worst = max(int((r.headers or {}).get("x-delivery-count") or 0) + 1 for r in retry)
            await asyncio.sleep(min(0.05 * 2**worst, 2.0))
            for raw in retry:
                await _settle_quietly(raw.nack(requeue=True))
        await self._ack(raws, {id(raw) for raw in retry})
        metrics.batch_settled(self.bus.service, self.spec.name, len(raws), len(failed), len(dead),
                              time.perf_counter() - begun)

    @staticmethod
    async def _ack(raws: list[aio_pika.abc.AbstractIncomingMessage], settled: set[int]) -> None:
        """One `multiple` ack per channel at the highest tag to ack (see the class doc)."""
        last: dict[int, tuple[Any, int]] = {}
        for raw in raws:
            if id(raw) in settled or raw.delivery_tag is None:
                continue
            try:
                channel = raw.channel
            except aio_pika.exceptions.ChannelInvalidStateError:
                continue  # came on a channel that has closed: the broker redelivers it
            known = last.get(id(channel))
            if known is None or raw.delivery_tag > known[1]:
                last[id(channel)] = (channel, raw.delivery_tag)
        for channel, tag in last.values():
            await _settle_quietly(channel.basic_ack(delivery_tag=tag, multiple=True))


async def _settle_quietly(op: Awaitable[None]) -> None:
    try:
        await op
    except Exception:  # the channel may already be gone; the broker will redeliver
        pass


def _exchange(name: str) -> RabbitExchange:
    spec = next(e for e in EXCHANGES if e.name == name)
    return RabbitExchange(spec.name, type=ExchangeType(spec.type), durable=spec.durable)


def _queue(spec: QueueSpec) -> RabbitQueue:
    return RabbitQueue(
        spec.name,
        durable=spec.durable,
        auto_delete=spec.auto_delete,
        arguments=spec.arguments or None,
    )


class _Subscription:
    """A consumer on the queue `spec`, on a channel of its own; the robust queue stays referenced
    by the bus, so the consumer is restored after a reconnect."""

    def __init__(self, bus: Bus, spec: QueueSpec) -> None:
        self.bus, self.spec = bus, spec
        self._queue: aio_pika.abc.AbstractRobustQueue | None = None
        self._consumer_tag: str | None = None

    async def consume(self, callback: Callable[[Any], Awaitable[None]], *, prefetch: int,
                      no_ack: bool) -> None:
        channel = await self.bus._channel(prefetch=prefetch)
        self._queue = await channel.declare_queue(
            self.spec.name,
            durable=self.spec.durable,
            auto_delete=self.spec.auto_delete,
            arguments=self.spec.arguments or None,
        )
        self.bus._declared.append(self._queue)
        self._consumer_tag = await self._queue.consume(callback, no_ack=no_ack)

    async def cancel(self, timeout: float) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):  # the channel may be gone: nothing more arrives
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), timeout)
            self._consumer_tag = None


class _TelemetryConsumer:
    """`Bus.subscribe_telemetry`: decode each sample and hand it over; no acks (a sample lost to
    a crash is replaced by the next one)."""

    def __init__(self, bus: Bus, spec: QueueSpec, handler: TelemetryHandler) -> None:
        self.spec, self.handler = spec, handler
        self._subscription = _Subscription(bus, spec)
        self._prefetch = bus.settings.prefetch

    async def start(self) -> None:
        await self._subscription.consume(self._on_message, prefetch=self._prefetch, no_ack=True)

    async def stop(self, timeout: float) -> None:
        await self._subscription.cancel(timeout)

    async def _on_message(self, raw: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            message = model_for(raw.type or "").model_validate_json(raw.body)
        except (ValidationError, UnknownMessageType, ValueError) as exc:
            log.warning("%s: dropped telemetry sample: %s", self.spec.name, poison_reason(exc))
            return
        result = self.handler(message)
        if asyncio.iscoroutine(result):
            await result


class _RpcServer:
    """`Bus.serve`: answers each request as it comes (several at once, up to the prefetch) and
    acks it once answered; a plain aio-pika consumer, like the others."""

    def __init__(self, bus: Bus, spec: QueueSpec, handler: RpcHandler) -> None:
        self.bus, self.spec, self.handler = bus, spec, handler
        self._subscription = _Subscription(bus, spec)

    async def start(self) -> None:
        await self._subscription.consume(self._answer, prefetch=self.bus.settings.prefetch,
                                         no_ack=False)

    async def stop(self, timeout: float) -> None:
        await self._subscription.cancel(timeout)

    async def _answer(self, raw: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            if raw.reply_to:
                await self._reply(raw)
        finally:
            await _settle_quietly(raw.ack())

    async def _reply(self, raw: aio_pika.abc.AbstractIncomingMessage) -> None:
        ok = True
        try:
            result = await self.handler(orjson.loads(raw.body))
            body = result if isinstance(result, RawJson) else _dumps(result)
        except (ValueError, LookupError, PermissionError) as exc:
            ok, body = False, _dumps(str(exc))
        except Exception as exc:
            log.exception("%s: request failed", self.spec.name)
            ok, body = False, _dumps(f"internal error ({type(exc).__name__})")
        encoding = None
        if len(body) >= COMPRESS_REPLIES_FROM:
            body, encoding = zlib.compress(body, 1), "deflate"
        channel = self.bus._publish_channel or await self.bus._channel()
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                headers={"ok": ok},
                correlation_id=raw.correlation_id,
                content_type="application/json",
                content_encoding=encoding,
            ),
            routing_key=raw.reply_to or "",
            mandatory=False,  # RabbitMQ 3.10 returns direct replies sent as mandatory
        )
