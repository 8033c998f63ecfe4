"""Publishers are authenticated by the broker: each service connects with its own login (made
here in a vhost of this test's), every message carries it as the AMQP `user_id` (which RabbitMQ
verifies), and a consumer dead-letters a type that login's service may not emit."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import aiormq
import pytest
from yarl import URL

from events import Envelope, HostLost, JobAccepted
from services.bus import AmqpBus, Delivery
from services.settings import Settings
from services.topology import (
    SCHEDULER_INBOX,
    BrokerUser,
    Permissions,
    definitions,
    password_hash,
    permissions,
    service_user,
)
from tests.conftest import rabbitmqctl
from tests.integration.broker_helpers import eventually
from tests.integration.test_bus_contract import dead_letters

PASSWORD = "forged-publishers-test"


def login(settings: Settings, user: str) -> Settings:
    url = URL(settings.amqp_url).with_user(user).with_password(PASSWORD)
    return settings.model_copy(update={"amqp_url": str(url)})


SERVICES_HERE = ("scheduler", "entitlement", "worker-host", "gateway")


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
        users.append(BrokerUser(service_user(service), password_hash(PASSWORD), granted))
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

    async def start(service: str, prepare: Callable[[AmqpBus], None] = lambda bus: None
                    ) -> AmqpBus:
        bus = AmqpBus(login(settings, service_user(service)), service)
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
        buses: Callable[[str], Awaitable[AmqpBus]], operator: AmqpBus,
        caplog: pytest.LogCaptureFixture) -> None:
    handled: list[Envelope] = []

    async def handler(deliveries: list[Delivery]) -> None:
        handled.extend(d.envelope for d in deliveries)

    await buses("scheduler",
                            lambda bus: bus.consume_batches(SCHEDULER_INBOX, handler))
    host, gateway = await buses("worker-host"), await buses("gateway")
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
    reasons = {Envelope.from_json(body).event_id: headers for body, headers in letters}
    assert reasons[forged_accept.event_id]["x-poison-reason"] == (
        "published by runner-worker-host, which may not emit JobAccepted")
    assert reasons[forged_accept.event_id]["x-original-user-id"] == "runner-worker-host"
    assert reasons[forged_lost.event_id]["x-poison-reason"] == (
        "published by runner-gateway, which may not emit HostLost")
    warnings = [r.getMessage() for r in caplog.records if "may not emit" in r.getMessage()]
    assert len(warnings) == 2, warnings


async def test_the_broker_refuses_another_logins_user_id_and_an_exchange_not_in_the_row(
        settings: Settings, operator: AmqpBus) -> None:
    """A host cannot publish as the entitlement service; the scheduler, which publishes events
    only, cannot publish a command."""
    host = await aio_pika.connect(login(settings, service_user("worker-host")).amqp_url)
    async with host:
        exchange = await (await host.channel()).get_exchange("runner.events")
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed,
                           match="user_id property set to 'runner-entitlement'"):
            await exchange.publish(
                aio_pika.Message(accepted("j3").to_json(), user_id="runner-entitlement"),
                routing_key="event.JobAccepted")
    scheduler = await aio_pika.connect(login(settings, service_user("scheduler")).amqp_url)
    async with scheduler:
        channel = await scheduler.channel()
        exchange = await channel.get_exchange("runner.commands", ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused,
                           match=r"exchange 'runner\.commands' .* refused for user 'runner-sch"):
            await exchange.publish(aio_pika.Message(b"{}", user_id="runner-scheduler"),
                                   routing_key="command.StopRunner")
