"""The bus: one publish path, one consume path, request/reply; `AmqpBus` runs it on RabbitMQ
(aio-pika), `services.memory_bus.MemoryBus` in memory with the same delivery semantics.

- Publishing: persistent, confirms awaited; a returned or nacked publish raises `PublishFailed`
  (a nack is first retried on a fresh channel: RabbitMQ 3.10 nacks a channel opened before a
  quorum queue's leader change).
- Clusters and outages: the connection fails over between the nodes `RUNNER_AMQP_URL` names
  (`FailoverConnection`) and restores its channels, queues and consumers; while it is down a
  publish or a call fails at once with `BusUnavailable` (nothing is queued in memory).
- Consuming (`consume_batches`): what has arrived is one batch, committed by the handler in one
  transaction and acked after; an undecodable message is dead-lettered at once, a delivery that
  fails `handler_attempts` times is dead-lettered with its error, the rest of its batch acked.
- Publishers: each message carries its login as the AMQP `user_id`; a consumer dead-letters one
  that a service's login may not emit (`topology.forged`).
- Request/reply (`serve`, `request`): requests are `Query` models sent to `runner.rpc`, replies
  come on `runner.replies`, a refusal is raised as the same `QueryRefused` type.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
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
from pamqp.commands import Basic
from pydantic import ValidationError
from yarl import URL

from events import Envelope, Message, UnknownMessageType, model_for
from events.queries import QUERIES, REFUSALS, Invalid, Query, QueryRefused
from events.routing import (
    DEAD_LETTER_EXCHANGE,
    REPLIES_EXCHANGE,
    RPC_EXCHANGE,
    exchange_for,
    routing_key,
)
from services import metrics
from services.settings import Settings, amqp_node_urls
from services.topology import (
    EXCHANGES,
    STATIC_QUEUES,
    QueueSpec,
    declared_by,
    forged,
    publisher,
    reply_queue,
)

log = logging.getLogger(__name__)

TelemetryHandler = Callable[[Message], Awaitable[None] | None]
QueryHandler = Callable[[Any], Awaitable[Any]]  # takes the validated query
WatchCallback = Callable[[bytes], Awaitable[None] | None]

COMPRESS_REPLIES_FROM = 32 * 1024  # bytes
AMQP_HEARTBEAT = 10  # seconds; RabbitMQ's 60 s default notices a silently cut link too late
RECONNECT_INTERVAL = 1.0  # seconds between attempts to reach the broker again
CONNECT_TIMEOUT = 10.0  # seconds one attempt may take (a broker still starting may not answer)
CHANNEL_RESTORE_WAIT = 1.0  # seconds a channel may take to come back after its connection
REPLY_WAIT = 5.0  # seconds a reply waits for the connection to be back (its caller gives up)
# seconds between the checks that the broker lists each transient queue's consumer
TRANSIENT_CHECK_EVERY = 2.0
NACK_RETRIES = 6  # fresh channels a nacked publish is tried on (over ~2.5 s) before it fails
RETIRED_CHANNEL_LINGER = 30.0  # seconds a replaced channel stays open for its pending confirms
# in the broker's refusal of a classic queue whose cluster node is down (not one that is missing)
DOWN_NODE = "is down or inaccessible"


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


class Nacked(PublishFailed):
    """The broker nacked a publish on `channel`."""

    def __init__(self, message: str, channel: Any) -> None:
        super().__init__(message)
        self.channel = channel


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


class TopologyMissing(RuntimeError):
    """An exchange or a queue of the shared topology does not exist, and this login may not
    declare it: the setup step (`runner bus setup`) has not run on this vhost."""


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
    if URL(settings.amqp_nodes[0]).scheme != "amqps":
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
    url = URL(amqp_node_urls(amqp_url)[0])
    if url.query.get("auth", "plain").lower() != "plain":
        return None
    return url.user or "guest"


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection to a cluster: each time the connection closes, or an attempt to make
    it fails, the next attempt goes to the next node of `nodes` (aio-pika takes one URL).

    Uses `RobustConnection._on_connection_close`, which aio-pika calls on both (private: pinned
    in constraints.txt, checked by tests/unit/test_amqp_nodes.py and, for real, by
    tests/integration/test_cluster.py)."""

    def __init__(self, url: Any, loop: asyncio.AbstractEventLoop | None = None, *,
                 nodes: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(url, loop=loop, **kwargs)
        # the URL as connect_robust made it (its options in the query), at each node's address
        self.nodes = tuple(self.url.with_host(URL(node).host or "localhost")
                           .with_port(URL(node).explicit_port) for node in nodes)
        self._node = next((i for i, node in enumerate(self.nodes)
                           if (node.host, node.port) == (self.url.host, self.url.port)), 0)

    def next_node(self) -> None:
        """Point the next connection attempt at the next node."""
        self._node = (self._node + 1) % len(self.nodes)
        self.url = self.nodes[self._node]

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self.close_called:
            self.next_node()
        await super()._on_connection_close(closing)


async def connect(settings: Settings, name: str) -> aio_pika.abc.AbstractRobustConnection:
    """A robust connection to the broker `settings.amqp_url` names; to a cluster (several
    nodes), one that fails over between them (`FailoverConnection`), made to whichever answers
    first, starting at a random one so that services spread over the nodes."""
    nodes = [with_heartbeat(node) for node in settings.amqp_nodes]
    options: dict[str, Any] = {
        "reconnect_interval": RECONNECT_INTERVAL, "timeout": CONNECT_TIMEOUT,
        "ssl_context": amqp_ssl_context(settings), "client_properties": {"connection_name": name}}
    if len(nodes) == 1:
        return await aio_pika.connect_robust(nodes[0], **options)
    first = random.randrange(len(nodes))
    failure: BaseException | None = None
    for turn in range(len(nodes)):
        start = (first + turn) % len(nodes)
        order = tuple(nodes[start:] + nodes[:start])
        try:
            # a class, not a keyword: connect_robust puts unknown keywords in the URL's query
            return await aio_pika.connect_robust(
                order[0], connection_class=functools.partial(FailoverConnection, nodes=order),
                **options)
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
            log.debug("%s: broker node %s did not answer: %r", name,
                      URL(order[0]).with_password(None), exc)
            failure = exc
    assert failure is not None
    raise failure


def nacked(exc: BaseException) -> bool:
    """Whether a publish failed because the broker nacked it (it took no responsibility)."""
    return (isinstance(exc, aio_pika.exceptions.DeliveryError)
            and isinstance(getattr(exc, "frame", None), Basic.Nack))


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
        self._replies = reply_queue(service, uuid.uuid4().hex[:12])
        self._publish_channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._consumers: list[_BatchConsumer | _TelemetryConsumer | _RpcServer] = []
        self._up = asyncio.Event()  # connected, channels restored
        self._down_since: float | None = None
        self._closing = False
        self._reconnected: list[Callable[[], None]] = []
        self._reviving: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self._replacing = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect, make sure of the shared topology, declare this service's own queues, then
        start consuming. A shared login declares the whole static topology; a service's own
        login may not, so it checks that it exists (`TopologyMissing` names the setup step)."""
        self._connection = await connect(self.settings, self.service)
        self._connection.close_callbacks.add(self._lost)
        self._connection.reconnect_callbacks.add(self._back)
        channel = await self.channel()
        if self.declares_topology:
            for spec in EXCHANGES:
                await self._declare_exchange(channel, spec.name)
            ours = {spec.name for spec in self._queues}
            for spec in STATIC_QUEUES:
                if spec.name not in ours:
                    channel = await self._declare_static(channel, spec)
        else:
            await self._check_topology()
            for name in declared_by(self.service)[0]:
                await self._declare_exchange(channel, name)
        for spec in self._queues:
            await self.declare_on(channel, spec)
        self._publish_channel = await self.channel()
        for consumer in self._consumers:
            await consumer.start()
        self._up.set()
        self._watching = asyncio.create_task(self._watch_transient(), name="watch-transient")

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
        await self._revive(self._consumers, check_broker=False)

    async def _watch_transient(self) -> None:
        """Every `TRANSIENT_CHECK_EVERY` seconds while connected, a consumer of a transient
        queue (an RPC queue, telemetry, its own replies) that the broker does not list consumes
        again. Such a queue lives on one node: when that node dies, or a return restores the
        queue onto the dead node's stale record, its consumer can go without the client being
        told."""
        while True:
            await asyncio.sleep(TRANSIENT_CHECK_EVERY)
            if not self._up.is_set():
                continue  # the return revives what did not come back
            replies = self._rpc_channel
            if replies is not None and not replies.is_closed:
                with contextlib.suppress(Exception):  # the connection went meanwhile
                    if not await self.consumer_listed(self._replies.name):
                        log.warning("%s: the broker lists no consumer of its replies; "
                                    "consuming again", self.service)
                        self._rpc_channel = None  # the next call makes it again
                        await replies.close()
            await self._revive([c for c in self._consumers if not c.spec.durable],
                               check_broker=True)

    async def _revive(self, consumers: list[Any], check_broker: bool) -> None:
        for consumer in consumers:
            try:
                if await consumer._subscription.revive(check_broker=check_broker):
                    log.warning("%s: the consumer of %s is gone; consuming again",
                                self.service, consumer.spec.name)
            except Exception as exc:  # the connection went again: the next return retries
                log.debug("%s: reviving %s failed: %r", self.service, consumer.spec.name, exc)

    async def consumer_listed(self, queue: str) -> bool:
        """Whether the broker lists a consumer on `queue` (asked on a channel of its own, which
        a missing queue closes)."""
        probe = await self.channel()
        try:
            underlay = await probe.get_underlay_channel()
            declared = await underlay.queue_declare(queue, passive=True)
            return declared.consumer_count > 0
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            with contextlib.suppress(Exception):
                await probe.close()

    def _unavailable(self, what: str) -> BusUnavailable:
        return BusUnavailable(f"{what}: the bus is unavailable (no connection to the broker)")

    async def stop_consuming(self) -> None:
        """Cancel our consumers and wait for in-flight handlers (up to the stop grace)."""
        for consumer in self._consumers:
            await consumer.stop(self._grace)

    async def close(self) -> None:
        """Stop consuming, let in-flight handlers finish, disconnect."""
        self._closing = True
        for task in (self._reviving, self._watching, *self._retiring):
            if task is not None:
                task.cancel()
        if self._watching is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
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

    @property
    def declares_topology(self) -> bool:
        """Whether this bus declares the shared topology (a shared login) or only checks it (a
        service's own login, which has no right to)."""
        return publisher(self.login) is None

    async def _declare_exchange(self, channel: Any, name: str) -> None:
        spec = next(e for e in EXCHANGES if e.name == name)
        self._declared.append(await channel.declare_exchange(
            spec.name, aio_pika.ExchangeType(spec.type), durable=spec.durable))

    async def _check_topology(self) -> None:
        """Raise `TopologyMissing` unless every durable exchange and static queue exists
        (passive declares, which need no rights); transient ones are their consumers' to make
        (`declared_by`)."""
        for kind, name in (*(("exchange", e.name) for e in EXCHANGES if e.durable),
                           *(("queue", q.name) for q in STATIC_QUEUES if q.durable)):
            channel = await self.channel()
            try:
                if kind == "exchange":
                    await channel.declare_exchange(name, passive=True)
                else:
                    await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity as exc:
                if kind == "queue" and DOWN_NODE in str(exc):  # a classic queue's node is down
                    log.warning("%s: queue %s not checked: %s", self.service, name, exc)
                    continue
                raise TopologyMissing(
                    f"the {kind} {name} does not exist on this vhost, and {self.login} may not "
                    "declare it: run `runner bus setup` (with an administrator's login) "
                    "first") from None
            finally:
                if not channel.is_closed:
                    await channel.close()

    async def declare_on(self, channel: Any, spec: QueueSpec, *, robust: bool = True) -> Any:
        """Declare `spec` and its bindings on `channel`; `robust`: again after each reconnect.
        A shared queue that a service's own login may not declare is only looked up."""
        if not self.declares_topology and spec.durable and spec in STATIC_QUEUES:
            queue = await channel.declare_queue(spec.name, passive=True, robust=robust)
            self._declared.append(queue)
            return queue
        try:
            queue = await channel.declare_queue(
                spec.name, durable=spec.durable, auto_delete=spec.auto_delete,
                arguments=spec.arguments or None, robust=robust)
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            raise QueueMismatch(
                f"the queue {spec.name} exists with other arguments than this version declares "
                f"({exc}); recreate it as docs/OPERATIONS.md says (Upgrading queues)") from None
        self._declared.append(queue)
        for exchange, key in spec.bindings:
            await queue.bind(exchange, routing_key=key, robust=robust)
        return queue

    async def _declare_static(self, channel: Any, spec: QueueSpec) -> Any:
        """Declare another service's static queue, once (durable queues outlive a reconnect);
        a classic one whose cluster node is down is skipped with a warning. Returns the channel
        to go on with (a fresh one when the refusal closed this one)."""
        try:
            await self.declare_on(channel, spec, robust=False)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            log.warning("%s: queue %s not declared: %s", self.service, spec.name, exc)
            channel = await self.channel()
        return channel

    async def declare(self, spec: QueueSpec) -> None:
        """Declare a queue and its bindings now (for queues no handler of ours consumes)."""
        await self.declare_on(await self.channel(), spec)

    # ---------------------------------------------------------------- publishing

    async def publish(self, envelope: Envelope) -> None:
        """Publish one message and wait for the broker's confirm. Raises `PublishFailed`."""
        await self._publish_envelope(envelope, NACK_RETRIES)

    async def publish_many(self, envelopes: Iterable[Envelope]) -> None:
        """Publish in order with pipelined confirms; raises if any one was not confirmed. The
        nacked ones are published again together, in their order, on a fresh channel: a queue's
        messages stay in the order given (the broker nacks every later one to that queue too)."""
        pending = list(envelopes)
        for attempt in range(NACK_RETRIES + 1):
            results = await asyncio.gather(*(self._publish_envelope(e, 0) for e in pending),
                                           return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if not failures:
                return
            nacks = [(e, r) for e, r in zip(pending, results, strict=True)
                     if isinstance(r, Nacked)]
            if len(nacks) < len(failures) or attempt == NACK_RETRIES:
                down = any(isinstance(f, BusUnavailable) for f in failures)
                raise (BusUnavailable if down else PublishFailed)(
                    f"{len(failures)} of {len(results)} not confirmed: {failures[0]}")
            await self._replace_publish_channel(nacks[0][1].channel,
                                                f"{len(nacks)} publishes nacked")
            await asyncio.sleep(min(0.05 * 2**attempt, 1.0))  # a leader being elected
            pending = [envelope for envelope, _ in nacks]

    async def _publish_envelope(self, envelope: Envelope, nack_retries: int) -> None:
        model = model_for(envelope.type)
        await self.publish_raw(
            envelope.to_json(),
            exchange=exchange_for(model),
            routing_key=routing_key(model, envelope.payload),
            persistent=model.kind != "telemetry",
            message_id=str(envelope.event_id),
            message_type=envelope.type,
            nack_retries=nack_retries,
        )

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
                routing_key=routing_key(type(message), message),
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
        nack_retries: int = NACK_RETRIES,
    ) -> None:
        """Publish one message and wait for its confirm; a nacked one is tried again on a fresh
        channel up to `nack_retries` times, then raises `Nacked`."""
        where = f"{exchange}/{routing_key}"
        for attempt in range(nack_retries + 1):
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
                if target is None or target.channel is not channel:
                    target = self._exchanges[exchange] = await channel.get_exchange(
                        exchange, ensure=False)
                result = await target.publish(message, routing_key=routing_key, mandatory=True,
                                              timeout=self.settings.request_timeout)
            except Exception as exc:  # connection loss, nack, timeout: the caller must retry
                if connection_lost(exc):
                    raise self._unavailable(f"publish to {where}") from None
                if nacked(exc) and attempt < nack_retries:
                    await self._replace_publish_channel(channel, f"publish to {where} nacked")
                    await asyncio.sleep(min(0.05 * 2**attempt, 1.0))  # a leader being elected
                    continue
                if nacked(exc):
                    raise Nacked(f"publish to {where} nacked", channel) from exc
                raise PublishFailed(f"publish to {where} failed: {exc!r}") from exc
            if isinstance(result, DeliveredMessage):
                raise PublishFailed(f"unroutable: no queue bound to {where}")
            return

    async def _replace_publish_channel(self, nacking: Any, why: str) -> None:
        """Publish on a fresh channel from now on: RabbitMQ 3.10 nacks every publish on a
        channel opened before a quorum queue's leader changed whose first publish to that queue
        came after. The old channel closes once its pending confirms had time to arrive."""
        async with self._replacing:
            if self._publish_channel is not nacking:
                return  # another publish has replaced it already
            log.warning("%s: %s; publishing on a fresh channel", self.service, why)
            try:
                self._publish_channel = await self.channel()
            except Exception as exc:
                raise self._unavailable(why) from exc
            self._exchanges.clear()
        task = asyncio.create_task(self._close_later(nacking), name="retire-channel")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _close_later(channel: Any) -> None:
        await asyncio.sleep(RETIRED_CHANNEL_LINGER)
        with contextlib.suppress(Exception):
            await channel.close()

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
        """Answer a request on `REPLIES_EXCHANGE`, routed to the caller's reply queue (not
        confirmed, as a reply is worthless later). After a reconnect, requests can arrive before
        the publishing channel is back: the reply waits for it (a little)."""
        if not self._up.is_set():
            await self.until_connected(REPLY_WAIT)
        channel = await self._publishing(REPLIES_EXCHANGE)
        replies = self._exchanges.get(REPLIES_EXCHANGE)
        if replies is None:
            replies = self._exchanges[REPLIES_EXCHANGE] = await channel.get_exchange(
                REPLIES_EXCHANGE, ensure=False)
        await replies.publish(
            aio_pika.Message(
                reply.body,
                headers={"refused": reply.refused} if reply.refused else None,
                correlation_id=correlation_id,
                content_type="application/json",
                content_encoding=reply.encoding,
                user_id=self.login,
            ),
            routing_key=reply_to,
            mandatory=False,  # a caller gone meanwhile has no queue: the reply is dropped
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
            requests = await channel.get_exchange(RPC_EXCHANGE, ensure=False)
            sent = await requests.publish(
                aio_pika.Message(
                    query.model_dump_json().encode(),
                    type=query.type_name(),
                    correlation_id=correlation_id,
                    reply_to=self._replies.name,
                    content_type="application/json",
                    expiration=timeout,
                    user_id=self.login,
                ),
                routing_key=spec.name,
                # returned when the queue is gone (a transient queue whose cluster node died,
                # until its service declares it again): refused at once, not a timeout
                mandatory=True,
            )
            if isinstance(sent, DeliveredMessage):
                raise RpcError(f"{spec.name} is not there: its service is not running, or is "
                               "moving to another broker node")
            raw = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            metrics.rpc_called(self.service, spec.name, query.type_name(),
                               time.perf_counter() - called, "timeout")
            raise RpcTimeout(f"{spec.name} did not answer in time") from None
        except RpcError:
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
            # declared on the robust channel, so it and its consumer are restored after a
            # reconnect (it goes with its consumer, as an auto-delete queue does)
            queue = await self.declare_on(channel, self._replies)
            await queue.consume(self._on_reply, no_ack=True)
            self._rpc_channel = channel
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
        self._reviving = asyncio.Lock()

    async def consume(self, callback: Callable[[Any], Awaitable[None]], *, prefetch: int,
                      no_ack: bool) -> None:
        self._consuming = (callback, prefetch, no_ack)
        self._channel = await self.bus.channel(prefetch=prefetch)
        self._queue = await self.bus.declare_on(self._channel, self.spec)
        self._consumer_tag = await self._queue.consume(callback, no_ack=no_ack)

    async def revive(self, check_broker: bool = False) -> bool:
        """Consume again on a fresh channel if ours did not come back with the connection, or,
        with `check_broker`, if the broker lists no consumer on the queue; whether it had to."""
        async with self._reviving:  # the return's revival and the watch never both consume
            return await self._revive_unless_consuming(check_broker)

    async def _revive_unless_consuming(self, check_broker: bool) -> bool:
        if self._consumer_tag is None or self._consuming is None:
            return False
        if not self._channel.is_closed and not (
                check_broker and not await self.bus.consumer_listed(self.spec.name)):
            return False
        with contextlib.suppress(Exception):  # what is left of the old consumer goes with it
            await self._channel.close()
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
    `max_batch`), handles and settles them in order, so batches grow by themselves under load.
    One `basic.ack(multiple=True)` per batch is exact: the channel carries this one consumer,
    and every earlier delivery is settled before the batch commits. After a reconnect the old
    channel's deliveries cannot be settled: the broker redelivers them."""

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
            refused = forged(raw.user_id, delivery.message)
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
        refused = forged(raw.user_id, message)
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
