"""Publishers are authenticated by the broker: each service (and each worker-host) connects with
its own login (made here in a vhost of this test's), every message carries it as the AMQP
`user_id` (which RabbitMQ verifies), and a consumer dead-letters a type that login's service may
not emit, or a message of a host's login that names another host. A host's login reads only its
own inbox, which is sent only what names that host."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import aiormq
import pytest
from yarl import URL

from events import Envelope, HostLost, JobAccepted, JobDispatched, StrategyConfig
from events.queries import HeadQuery
from services.bus import AmqpBus, Delivery, TopologyMissing
from services.settings import Settings
from services.topology import (
    MONITOR_RPC,
    SCHEDULER_INBOX,
    BrokerUser,
    Permissions,
    definitions,
    host_inbox,
    host_user,
    password_hash,
    permissions,
    service_user,
    topic_permissions,
)
from tests.conftest import rabbitmqctl
from tests.integration.broker_helpers import eventually
from tests.integration.test_bus_contract import dead_letters

PASSWORD = "forged-publishers-test"


def login(settings: Settings, user: str) -> Settings:
    url = URL(settings.amqp_url).with_user(user).with_password(PASSWORD)
    return settings.model_copy(update={"amqp_url": str(url)})


SERVICES_HERE = ("scheduler", "entitlement", "gateway", "monitor")
HOSTS_HERE = ("h1", "h2")


@pytest.fixture
async def operator(vhost: str, settings: Settings) -> AsyncIterator[AmqpBus]:
    """The topology and `runner-<service>` users with their least permissions on the test's
    vhost, imported as a deployment's `rabbitmq/definitions.json` is (a service's login may not
    create a dead-lettered queue, which needs read on it); the bus of an operator (the shared
    guest login) to look at the dead letters. The gateway may also write to the events
    exchange, as if its permissions had been set too wide, so that the consumer's check is what
    stops its HostLost."""
    users = []
    for service in SERVICES_HERE:
        granted = permissions(service)
        if service == "gateway":
            granted = Permissions(granted.configure, ".*", granted.read)
        users.append(BrokerUser(service_user(service, vhost), password_hash(PASSWORD), granted,
                                topics=topic_permissions(service)))
    for host in HOSTS_HERE:
        users.append(BrokerUser(host_user(host, vhost), password_hash(PASSWORD),
                                permissions("worker-host", host),
                                topics=topic_permissions("worker-host", host)))
    rabbitmqctl("import_definitions", stdin=json.dumps(definitions(vhost, users)))
    bus = AmqpBus(settings, "operator")
    await bus.start()
    try:
        yield bus
    finally:
        await bus.close()
        for user in users:
            with contextlib.suppress(RuntimeError):
                rabbitmqctl("delete_user", user.name)


@pytest.fixture
async def buses(settings: Settings, operator: AmqpBus
                ) -> AsyncIterator[Callable[[str], Awaitable[AmqpBus]]]:
    started: list[AmqpBus] = []

    async def start(service: str, prepare: Callable[[AmqpBus], None] = lambda bus: None,
                    host: str | None = None) -> AmqpBus:
        user = (host_user(host, settings.vhost) if host is not None
                else service_user(service, settings.vhost))
        bus = AmqpBus(login(settings, user), service)
        prepare(bus)
        await bus.start()
        started.append(bus)
        return bus

    yield start
    for bus in reversed(started):
        await bus.close()


def accepted(job: str) -> Envelope:
    return Envelope.wrap(JobAccepted(job_id=job, worker_id=f"w-{job}", tier="pro",
                                     max_workers=3, in_use=1), stream=f"job-{job}")


async def test_a_message_from_a_service_that_may_not_emit_it_is_dead_lettered(
        settings: Settings, buses: Callable[..., Awaitable[AmqpBus]], operator: AmqpBus,
        caplog: pytest.LogCaptureFixture) -> None:
    handled: list[Envelope] = []

    async def handler(deliveries: list[Delivery]) -> None:
        handled.extend(d.envelope for d in deliveries)

    await buses("scheduler",
                            lambda bus: bus.consume_batches(SCHEDULER_INBOX, handler))
    host, gateway = await buses("worker-host", host="h1"), await buses("gateway")
    entitlement = await buses("entitlement")
    forged_accept = accepted("j1")
    forged_lost = Envelope.wrap(HostLost(host_id="h1", silent_for=9.0), stream="host-h1")
    genuine = accepted("j2")
    with caplog.at_level(logging.WARNING, logger="services.bus"):
        await host.publish(forged_accept)
        await gateway.publish(forged_lost)
        await entitlement.publish(genuine)
        await eventually(lambda: handled, 10, "the genuine JobAccepted")
        letters = await dead_letters(operator, "dlq.scheduler", 2)
    assert [e.event_id for e in handled] == [genuine.event_id]  # the forged ones never ran
    h1 = host_user("h1", settings.vhost)
    reasons = {Envelope.from_json(body).event_id: headers for body, headers in letters}
    assert reasons[forged_accept.event_id]["x-poison-reason"] == (
        f"published by {h1}, which may not emit JobAccepted")
    assert reasons[forged_accept.event_id]["x-original-user-id"] == h1
    assert reasons[forged_lost.event_id]["x-poison-reason"] == (
        f"published by {service_user('gateway', settings.vhost)}, which may not emit HostLost")
    warnings = [r.getMessage() for r in caplog.records if "may not emit" in r.getMessage()]
    assert len(warnings) == 2, warnings


async def test_the_broker_refuses_another_logins_user_id_and_an_exchange_not_in_the_row(
        settings: Settings, operator: AmqpBus) -> None:
    """A host cannot publish as the entitlement service; the scheduler, which publishes events
    only, cannot publish a command."""
    host = await aio_pika.connect(login(settings, host_user("h1", settings.vhost)).amqp_url)
    async with host:
        exchange = await (await host.channel()).get_exchange("runner.events")
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed,
                           match="user_id property set to 'runner-entitlement'"):
            await exchange.publish(
                aio_pika.Message(accepted("j3").to_json(), user_id="runner-entitlement"),
                routing_key="event.JobAccepted")
    scheduler_user = service_user("scheduler", settings.vhost)
    scheduler = await aio_pika.connect(login(settings, scheduler_user).amqp_url)
    async with scheduler:
        channel = await scheduler.channel()
        exchange = await channel.get_exchange("runner.commands", ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused,
                           match=r"exchange 'runner\.commands' .* refused for user 'runner-sch"):
            await exchange.publish(aio_pika.Message(b"{}", user_id="runner-scheduler"),
                                   routing_key="command.StopRunner")


def dispatched(job: str, host: str) -> Envelope:
    return Envelope.wrap(JobDispatched(
        job_id=job, worker_id=f"w-{job}", host_id=host, strategy_id="s", broker_id="paper",
        credentials_sealed="sealed", config=StrategyConfig(name="s", type="s")),
        stream=f"job-{job}")


async def test_each_host_is_sent_only_the_dispatches_that_name_it(
        buses: Callable[..., Awaitable[AmqpBus]]) -> None:
    """Each host declares its own inbox with its own login; the scheduler's dispatch to one
    host reaches that host only."""
    received: dict[str, list[str]] = {"h1": [], "h2": []}

    def inbox_of(host: str) -> Callable[[AmqpBus], None]:
        async def handler(deliveries: list[Delivery]) -> None:
            received[host].extend(d.envelope.payload["job_id"] for d in deliveries)

        return lambda bus: bus.consume_batches(host_inbox(host), handler)

    for host in HOSTS_HERE:
        await buses("worker-host", inbox_of(host), host=host)
    scheduler = await buses("scheduler")
    await scheduler.publish_many([dispatched("j1", "h1"), dispatched("j2", "h2"),
                                  dispatched("j3", "h1")])
    await eventually(lambda: len(received["h1"]) == 2 and len(received["h2"]) == 1, 10,
                     "the dispatches")
    assert received == {"h1": ["j1", "j3"], "h2": ["j2"]}


async def test_a_hosts_login_can_neither_read_another_inbox_nor_bind_to_the_events(
        settings: Settings, operator: AmqpBus) -> None:
    await operator.declare(host_inbox("h2"))
    host = await aio_pika.connect(login(settings, host_user("h1", settings.vhost)).amqp_url)
    async with host:
        channel = await host.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused,
                           match=r"queue 'worker-host\.h2' .* refused for user "
                                 rf"'{re.escape(host_user('h1', settings.vhost))}'"):
            await (await channel.get_queue("worker-host.h2")).consume(lambda m: None)
        channel = await host.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused,
                           match=r"queue 'worker-host\.h1\.everything'"):
            await channel.declare_queue("worker-host.h1.everything", auto_delete=True)
        channel = await host.channel()
        own = await channel.declare_queue("worker-host.h1", durable=True,
                                          arguments=host_inbox("h1").arguments)
        await own.bind("runner.events", routing_key="job.JobDispatched.h1")  # its own: allowed
        for key in ("#", "job.JobDispatched.h2", "job.JobDispatched.#", "*.*.h2"):
            channel = await host.channel()
            own = await channel.get_queue("worker-host.h1")
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused,
                               match=f"topic '{re.escape(key)}' in exchange 'runner.events'"):
                await own.bind("runner.events", routing_key=key)
        channel = await host.channel()
        own = await channel.get_queue("worker-host.h1")
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused,
                           match=r"exchange 'runner\.commands'"):
            await own.bind("runner.commands", routing_key="#")


async def test_a_message_of_a_host_login_naming_another_host_is_dead_lettered(
        settings: Settings, buses: Callable[..., Awaitable[AmqpBus]], operator: AmqpBus,
        caplog: pytest.LogCaptureFixture) -> None:
    """Routed under its own key (the broker refuses a key naming another host), h1's HostLost
    of h2 reaches the scheduler, which dead-letters it unhandled; h1's own HostLost is
    handled."""
    handled: list[Envelope] = []

    async def handler(deliveries: list[Delivery]) -> None:
        handled.extend(d.envelope for d in deliveries)

    await buses("scheduler", lambda bus: bus.consume_batches(SCHEDULER_INBOX, handler))
    h1 = await buses("worker-host", host="h1")
    forged_lost = Envelope.wrap(HostLost(host_id="h2", silent_for=0.0), stream="host-h2")
    genuine = Envelope.wrap(HostLost(host_id="h1", silent_for=0.0), stream="host-h1")
    raw = await aio_pika.connect(login(settings, host_user("h1", settings.vhost)).amqp_url)
    async with raw:
        exchange = await (await raw.channel()).get_exchange("runner.events", ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused,
                           match=r"topic 'host\.HostLost\.h2'"):
            await exchange.publish(aio_pika.Message(forged_lost.to_json(),
                                                    user_id=host_user("h1", settings.vhost)),
                                   routing_key="host.HostLost.h2")
        exchange = await (await raw.channel()).get_exchange("runner.events", ensure=False)
        with caplog.at_level(logging.WARNING, logger="services.bus"):
            await exchange.publish(aio_pika.Message(forged_lost.to_json(), type="HostLost",
                                                    user_id=host_user("h1", settings.vhost)),
                                   routing_key="host.HostLost.h1")
            await h1.publish(genuine)
            await eventually(lambda: handled, 10, "the genuine HostLost")
            letters = await dead_letters(operator, "dlq.scheduler", 1)
    assert [e.event_id for e in handled] == [genuine.event_id]
    body, headers = letters[0]
    assert Envelope.from_json(body).event_id == forged_lost.event_id
    assert headers["x-poison-reason"] == (
        f"published by {host_user('h1', settings.vhost)}, which may not emit a HostLost of "
        "host h2")
    assert any("HostLost of host h2" in r.getMessage() for r in caplog.records)


async def test_a_service_login_without_the_topology_is_told_to_run_the_setup(
        settings: Settings, operator: AmqpBus) -> None:
    """A service's login may not declare the shared topology; on a vhost without it, it says
    which step is missing."""
    empty = f"{URL(settings.amqp_url).path.lstrip('/')}-empty"
    rabbitmqctl("add_vhost", empty)
    try:
        granted = permissions("scheduler")
        user = service_user("scheduler", settings.vhost)
        rabbitmqctl("set_permissions", "-p", empty, user, granted.configure, granted.write,
                    granted.read)
        url = URL(login(settings, user).amqp_url).with_path(f"/{empty}")
        bus = AmqpBus(settings.model_copy(update={"amqp_url": str(url)}), "scheduler")
        with pytest.raises(TopologyMissing, match=r"exchange runner\.commands .* `runner bus "
                                                  r"setup`"):
            await bus.start()
        await bus.close()
    finally:
        rabbitmqctl("delete_vhost", empty)


async def test_rpc_travels_on_its_own_exchanges_and_no_login_writes_to_the_default_one(
        settings: Settings, buses: Callable[..., Awaitable[AmqpBus]]) -> None:
    """The gateway asks the monitor over runner.rpc and the answer comes back on
    runner.replies, each with its own login; the services that serve queries may not write to
    the default exchange, which would let them put a message into any queue."""

    async def head(query: HeadQuery) -> dict[str, int]:
        return {"position": 7}

    await buses("monitor", lambda bus: bus.serve(MONITOR_RPC, {HeadQuery: head}))
    gateway = await buses("gateway")
    assert await gateway.request(MONITOR_RPC, HeadQuery()) == {"position": 7}
    for service in ("monitor", "entitlement"):
        user = service_user(service, settings.vhost)
        connection = await aio_pika.connect(login(settings, user).amqp_url)
        async with connection:
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused,
                               match=r"exchange 'amq\.default'"):
                await channel.default_exchange.publish(
                    aio_pika.Message(b"{}", user_id=user),
                    routing_key=SCHEDULER_INBOX.name)
