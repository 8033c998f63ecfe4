"""The bus: one publish path, one consume path, request/reply; `AmqpBus` runs it on RabbitMQ
(aio-pika), `services.memory_bus.MemoryBus` in memory with the same delivery semantics.

Publishing: persistent messages, publisher confirms awaited; an unroutable (returned) or nacked
publish raises `PublishFailed` — never silence. `publish_many` pipelines confirms.

Outages: the connection reconnects by itself and restores its channels, queues and consumers.
While it is down, a publish or a call fails at once with `BusUnavailable` (nothing is queued in
memory, where a crash would lose it): the caller retries (the outbox waits with
`until_connected`) or answers its own caller that the bus is unavailable. The bus logs one
WARNING when the connection goes and one INFO when it is back.

Consuming (`consume_batches`; every service inbox and the event log): the deliveries that have
arrived are handed over as one batch, committed by the handler in one transaction (group commit),
and acked after it returns. A message that cannot be decoded (bad JSON, unknown type, invalid
payload) is dead-lettered at once with its reason; a delivery the handler could not commit is
redelivered after a short backoff and dead-lettered with the error after `handler_attempts`
deliveries, while the rest of its batch is acked. Poison never crash-loops a consumer and never
vanishes.

Publishers: every message carries the connection's login as its AMQP `user_id`, which the
broker verifies; a consumer dead-letters a message whose login is a service's that may not emit
its type (`topology.forged`, `EMITTERS`). Other logins (the shared one, an operator's) are not
checked.

Request/reply (`serve`, `request`): each request is a `Query` model, validated before the
handler runs; a refusal comes back to the caller as the same `QueryRefused` type.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aio_pika
import orjson
from aiormq.abc import DeliveredMessage
from pydantic import ValidationError
from yarl import URL

from events import Envelope, Message, UnknownMessageType, model_for
from events.queries import QUERIES, REFUSALS, Invalid, Query, QueryRefused
from events.routing import DEAD_LETTER_EXCHANGE, exchange_for, routing_key_for
from services import metrics
from services.settings import Settings
from services.topology import EXCHANGES, STATIC_QUEUES, QueueSpec, forged

log = logging.getLogger(__name__)

TelemetryHandler = Callable[[Message], Awaitable[None] | None]
QueryHandler = Callable[[Any], Awaitable[Any]]  # takes the validated query
WatchCallback = Callable[[bytes], Awaitable[None] | None]

REPLY_TO = "amq.rabbitmq.reply-to"
COMPRESS_REPLIES_FROM = 32 * 1024  # bytes
AMQP_HEARTBEAT = 10  # seconds; RabbitMQ's 60 s default notices a silently cut link too late
RECONNECT_INTERVAL = 1.0  # seconds between attempts to reach the broker again
CONNECT_TIMEOUT = 10.0  # seconds one attempt may take (a broker still starting may not answer)
CHANNEL_RESTORE_WAIT = 1.0  # seconds a channel may take to come back after its connection
REPLY_WAIT = 5.0  # seconds a reply waits for the connection to be back (its caller gives up)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message of a batch, decoded and validated."""

    envelope: Envelope
    message: Message


# Returns the deliveries (by index in the batch) it could not commit, with why; raising means
# none of the batch was committed.
BatchHandler = Callable[[list[Delivery]], Awaitable[Mapping[int, str] | None]]


class PublishFailed(RuntimeError):
    """The broker did not take responsibility for a message (nacked, returned, or lost)."""


class RpcError(RuntimeError):
    """A call could not be made or answered (bus down, no answer in time, a broken reply)."""


class RpcTimeout(RpcError):
    """No answer came in time (the service may still act on the request)."""


class BusUnavailable(PublishFailed, RpcError):
    """The broker connection is down, or went down during the call; the bus reconnects by
    itself, so the caller may retry once it is back (`until_connected`)."""


class CallInterrupted(BusUnavailable):
    """The connection went down after the request was sent: the service may still act on it."""


