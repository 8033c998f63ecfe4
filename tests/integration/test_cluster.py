"""The bus on a three-node RabbitMQ cluster (private nodes beside the default one): quorum
queues replicated on every node, a connection that fails over when its node is killed, and a
publish nacked after a leader change confirmed on a fresh channel (a batch's in its order);
and, on the default broker, a connection attempt that fails moving on to the next node listed."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest
from yarl import URL

import services.bus
from events.queries import StatusQuery
from services.bus import AmqpBus, Delivery, FailoverConnection, RpcError, RpcTimeout
from services.cli.local import free_port
from services.settings import Settings
from services.topology import (
    ENTITLEMENT_INBOX,
    MONITOR_LOG,
    SCHEDULER_INBOX,
    STATIC_QUEUES,
    rpc_queue,
)
from tests.integration.broker_helpers import stop, stops_collected, until
from tests.rabbit_nodes import RabbitCluster

pytestmark = pytest.mark.broker

FAILOVER_WITHIN = 3.0  # seconds from a node's death to its clients publishing and consuming



def node_of(bus: AmqpBus, cluster: RabbitCluster) -> str:
    """The node `bus` is connected to."""
    port = bus._connection.url.port  # type: ignore[union-attr]
    return next(name for name, node in cluster.nodes.items() if node.port == port)


@pytest.fixture
def received() -> list[str]:
    return []


@pytest.fixture
async def bus(cluster_url: str, received: list[str]) -> AsyncIterator[AmqpBus]:
    """A bus on every node of the cluster, consuming the scheduler's inbox (the worker ids of
    the stops it gets go to `received`)."""
    bus = await stops_collected(Settings(amqp_url=cluster_url, request_timeout=5.0),
                                "cluster-test", received)
    yield bus
    await bus.close()


async def test_quorum_queues_are_replicated_on_every_node(
    bus: AmqpBus, rabbit_cluster: RabbitCluster,
) -> None:
    for queue in (SCHEDULER_INBOX, ENTITLEMENT_INBOX, MONITOR_LOG):
        assert rabbit_cluster.members(queue.name, bus.settings.vhost) == sorted(
            rabbit_cluster.names), queue.name


async def test_the_connection_fails_over_when_its_node_is_killed_and_its_consumer_resumes(
    bus: AmqpBus, rabbit_cluster: RabbitCluster, received: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.bus")
    await bus.publish(stop("w-before"))
    await until(lambda: "w-before" in received, 5.0, "the stop before the kill")

    victim = node_of(bus, rabbit_cluster)
    rabbit_cluster.kill(victim)
    killed = time.monotonic()
    await until(lambda: bus.connected() and node_of(bus, rabbit_cluster) != victim,
                FAILOVER_WITHIN, "the bus connected to another node")
    await until(lambda: publishes(bus, "w-after"), FAILOVER_WITHIN, "a confirmed publish")
    await until(lambda: "w-after" in received, FAILOVER_WITHIN, "the stop after the kill")
    assert time.monotonic() - killed < FAILOVER_WITHIN
    # at least once: "w-before" comes again if its ack was still on the way (the services'
    # ledger skips such a copy)
    assert set(received) == {"w-before", "w-after"}

    rabbit_cluster.restart(victim)
    assert victim in rabbit_cluster.cluster_members(via=victim)  # it rejoined
    ours = [r for r in caplog.records if r.name == "services.bus"]
    assert not any(r.exc_info for r in ours)


async def publishes(bus: AmqpBus, worker_id: str) -> bool:
    try:
        await bus.publish(stop(worker_id))
    except Exception:  # a leader being elected: try again
        return False
    return True


async def test_publishes_nacked_after_a_leader_change_are_confirmed_on_a_fresh_channel_in_order(
    cluster_url: str, rabbit_cluster: RabbitCluster, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="services.bus")
    vhost = URL(Settings(amqp_url=cluster_url).amqp_nodes[0]).path.lstrip("/")
    declaring = AmqpBus(Settings(amqp_url=cluster_url), "declare")
    await declaring.start()  # the topology, on every node
    await declaring.close()
    leader = rabbit_cluster.leaders(vhost)[SCHEDULER_INBOX.name]
    # a bus on another node than the leader, its publishing channel opened before the kill
    other = next(n for n in rabbit_cluster.names if n != leader)
    lone = f"amqp://guest:guest@127.0.0.1:{rabbit_cluster.node(other).port}/{vhost}"
    one, many = (AmqpBus(Settings(amqp_url=lone, request_timeout=5.0), name)
                 for name in ("nacked-one", "nacked-many"))
    await one.start()
    await many.start()
    sent = [f"w-nacked-{i}" for i in range(20)]
    try:
        rabbit_cluster.kill(leader)
        # the channels' first publishes to the queue, while a new leader is being elected: the
        # broker nacks them, and every later one on that channel
        await asyncio.gather(one.publish(stop("w-nacked")),  # raise unless confirmed in the end
                             many.publish_many(stop(worker) for worker in sent))
    finally:
        await one.close()
        await many.close()
        rabbit_cluster.restart(leader)
    nacks = [r.getMessage() for r in caplog.records if "nacked" in r.getMessage()]
    assert any("publish to" in m for m in nacks) and any("publishes nacked" in m for m in nacks)

    received: list[str] = []
    reader = await stops_collected(Settings(amqp_url=lone), "reader", received)
    try:
        await until(lambda: set(sent) <= set(received), 10.0, "every stop of the batch")
    finally:
        await reader.close()
    assert [w for w in dict.fromkeys(received) if w in sent] == sent  # in the order sent


async def test_a_queue_gone_with_another_node_is_declared_again_by_its_consumer(
    cluster_url: str, rabbit_cluster: RabbitCluster,
) -> None:
    """A transient queue (an RPC queue) lives on the node of whichever service declared it
    first. Killed with that node while its consumer is connected to another, the consumer is
    cancelled by the broker, and the client's recovery (aio-pika's robust channel) declares the
    queue again and consumes it: queries are answered once more."""
    vhost = Settings(amqp_url=cluster_url).vhost
    first, other, third = rabbit_cluster.names

    def on(node: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{rabbit_cluster.node(node).port}/{vhost}"

    declaring = AmqpBus(Settings(amqp_url=on(first)), "first")
    await declaring.start()  # the static topology: the RPC queues on `first`
    await declaring.close()
    queue = rpc_queue("monitor")
    server = AmqpBus(Settings(amqp_url=on(other)), "server")

    async def status(_: StatusQuery) -> dict[str, bool]:
        return {"answered": True}

    server.serve(queue, {StatusQuery: status})
    caller = AmqpBus(Settings(amqp_url=on(third), request_timeout=5.0), "caller")
    await server.start()
    await caller.start()
    try:
        assert await caller.request(queue, StatusQuery()) == {"answered": True}
        assert rabbit_cluster.home(queue.name, vhost) == first  # not its consumer's node
        rabbit_cluster.kill(first)

        async def answered() -> bool:
            try:
                return await caller.request(queue, StatusQuery(), timeout=1.0) == {
                    "answered": True}
            except RpcError:  # not declared again yet
                return False

        await until(answered, 10.0, "the query answered after the queue's node died")
    finally:
        await caller.close()
        await server.close()
        rabbit_cluster.restart(first)


async def test_a_failed_attempt_moves_on_to_the_next_node(
        vhost: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the default broker, listed after a node that answers nothing."""
    nowhere = free_port()
    listed = f"amqp://guest:guest@127.0.0.1:{nowhere},127.0.0.1:5672/{vhost}"
    monkeypatch.setattr(services.bus.random, "randrange", lambda _: 0)  # the silent node first
    bus = AmqpBus(Settings(amqp_url=listed), "failover")
    await bus.start()
    try:
        assert bus._connection.url.port == 5672  # type: ignore[union-attr]
    finally:
        await bus.close()
    # the client's own attempts (no fail-fast), starting at the silent node
    connection = await aio_pika.connect_robust(
        f"amqp://guest:guest@127.0.0.1:{nowhere}/{vhost}", fail_fast=False,
        reconnect_interval=0.1, connection_class=functools.partial(
            FailoverConnection, nodes=Settings(amqp_url=listed).amqp_nodes))
    try:
        assert connection.url.port == 5672
    finally:
        await connection.close()


