"""The bus's contract, run on both buses: RabbitMQ (`AmqpBus`, a vhost of its own) and memory
(`MemoryBus`). Request/reply with typed refusals and deflated large replies; an inbox that
commits what has arrived together, dead-letters poison at once and a failing message alone after
its attempts, has one effect per message delivered twice, and forgets old ids."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from events import Envelope, StopRunner
from events.queries import HostsQuery, Invalid, LogQuery, NotFound, Query, StatusQuery
from services.bus import COMPRESS_REPLIES_FROM, AmqpBus, Bus, RawJson, RpcError
from services.memory_bus import MemoryBroker, MemoryBus
from services.service import Service
from services.settings import Settings
from services.store import UnitOfWork
from services.topology import SCHEDULER_INBOX, rpc_queue
from tests.integration.broker_helpers import eventually, until

RPC = rpc_queue("test")
BusFactory = Callable[[str], Bus]


@pytest.fixture(params=["amqp", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def bus_settings(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if kind == "amqp":
        return request.getfixturevalue("settings")
    return Settings(data_dir=tmp_path / "var", handler_attempts=3, request_timeout=5.0)


@pytest.fixture
def new_bus(kind: str, bus_settings: Settings) -> BusFactory:
    broker = MemoryBroker()
    if kind == "amqp":
        return lambda name: AmqpBus(bus_settings, name)
    return lambda name: MemoryBus(broker, bus_settings, name)


@pytest.fixture
async def started(new_bus: BusFactory) -> AsyncIterator[Callable[..., Any]]:
    buses: list[Bus] = []

    async def start(name: str, prepare: Callable[[Bus], None] = lambda bus: None) -> Bus:
        bus = new_bus(name)
        prepare(bus)
        await bus.start()
        buses.append(bus)
        return bus

    yield start
    for bus in reversed(buses):
        await bus.close()


async def test_replies_small_large_raw_and_refused(started: Callable[..., Any]) -> None:
    big = [{"workerId": f"w-{n}", "status": "running", "positions": []} for n in range(5000)]

    async def status(query: StatusQuery) -> Any:
        if query.user_id == "raw":
            return RawJson(orjson.dumps({"workers": big}))
        if query.user_id == "big":
            return {"workers": big}
        if query.user_id == "crash":
            raise RuntimeError("secret internals")
        return {"user": query.user_id, "offset": query.offset}

    async def page(query: LogQuery) -> Any:
        raise NotFound(f"nothing after {query.after}")

    await started("server", lambda bus: bus.serve(RPC, {StatusQuery: status, LogQuery: page}))
    client = await started("client")
    assert await client.request(RPC, StatusQuery(user_id="u", offset=3)) == {"user": "u",
                                                                              "offset": 3}
    assert len(orjson.dumps({"workers": big})) > COMPRESS_REPLIES_FROM  # travels deflated
    assert await client.request(RPC, StatusQuery(user_id="big")) == {"workers": big}
    raw = await client.request_raw(RPC, StatusQuery(user_id="raw"))
    assert isinstance(raw, RawJson) and orjson.loads(bytes(raw)) == {"workers": big}
    body, encoding = await client.request_encoded(RPC, StatusQuery(user_id="raw"))
    assert encoding == "deflate" and zlib.decompress(body) == bytes(raw)
    assert await client.request_encoded(RPC, StatusQuery(user_id="u")) == (
        b'{"user":"u","offset":0}', None)
    with pytest.raises(NotFound, match="nothing after 7"):
        await client.request(RPC, LogQuery(after=7))
    with pytest.raises(Invalid, match="does not answer HostsQuery"):
        await client.request(RPC, HostsQuery())
    with pytest.raises(RpcError, match=r"internal error \(RuntimeError\)"):
        await client.request(RPC, StatusQuery(user_id="crash"))


async def test_a_query_invalid_on_arrival_is_refused_with_the_field(
        started: Callable[..., Any]) -> None:
    class _Forged(Query):
        """A StatusQuery as an older or hostile client might send it (unregistered: `_`)."""

        offset: str

    _Forged.type_name = classmethod(lambda cls: "StatusQuery")  # type: ignore[method-assign]

    async def status(query: StatusQuery) -> Any:
        return {}

    await started("server", lambda bus: bus.serve(RPC, {StatusQuery: status}))
    client = await started("client")
    with pytest.raises(Invalid, match="offset"):
        await client.request(RPC, _Forged(offset="minus one"))


class Probe(Service):
    """Stands in for the scheduler on its inbox: records each StopRunner it commits."""

    name = "scheduler"

    def __init__(self, settings: Settings, **wiring: Any) -> None:
        super().__init__(settings, **wiring)
        self.committed: list[str] = []
        self.transactions = 0
        self.store.on_commit.append(self._count)

    def _count(self, uow: UnitOfWork) -> None:
        self.transactions += 1

    async def setup(self) -> None:
        self.handle(SCHEDULER_INBOX, {StopRunner: self.on_stop})

    async def on_stop(self, uow: UnitOfWork, env: Envelope, cmd: StopRunner) -> None:
        if cmd.worker_id == "bad":
            raise ValueError("this one always fails")
        uow.after_commit.append(lambda: self.committed.append(cmd.worker_id))


def stop(worker_id: str) -> Envelope:
    return Envelope.wrap(StopRunner(worker_id=worker_id, flatten=False, reason="test"),
                         stream=f"job-{worker_id}")


async def test_an_inbox_commits_batches_and_dead_letters_poison_and_a_failing_message_alone(
        started: Callable[..., Any], new_bus: BusFactory, bus_settings: Settings) -> None:
    dead: list[tuple[bytes, dict[str, Any]]] = []
    publisher = await started("publisher")
    await publisher.declare(SCHEDULER_INBOX)
    first = [stop(f"w{i}") for i in range(40)]
    await publisher.publish_many([*first, first[3]])  # w3 delivered twice
    probe = Probe(bus_settings, bus=new_bus("scheduler"))
    await probe.start()
    try:
        await eventually(lambda: len(probe.committed) >= 40, 20, "the first 40")
        assert probe.transactions <= 20, probe.transactions  # group commit: 41 messages
        bad = stop("bad")
        good = [stop(f"w{i}") for i in range(40, 80)]
        await publisher.publish_many([*good[:20], bad, *good[20:]])
        await eventually(lambda: len(probe.committed) >= 80, 20, "the next 40")
        letters = await dead_letters(publisher, "dlq.scheduler", 1)
    finally:
        await probe.stop()
    assert sorted(probe.committed) == sorted(f"w{i}" for i in range(80))  # each once
    body, headers = letters[0]
    assert Envelope.from_json(body).event_id == bad.event_id
    reason = str(headers["x-poison-reason"])
    assert reason.startswith(f"handler failed {bus_settings.handler_attempts} times")
    assert "this one always fails" in reason
    assert not dead


async def dead_letters(bus: Bus, queue: str, count: int) -> list[tuple[bytes, dict[str, Any]]]:
    """Wait for `count` dead letters in `queue` (bodies and headers), then take them."""
    letters: list[tuple[bytes, dict[str, Any]]] = []
    if isinstance(bus, MemoryBus):
        await eventually(lambda: len(bus.broker.queues[queue].messages) >= count, 20,
                         "the dead letters")
        return [(m.body, dict(m.headers)) for m in bus.broker.dead_letters(queue[4:])]
    assert isinstance(bus, AmqpBus)
    dlq = await (await bus.channel()).get_queue(queue)

    async def taken() -> bool:
        message = await dlq.get(no_ack=True, fail=False)
        if message is not None:
            letters.append((message.body, dict(message.headers or {})))
        return len(letters) >= count

    await until(taken, 20, "the dead letters")
    return letters


async def test_poison_is_dead_lettered_at_once_with_its_reason(
        started: Callable[..., Any], new_bus: BusFactory, bus_settings: Settings) -> None:
    publisher = await started("publisher")
    await publisher.declare(SCHEDULER_INBOX)
    probe = Probe(bus_settings, bus=new_bus("scheduler"))
    await probe.start()
    try:
        if isinstance(publisher, MemoryBus):
            from services.memory_bus import Stored
            publisher.broker.route("runner.commands", "command.StopRunner", Stored(b"{not json"))
        else:
            await publisher.publish_raw(b"{not json", exchange="runner.commands",
                                        routing_key="command.StopRunner")
        await publisher.publish(stop("w1"))
        await eventually(lambda: probe.committed == ["w1"], 20, "the good one")
        letters = await dead_letters(publisher, "dlq.scheduler", 1)
    finally:
        await probe.stop()
    body, headers = letters[0]
    assert body == b"{not json"
    assert str(headers["x-poison-reason"]).startswith("invalid message")
    assert headers["x-original-routing-key"] == "command.StopRunner"


async def test_a_running_service_forgets_processed_ids_after_the_retention(
        started: Callable[..., Any], new_bus: BusFactory, bus_settings: Settings) -> None:
    settings = bus_settings.model_copy(update={"ledger_retention": 1.0,
                                               "ledger_prune_every": 0.2})
    publisher = await started("publisher")
    await publisher.declare(SCHEDULER_INBOX)
    probe = Probe(settings, bus=new_bus("scheduler"))
    await probe.start()

    async def ledger_size() -> int:
        async with probe.store.reading() as connection:
            return (await connection.execute(text("SELECT count(*) FROM processed"))).scalar()

    async def ledger_size_is(size: int) -> bool:
        return await ledger_size() == size

    try:
        await publisher.publish_many([stop(f"w{i}") for i in range(10)])
        await eventually(lambda: len(probe.committed) == 10, 20, "the ten stops")
        assert await ledger_size() == 10
        await until(lambda: ledger_size_is(0), 10, "the ledger to forget them")
    finally:
        await probe.stop()
    assert sorted(probe.committed) == sorted(f"w{i}" for i in range(10))