class QueueMismatch(RuntimeError):
    """A queue exists with other arguments than this version declares (the broker refuses to
    change them): an operator must recreate it."""


class RawJson(bytes):
    """A reply already encoded as JSON: sent as is, and `request_raw` hands it on as is."""


class Publisher(Protocol):
    service: str

    async def publish_many(self, envelopes: Iterable[Envelope]) -> None: ...
    async def until_connected(self, timeout: float | None = None) -> bool: ...


class Bus(Protocol):
    """What a service needs of the bus (see module doc); `AmqpBus` and `MemoryBus` are both."""

    service: str
    settings: Settings

    async def start(self) -> None: ...
    def connected(self) -> bool: ...
    async def until_connected(self, timeout: float | None = None) -> bool: ...
    def on_reconnected(self, callback: Callable[[], None]) -> None: ...
    async def stop_consuming(self) -> None: ...
    async def close(self) -> None: ...
    async def declare(self, spec: QueueSpec) -> None: ...
    async def publish(self, envelope: Envelope) -> None: ...
    async def publish_many(self, envelopes: Iterable[Envelope]) -> None: ...
    async def send_telemetry(self, message: Message) -> None: ...
    def consume_batches(self, spec: QueueSpec, handler: BatchHandler, *, max_batch: int = 1000,
                        linger: float = 0.0, prefetch: int | None = None) -> None: ...
    def subscribe_telemetry(self, spec: QueueSpec, handler: TelemetryHandler) -> None: ...
    def serve(self, spec: QueueSpec, handlers: Mapping[type[Query], QueryHandler]) -> None: ...
    async def request(self, spec: QueueSpec, query: Query,
                      timeout: float | None = None) -> Any: ...
    async def request_raw(self, spec: QueueSpec, query: Query,
                          timeout: float | None = None) -> RawJson: ...
    async def request_encoded(self, spec: QueueSpec, query: Query,
                              timeout: float | None = None) -> tuple[bytes, str | None]: ...
    async def watch(self, bindings: Iterable[tuple[str, str]], callback: WatchCallback) -> None: ...


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the connection or the channel under a call went away (an outage),
    rather than the broker refusing the call."""
    return isinstance(exc, (aio_pika.exceptions.ChannelInvalidStateError, ConnectionError))


def with_heartbeat(amqp_url: str) -> str:
    """The broker URL with an AMQP heartbeat, unless it sets one itself."""
    url = URL(amqp_url)
    return amqp_url if "heartbeat" in url.query else str(url.update_query(heartbeat=AMQP_HEARTBEAT))


def amqp_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for an amqps:// URL: the broker's certificate verified against `amqp_ca_file` (else
    the system's roots) and its name against the URL's host, TLS 1.2 at least, this client's
    certificate presented where one is set. None for amqp://."""
    if URL(settings.amqp_url).scheme != "amqps":
        return None
    ca = settings.amqp_ca_file
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    except OSError as exc:  # ssl.SSLError too: not PEM
        raise OSError(f"RUNNER_AMQP_CA_FILE ({ca}): {exc.strerror or exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.amqp_cert_file is not None:
        try:
            context.load_cert_chain(settings.amqp_cert_file, settings.amqp_key_file)
        except OSError as exc:  # missing, not PEM, or a key that does not match
            raise OSError(f"RUNNER_AMQP_CERT_FILE ({settings.amqp_cert_file}): "
                          f"{exc.strerror or exc}") from exc
    return context


def broker_login(amqp_url: str) -> str | None:
    """The login the broker authenticates this connection as (the client's default is guest),
    sent as every message's `user_id` so that consumers know who published it; None for a
    mechanism other than PLAIN, whose login the URL does not name."""
    url = URL(amqp_url)
    if url.query.get("auth", "plain").lower() != "plain":
        return None
    return url.user or "guest"


def _why(exc: BaseException | None) -> str:
    """A connection loss's reason, in a few words."""
    if exc is None:
        return "closed"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


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


def decode_delivery(body: bytes) -> Delivery:
    """The envelope and its typed message; raises (ValidationError, UnknownMessageType,
    ValueError) for poison."""
    envelope = Envelope.from_json(body)
    return Delivery(envelope, envelope.message())


# ------------------------------------------------------------------------ RPC wire format


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply as it travels: its body (JSON, deflated from `COMPRESS_REPLIES_FROM` bytes on)
    and, for a refusal, the refusal's code."""

    body: bytes
    encoding: str | None = None
    refused: str | None = None


async def answer(handlers: Mapping[type[Query], QueryHandler], type_name: str,
                 body: bytes, where: str) -> Reply:
    """Decode the query `type_name`, run its handler and encode the reply (or the refusal)."""
    try:
        model = QUERIES.get(type_name)
        if model is None or model not in handlers:
            raise Invalid(f"{where} does not answer {type_name or 'untyped requests'}")
        try:
            query = model.model_validate_json(body)
        except ValidationError as exc:
            raise Invalid(poison_reason(exc).removeprefix("invalid message: ")) from None
        result = await handlers[model](query)
        data = result if isinstance(result, RawJson) else orjson.dumps(result, default=str)
    except QueryRefused as exc:
        return Reply(orjson.dumps(str(exc)), refused=exc.code)
    except Exception as exc:
        log.exception("%s: %s failed", where, type_name)
        return Reply(orjson.dumps(f"internal error ({type(exc).__name__})"), refused="internal")
    if len(data) >= COMPRESS_REPLIES_FROM:
        return Reply(zlib.compress(data, 1), "deflate")
    return Reply(data)


def reply_body(reply: Reply, where: str) -> tuple[bytes, str | None]:
    """The reply's body and encoding; raises the refusal it carries."""
    if reply.encoding not in (None, "deflate"):
        raise RpcError(f"{where} sent a reply in an unknown encoding {reply.encoding!r}")
    if reply.refused is not None:
        try:
            message = orjson.loads(inflated(reply.body, reply.encoding))
        except ValueError:
            message = None
        message = message if isinstance(message, str) else "request refused"
        if reply.refused == "internal":
            raise RpcError(message)
        raise REFUSALS.get(reply.refused, QueryRefused)(message)
    return reply.body, reply.encoding


def inflated(body: bytes, encoding: str | None) -> bytes:
    if encoding is None:
        return body
    try:
        return zlib.decompress(body)
    except zlib.error:
        raise RpcError("malformed reply (bad deflate data)") from None


def decoded(raw: bytes, where: str) -> Any:
    try:
        return orjson.loads(memoryview(raw))  # orjson takes no bytes subclass
    except ValueError:
        raise RpcError(f"{where} sent a malformed reply") from None


# ------------------------------------------------------------------------ RabbitMQ


class AmqpBus:
    """A service's connection to RabbitMQ: one robust aio-pika connection; a channel for
    publishing, one per consumer, one for replies. Robust objects are restored after a
    reconnect while referenced, so the bus keeps every one it declares. `connected()` is true
    from the start until the connection drops, and again once it and its channels are back."""

    def __init__(self, settings: Settings, service: str) -> None:
        self.settings = settings
        self.service = service
        self.login = broker_login(settings.amqp_url)
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._queues: list[QueueSpec] = []
        self._declared: list[Any] = []
        self._pending: dict[str, asyncio.Future[aio_pika.abc.AbstractIncomingMessage]] = {}
        self._rpc_channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._publish_channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._consumers: list[_BatchConsumer | _TelemetryConsumer | _RpcServer] = []
        self._up = asyncio.Event()  # connected, channels restored
        self._down_since: float | None = None
        self._closing = False
        self._reconnected: list[Callable[[], None]] = []
        self._reviving: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect, declare exchanges and the whole static topology (whichever service starts
        first, no message for another one is lost for want of its queue) and this service's
        queues, then start consuming."""
        self._connection = await aio_pika.connect_robust(
            with_heartbeat(self.settings.amqp_url), reconnect_interval=RECONNECT_INTERVAL,
            timeout=CONNECT_TIMEOUT, ssl_context=amqp_ssl_context(self.settings),
            client_properties={"connection_name": self.service})
        self._connection.close_callbacks.add(self._lost)
        self._connection.reconnect_callbacks.add(self._back)
        channel = await self.channel()
        for spec in EXCHANGES:
            self._declared.append(await channel.declare_exchange(
                spec.name, aio_pika.ExchangeType(spec.type), durable=spec.durable))
        for spec in (*STATIC_QUEUES, *self._queues):
            await self.declare_on(channel, spec)
        self._publish_channel = await self.channel()
        for consumer in self._consumers:
            await consumer.start()
        self._up.set()

    def connected(self) -> bool:
        """Whether the broker connection is up right now, its channels restored (health)."""
        connection = self._connection
        return bool(self._up.is_set() and connection is not None and not connection.is_closed
                    and connection.connected.is_set())

    async def until_connected(self, timeout: float | None = None) -> bool:
        """Wait (up to `timeout` seconds) until the connection is up; whether it is."""
        if not self._up.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), timeout)
        return self._up.is_set()

    def on_reconnected(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time the connection is back after an outage."""
        self._reconnected.append(callback)

    def _lost(self, _: Any, exc: BaseException | None = None) -> None:
        if self._closing or not self._up.is_set():
            return
        self._up.clear()
        self._down_since = time.monotonic()
        log.warning("%s: lost the connection to the broker (%s); reconnecting", self.service,
                    _why(exc))
        # a reply can only come on the channel its request went out on, which is gone
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CallInterrupted(
                    "the connection to the broker was lost before the answer came"))

    def _back(self, _: Any) -> None:
        if self._closing or self._up.is_set():
            return
        down = time.monotonic() - self._down_since if self._down_since is not None else 0.0
        self._down_since = None
        self._up.set()
        log.info("%s: connection to the broker back after %.1fs", self.service, down)
        self._reviving = asyncio.create_task(self._revive_consumers(), name="revive-consumers")
        for callback in self._reconnected:
            callback()

    async def _revive_consumers(self) -> None:
        """A consumer whose channel did not come back with the connection consumes again on a
        new one (the client restores only what it still tracks; once lost, nothing arrives)."""
        for consumer in self._consumers:
            try:
                if await consumer._subscription.revive():
                    log.warning("%s: the consumer of %s did not come back with the connection; "
                                "consuming again", self.service, consumer.spec.name)
            except Exception as exc:  # the connection went again: the next return retries
                log.debug("%s: reviving %s failed: %r", self.service, consumer.spec.name, exc)

    def _unavailable(self, what: str) -> BusUnavailable:
        return BusUnavailable(f"{what}: the bus is unavailable (no connection to the broker)")

    async def stop_consuming(self) -> None:
        """Cancel our consumers and wait for in-flight handlers (up to the stop grace)."""
        for consumer in self._consumers:
            await consumer.stop(self._grace)

    async def close(self) -> None:
        """Stop consuming, let in-flight handlers finish, disconnect."""
        self._closing = True
        if self._reviving is not None:
            self._reviving.cancel()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RpcError("bus closed"))
        await self.stop_consuming()
        if self._connection is not None:
            await self._connection.close()

    @property
    def _grace(self) -> float:
        return max(self.settings.stop_grace, 5.0)

    async def channel(self, prefetch: int | None = None) -> aio_pika.abc.AbstractRobustChannel:
        """A new channel of this bus's connection, with publisher confirms."""
        if self._connection is None:
            raise PublishFailed("bus not started")
        channel: Any = await self._connection.channel()
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def declare_on(self, channel: Any, spec: QueueSpec) -> Any:
        try:
            queue = await channel.declare_queue(
                spec.name, durable=spec.durable, auto_delete=spec.auto_delete,
                arguments=spec.arguments or None)
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            raise QueueMismatch(
                f"the queue {spec.name} exists with other arguments than this version declares "
                f"({exc}); recreate it as docs/OPERATIONS.md says (Upgrading queues)") from None
        self._declared.append(queue)
        for exchange, key in spec.bindings:
            await queue.bind(exchange, routing_key=key)
        return queue

    async def declare(self, spec: QueueSpec) -> None:
        """Declare a queue and its bindings now (for queues no handler of ours consumes)."""
        await self.declare_on(await self.channel(), spec)

    # ---------------------------------------------------------------- publishing

    async def publish(self, envelope: Envelope) -> None:
        """Publish one message and wait for the broker's confirm. Raises `PublishFailed`."""
        model = model_for(envelope.type)
        await self.publish_raw(
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
            down = any(isinstance(f, BusUnavailable) for f in failures)
            raise (BusUnavailable if down else PublishFailed)(
                f"{len(failures)} of {len(results)} not confirmed: {failures[0]}")

    async def send_telemetry(self, message: Message) -> None:
        """Transient telemetry (dropped when nobody listens), returning once the broker has
        confirmed it: a host renews its lease on its heartbeat's confirm."""
        if self._publish_channel is None:
            return
        name = exchange_for(type(message))
        channel = await self._publishing(name)
        try:
            exchange = await channel.get_exchange(name, ensure=False)
            await exchange.publish(
                aio_pika.Message(
                    message.model_dump_json().encode(),
                    type=message.type_name(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                    user_id=self.login,
                ),
                routing_key=routing_key_for(type(message)),
                mandatory=False,
                timeout=self.settings.request_timeout,
            )
        except Exception as exc:
            if connection_lost(exc):
                raise self._unavailable(f"telemetry to {name}") from None
            raise PublishFailed(f"telemetry to {name} failed: {exc!r}") from exc

    async def _publishing(self, exchange: str) -> aio_pika.abc.AbstractRobustChannel:
        """The publishing channel; `BusUnavailable` while the connection is down. A channel
        that did not come back with the connection is replaced."""
        channel = self._publish_channel
        if channel is None:
            raise PublishFailed("bus not started")
        if not self._up.is_set():
            raise self._unavailable(f"publish to {exchange}")
        if channel.is_closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.ready(), CHANNEL_RESTORE_WAIT)
        if channel.is_closed and self._up.is_set():
            log.warning("%s: the publishing channel did not come back with the connection; "
                        "opening another", self.service)
            try:
                channel = self._publish_channel = await self.channel()
            except Exception as exc:
                raise self._unavailable(f"publish to {exchange}") from exc
            self._exchanges.clear()
        return channel

    async def publish_raw(
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
        channel = await self._publishing(exchange)
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
            user_id=self.login,  # RabbitMQ refuses it unless it is this connection's login
        )
        try:
            target = self._exchanges.get(exchange)
            if target is None:
                target = self._exchanges[exchange] = await channel.get_exchange(
                    exchange, ensure=False)
            result = await target.publish(message, routing_key=routing_key, mandatory=True,
                                          timeout=self.settings.request_timeout)
        except Exception as exc:  # connection loss, nack, timeout: the caller must retry
            if connection_lost(exc):
                raise self._unavailable(f"publish to {exchange}/{routing_key}") from None
            raise PublishFailed(f"publish to {exchange}/{routing_key} failed: {exc!r}") from exc
        if isinstance(result, DeliveredMessage):
            raise PublishFailed(f"unroutable: no queue bound to {exchange}/{routing_key}")

    async def dead_letter(self, spec: QueueSpec, raw: aio_pika.abc.AbstractIncomingMessage,
                          reason: str) -> None:
        """Move `raw` to the dead-letter exchange under `spec`'s name, with its reason."""
        headers = dict(raw.headers or {}) | {
            "x-poison-reason": reason,
            "x-poison-service": self.service,
            "x-original-exchange": raw.exchange or "",
            "x-original-routing-key": raw.routing_key or "",
            "x-original-user-id": raw.user_id or "",
        }
        await self.publish_raw(raw.body, exchange=DEAD_LETTER_EXCHANGE, routing_key=spec.name,
                               headers=headers, message_id=raw.message_id,
                               message_type=raw.type)

    async def send_reply(self, reply_to: str, correlation_id: str | None, reply: Reply) -> None:
        """Answer a request (direct reply-to; not confirmed, as a reply is worthless later).
        After a reconnect, requests can arrive before the publishing channel is back: the reply
        waits for it (a little)."""
        if not self._up.is_set():
            await self.until_connected(REPLY_WAIT)
        channel = await self._publishing("replies")
        await channel.default_exchange.publish(
            aio_pika.Message(
                reply.body,
                headers={"refused": reply.refused} if reply.refused else None,
                correlation_id=correlation_id,
                content_type="application/json",
                content_encoding=reply.encoding,
            ),
            routing_key=reply_to,
            mandatory=False,  # RabbitMQ 3.10 returns direct replies sent as mandatory
        )

    # ---------------------------------------------------------------- consuming

    def consume_batches(self, spec: QueueSpec, handler: BatchHandler, *, max_batch: int = 1000,
                        linger: float = 0.0, prefetch: int | None = None) -> None:
        """Consume `spec` in batches (module doc): what has arrived, up to `max_batch`, and with
        a `linger`, what comes that much longer while the consumer is behind. `prefetch`
        [2 × max_batch] lets the next batch arrive while one commits."""
        self._queues.append(spec)
        self._consumers.append(_BatchConsumer(
            self, spec, handler, max_batch=max_batch, linger=linger,
            prefetch=prefetch or 2 * max_batch))

    def subscribe_telemetry(self, spec: QueueSpec, handler: TelemetryHandler) -> None:
        """Consume transient telemetry without acks; undecodable samples are dropped (they carry
        no history, and the next sample replaces a lost one)."""
        self._queues.append(spec)
        self._consumers.append(_TelemetryConsumer(self, spec, handler))

    async def watch(self, bindings: Iterable[tuple[str, str]], callback: WatchCallback) -> None:
        """Look at traffic without taking it from anyone (viewers such as `runner events tail`):
        a private exclusive auto-delete queue bound to `bindings`, consumed with auto-ack; the
        callback gets each message's body."""
        channel = await self.channel(prefetch=1000)
        # named by us: a robust channel cannot re-declare a server-named (amq.gen-*) queue
        queue = await channel.declare_queue(
            f"{self.service}.watch.{uuid.uuid4().hex[:12]}", exclusive=True, auto_delete=True,
            durable=False)
        self._declared.append(queue)
        for exchange, key in bindings:
            await queue.bind(exchange, routing_key=key)

        async def deliver(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            result = callback(message.body)
            if asyncio.iscoroutine(result):
                await result

        await queue.consume(deliver, no_ack=True)

    # ---------------------------------------------------------------- request / reply

    def serve(self, spec: QueueSpec, handlers: Mapping[type[Query], QueryHandler]) -> None:
        """Answer the queries `handlers` names on `spec` (module doc); replies from
        `COMPRESS_REPLIES_FROM` bytes on are deflated."""
        self._queues.append(spec)
        self._consumers.append(_RpcServer(self, spec, handlers))

    async def request(self, spec: QueueSpec, query: Query, timeout: float | None = None) -> Any:
        """Call a service; returns its decoded reply, raises its refusal or `RpcError`."""
        return decoded(await self.request_raw(spec, query, timeout), spec.name)

    async def request_raw(self, spec: QueueSpec, query: Query,
                          timeout: float | None = None) -> RawJson:
        """`request`, with the reply as the JSON bytes it came in."""
        body, encoding = await self.request_encoded(spec, query, timeout)
        return RawJson(inflated(body, encoding))

    async def request_encoded(self, spec: QueueSpec, query: Query,
                              timeout: float | None = None) -> tuple[bytes, str | None]:
        """`request_raw`, with the reply as it travelled: deflated (encoding "deflate") from
        `COMPRESS_REPLIES_FROM` bytes on, for callers that pass a large reply on as it is."""
        timeout = timeout or self.settings.request_timeout
        if not self._up.is_set():
            raise self._unavailable(spec.name)
        try:
            channel = await self._reply_channel()
        except Exception:
            raise self._unavailable(spec.name) from None
        called = time.perf_counter()
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[aio_pika.abc.AbstractIncomingMessage] = (
            asyncio.get_running_loop().create_future())
        self._pending[correlation_id] = future
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    query.model_dump_json().encode(),
                    type=query.type_name(),
                    correlation_id=correlation_id,
                    reply_to=REPLY_TO,
                    content_type="application/json",
                    expiration=timeout,
                ),
                routing_key=spec.name,
                mandatory=False,
            )
            raw = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            metrics.rpc_called(self.service, spec.name, query.type_name(),
                               time.perf_counter() - called, "timeout")
            raise RpcTimeout(f"{spec.name} did not answer in time") from None
        except BusUnavailable:
            raise
        except Exception as exc:
            if connection_lost(exc) or isinstance(exc, aio_pika.exceptions.AMQPError):
                raise self._unavailable(spec.name) from None
            raise
        finally:
            self._pending.pop(correlation_id, None)
        refused = (raw.headers or {}).get("refused")
        metrics.rpc_called(self.service, spec.name, query.type_name(),
                           time.perf_counter() - called, "error" if refused else "ok")
        return reply_body(Reply(raw.body, raw.content_encoding or None,
                                refused if isinstance(refused, str) else None), spec.name)

    async def _reply_channel(self) -> aio_pika.abc.AbstractRobustChannel:
        if self._rpc_channel is None or self._rpc_channel.is_closed:
            channel = await self.channel()
            # a passive declare registers the pseudo-queue with the robust channel, so its
            # consumer is restored after a reconnect
            queue = await channel.get_queue(REPLY_TO)
            await queue.consume(self._on_reply, no_ack=True)
            self._rpc_channel = channel
            self._declared.append(queue)
        return self._rpc_channel

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)