async def test_a_request_to_a_queue_that_is_gone_is_refused_at_once(amqp_url: str) -> None:
    """A transient RPC queue dies with its cluster node until its service declares it again:
    the request comes back (mandatory) instead of waiting out its timeout."""
    bus = AmqpBus(Settings(amqp_url=amqp_url), "caller")
    await bus.start()
    try:
        began = time.monotonic()
        with pytest.raises(RpcError, match="not there") as refused:
            await bus.request(rpc_queue("gone"), StatusQuery(), timeout=10.0)
        assert not isinstance(refused.value, RpcTimeout)
        assert time.monotonic() - began < 2.0
    finally:
        await bus.close()


async def test_a_service_starts_while_the_node_of_a_dead_letter_queue_is_down(
    cluster_url: str, rabbit_cluster: RabbitCluster, caplog: pytest.LogCaptureFixture,
) -> None:
    """The classic `dlq.*` queues live on the node that declared them first: while it is down
    they cannot be declared, and a service starting meanwhile skips them, saying so (so too a
    transient queue of that node caught as the cluster removes it)."""
    caplog.set_level(logging.WARNING, logger="services.bus")
    vhost = Settings(amqp_url=cluster_url).vhost
    home = rabbit_cluster.names[0]
    alone = f"amqp://guest:guest@127.0.0.1:{rabbit_cluster.node(home).port}/{vhost}"
    first = AmqpBus(Settings(amqp_url=alone), "first")
    await first.start()  # the whole topology, its classic queues on `home`
    await first.close()
    rabbit_cluster.kill(home)
    try:
        bus = AmqpBus(Settings(amqp_url=cluster_url), "later")
        got: list[Delivery] = []

        async def collect(deliveries: list[Delivery]) -> None:
            got.extend(deliveries)

        bus.consume_batches(SCHEDULER_INBOX, collect)
        await bus.start()
        try:
            await bus.publish(stop("w-later"))  # and it works: its own queues are there
            await until(lambda: got, 5.0, "the stop consumed")
        finally:
            await bus.close()
    finally:
        rabbit_cluster.restart(home)
    skipped = [r.getMessage() for r in caplog.records if "not declared" in r.getMessage()]
    # the dead-letter queues, and maybe a transient one of the dead node's being removed with it
    # (the cluster deletes those as it notices the node gone)
    assert any("dlq." in m for m in skipped), skipped
    transient = [q.name for q in STATIC_QUEUES if not q.durable]
    assert all("dlq." in m or any(f"queue {name} " in m for name in transient)
               for m in skipped), skipped