class _Subscription:
    """A consumer on the queue `spec`, on a channel of its own."""

    def __init__(self, bus: AmqpBus, spec: QueueSpec) -> None:
        self.bus, self.spec = bus, spec
        self._queue: Any = None
        self._consumer_tag: str | None = None
        self._channel: Any = None
        self._consuming: tuple[Callable[[Any], Awaitable[None]], int, bool] | None = None

    async def consume(self, callback: Callable[[Any], Awaitable[None]], *, prefetch: int,
                      no_ack: bool) -> None:
        self._consuming = (callback, prefetch, no_ack)
        self._channel = await self.bus.channel(prefetch=prefetch)
        self._queue = await self.bus.declare_on(self._channel, self.spec)
        self._consumer_tag = await self._queue.consume(callback, no_ack=no_ack)

    async def revive(self) -> bool:
        """Consume again on a fresh channel if ours did not come back with the connection;
        whether it had to."""
        if self._consumer_tag is None or self._consuming is None or not self._channel.is_closed:
            return False
        callback, prefetch, no_ack = self._consuming
        await self.consume(callback, prefetch=prefetch, no_ack=no_ack)
        return True

    async def cancel(self, timeout: float) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):  # the channel may be gone: nothing more arrives
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), timeout)
            self._consumer_tag = None


class _BatchConsumer:
    """`AmqpBus.consume_batches`: one task takes every delivery that has arrived (up to
    `max_batch`), runs the handler on them in delivery order, settles them, and takes the next,
    so a lone message at idle is handled at once and batches grow by themselves under load.

    One `basic.ack(multiple=True)` per batch is exact: the channel carries this one consumer, so
    its delivery tags number exactly our deliveries, in order, and every earlier delivery has
    been settled before the batch commits. After a reconnect the new channel numbers from 1
    again; deliveries of the old channel cannot be settled and are redelivered by the broker.
    """

    def __init__(self, bus: AmqpBus, spec: QueueSpec, handler: BatchHandler, *, max_batch: int,
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
                delivery = decode_delivery(raw.body)
            except (ValidationError, UnknownMessageType, ValueError) as exc:
                dead.append((raw, poison_reason(exc)))
                continue
            # the catalogue's type, which an old one is upcast to
            refused = forged(raw.user_id, delivery.message.type_name())
            if refused is not None:
                log.warning("%s: %s %s dead-lettered: %s", self.spec.name,
                            delivery.envelope.type, delivery.envelope.event_id, refused)
                dead.append((raw, refused))
                continue
            deliveries.append(delivery)
            delivered.append(raw)
        failed: Mapping[int, str] = {}
        if deliveries:
            try:
                failed = await self.handler(deliveries) or {}
            except Exception as exc:
                failed = dict.fromkeys(range(len(deliveries)), poison_reason(exc))
        retry: list[aio_pika.abc.AbstractIncomingMessage] = []
        for index, reason in failed.items():
            raw = delivered[index]
            attempt = _delivery_count(raw) + 1
            if attempt >= self.bus.settings.handler_attempts:
                log.error("%s: %s failed %d times, dead-lettered: %s", self.spec.name,
                          deliveries[index].envelope.type, attempt, reason)
                dead.append((raw, f"handler failed {attempt} times: {reason}"))
            else:
                log.warning("%s: %s failed (delivery %d), will retry: %s", self.spec.name,
                            deliveries[index].envelope.type, attempt, reason)
                retry.append(raw)
        if dead:
            results = await asyncio.gather(
                *(self.bus.dead_letter(self.spec, raw, reason) for raw, reason in dead),
                return_exceptions=True)
            retry += [raw for (raw, _), result in zip(dead, results, strict=True)
                      if isinstance(result, BaseException)]
        if retry:
            await asyncio.sleep(redelivery_backoff(max(_delivery_count(r) + 1 for r in retry)))
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


def redelivery_backoff(attempt: int) -> float:
    """Seconds before a failed delivery goes back to its queue."""
    return min(0.05 * 2**attempt, 2.0)


def _delivery_count(raw: aio_pika.abc.AbstractIncomingMessage) -> int:
    return int((raw.headers or {}).get("x-delivery-count") or 0)


async def _settle_quietly(op: Awaitable[None]) -> None:
    try:
        await op
    except Exception:  # the channel may already be gone; the broker will redeliver
        pass


class _TelemetryConsumer:
    """`AmqpBus.subscribe_telemetry`: decode each sample and hand it over; no acks."""

    def __init__(self, bus: AmqpBus, spec: QueueSpec, handler: TelemetryHandler) -> None:
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
        refused = forged(raw.user_id, message.type_name())
        if refused is not None:
            log.warning("%s: dropped telemetry sample: %s", self.spec.name, refused)
            return
        result = self.handler(message)
        if asyncio.iscoroutine(result):
            await result


class _RpcServer:
    """`AmqpBus.serve`: answers each request as it comes (several at once, up to the prefetch)
    and acks it once answered."""

    def __init__(self, bus: AmqpBus, spec: QueueSpec,
                 handlers: Mapping[type[Query], QueryHandler]) -> None:
        self.bus, self.spec, self.handlers = bus, spec, handlers
        self._subscription = _Subscription(bus, spec)

    async def start(self) -> None:
        await self._subscription.consume(self._answer, prefetch=self.bus.settings.prefetch,
                                         no_ack=False)

    async def stop(self, timeout: float) -> None:
        await self._subscription.cancel(timeout)

    async def _answer(self, raw: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            if raw.reply_to:
                reply = await answer(self.handlers, raw.type or "", raw.body, self.spec.name)
                try:
                    await self.bus.send_reply(raw.reply_to, raw.correlation_id, reply)
                except Exception as exc:  # the caller's channel or ours is gone: it gives up
                    log.debug("%s: reply not sent: %r", self.spec.name, exc)
        finally:
            await _settle_quietly(raw.ack())
