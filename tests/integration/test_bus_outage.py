"""A bus cut off from the broker (its own broker user, refused and disconnected, in a vhost of
its own: nobody else's connections are touched) refuses at once with `BusUnavailable`, says so
once, and is back with its consumers within seconds of the broker letting it in again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from yarl import URL

from events.queries import StatusQuery
from services.bus import AmqpBus, BusUnavailable, CallInterrupted
from services.settings import Settings
from services.topology import MONITOR_RPC, rpc_queue
from tests.conftest import rabbitmqctl
from tests.integration.broker_helpers import eventually, stop, stops_collected

pytestmark = pytest.mark.broker

BACK_WITHIN = 3.0  # seconds from the broker letting the bus in again to the bus being up


@pytest.fixture
def cut_user(vhost: str) -> Iterator[str]:
    """A broker user of the test's own, allowed into `vhost`."""
    user = f"test-cut-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_user", user, "pw")
    rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    yield user
    with contextlib.suppress(RuntimeError):
        rabbitmqctl("delete_user", user)


def cut_off(vhost: str, user: str) -> None:
    """An outage for `user` alone: refused from now on, its connections closed."""
    rabbitmqctl("clear_permissions", "-p", vhost, user)
    for line in rabbitmqctl("list_connections", "user", "pid", "--no-table-headers").splitlines():
        name, _, pid = line.partition("\t")
        if name == user:
            with contextlib.suppress(RuntimeError):  # gone already
                rabbitmqctl("close_connection", pid.strip(), "test: broker outage")


def let_in(vhost: str, user: str) -> None:
    rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")


@pytest.fixture
def received() -> list[str]:
    return []


@pytest.fixture
async def cut_bus(settings: Settings, cut_user: str, received: list[str]) -> AsyncIterator[AmqpBus]:
    """A bus connected as `cut_user`, consuming the scheduler's inbox: the worker ids of the
    stops it gets go to `received`."""
    url = str(URL(settings.amqp_url).with_user(cut_user).with_password("pw"))
    bus = await stops_collected(settings.model_copy(update={"amqp_url": url}), "cut", received)
    yield bus
    await bus.close()


async def status(query: StatusQuery) -> dict[str, int]:
    return {"workers": 0}


@pytest.fixture
async def status_server(settings: Settings) -> AsyncIterator[AmqpBus]:
    """A bus answering `StatusQuery` on the monitor's RPC queue."""
    server = AmqpBus(settings, "monitor")
    server.serve(MONITOR_RPC, {StatusQuery: status})
    await server.start()
    yield server
    await server.close()


async def out_and_back(bus: AmqpBus, vhost: str, user: str) -> None:
    """An outage of `user`'s connections, noticed by `bus`, and its return."""
    cut_off(vhost, user)
    await eventually(lambda: not bus.connected(), 5.0, "the bus to notice the outage")
    let_in(vhost, user)
    assert await bus.until_connected(timeout=10.0)


@pytest.fixture
async def other_bus(settings: Settings) -> AsyncIterator[AmqpBus]:
    bus = AmqpBus(settings, "other")
    await bus.start()
    yield bus
    await bus.close()



async def test_a_cut_off_bus_refuses_at_once_says_so_once_and_comes_back_with_its_consumers(
    cut_bus: AmqpBus, other_bus: AmqpBus, vhost: str, cut_user: str, received: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.bus")
    cut_off(vhost, cut_user)
    await eventually(lambda: not cut_bus.connected(), 5.0, "the bus to notice the outage")

    began = time.monotonic()
    with pytest.raises(BusUnavailable):
        await cut_bus.publish(stop("w-during"))
    with pytest.raises(BusUnavailable):  # what the outbox publishes: it waits for the bus
        await cut_bus.publish_many([stop("w-during-1"), stop("w-during-2")])
    with pytest.raises(BusUnavailable):
        await cut_bus.request(rpc_queue("monitor"), StatusQuery())
    assert time.monotonic() - began < 0.5  # refused at once, not after a timeout
    assert not await cut_bus.until_connected(timeout=0.5)  # still refused: still down

    let_in(vhost, cut_user)
    back = time.monotonic()
    assert await cut_bus.until_connected(timeout=10.0)
    assert time.monotonic() - back < BACK_WITHIN

    await cut_bus.publish(stop("w-own"))  # publishes again, and its consumer is back
    await other_bus.publish(stop("w-other"))
    await eventually(lambda: {"w-own", "w-other"} <= set(received), 5.0, "both stops consumed")

    ours = [r for r in caplog.records if r.name == "services.bus"]
    assert [(r.levelname, "lost" in r.getMessage()) for r in ours] == [
        ("WARNING", True), ("INFO", False)], [r.getMessage() for r in ours]
    assert "back after" in ours[1].getMessage()
    assert not any(r.exc_info for r in ours)


async def test_a_call_in_flight_when_the_connection_drops_fails_at_once(
    cut_bus: AmqpBus, vhost: str, cut_user: str,
) -> None:
    await cut_bus.declare(rpc_queue("nobody"))
    call = asyncio.create_task(  # nobody answers: without the outage it would wait 10 s
        cut_bus.request(rpc_queue("nobody"), StatusQuery(), timeout=10.0))
    await eventually(lambda: cut_bus._pending, 5.0, "the request sent")
    cut_off(vhost, cut_user)  # blocks the loop while rabbitmqctl runs
    cut = time.monotonic()
    with pytest.raises(CallInterrupted):  # sent: the service may still act on it
        await call
    assert time.monotonic() - cut < 2.0  # not the call's 10 s timeout
    let_in(vhost, cut_user)
    assert await cut_bus.until_connected(timeout=10.0)


async def test_a_publishing_channel_that_did_not_come_back_is_replaced(
    cut_bus: AmqpBus, received: list[str],
) -> None:
    await cut_bus._publish_channel.close()  # type: ignore[union-attr]  # closed for good
    await cut_bus.publish(stop("w-after"))
    await eventually(lambda: "w-after" in received, 5.0, "the stop consumed")


async def test_a_consumer_whose_channel_did_not_come_back_consumes_again(
    cut_bus: AmqpBus, other_bus: AmqpBus, vhost: str, cut_user: str, received: list[str],
) -> None:
    subscription = cut_bus._consumers[0]._subscription
    await subscription._channel.close()  # closed for good: the client will not restore it
    await out_and_back(cut_bus, vhost, cut_user)
    await other_bus.publish(stop("w-after"))
    await eventually(lambda: "w-after" in received, 5.0, "the stop consumed")


async def test_calls_are_answered_again_after_an_outage(
    status_server: AmqpBus, cut_bus: AmqpBus, vhost: str, cut_user: str,
) -> None:
    """The caller's reply queue (auto-delete, gone with its connection) comes back with the
    connection, bound again, and answers reach it."""
    assert await cut_bus.request(MONITOR_RPC, StatusQuery()) == {"workers": 0}
    await out_and_back(cut_bus, vhost, cut_user)
    assert await cut_bus.request(MONITOR_RPC, StatusQuery(), timeout=5.0) == {"workers": 0}


async def test_a_transient_queue_consumer_the_broker_drops_silently_after_a_return_comes_back(
    settings: Settings, other_bus: AmqpBus, vhost: str, cut_user: str,
) -> None:
    """After a reconnect, the broker can drop a transient queue's consumer without telling the
    client (the queue restored onto the stale record of a dead node, which the cluster then
    deletes): the server finds its consumer unlisted and consumes again, so calls are answered
    again. Here the consumer is cancelled under the client's feet, which is what it sees."""
    url = str(URL(settings.amqp_url).with_user(cut_user).with_password("pw"))
    server = AmqpBus(settings.model_copy(update={"amqp_url": url}), "monitor")
    server.serve(MONITOR_RPC, {StatusQuery: status})
    await server.start()
    try:
        await out_and_back(server, vhost, cut_user)
        subscription = server._consumers[0]._subscription
        await eventually(lambda: not subscription._channel.is_closed, 5.0, "its channel back")
        underlay = await subscription._channel.get_underlay_channel()
        await underlay.basic_cancel(subscription._consumer_tag)  # the client still consumes
        assert await other_bus.request(MONITOR_RPC, StatusQuery(), timeout=10.0) == {"workers": 0}
    finally:
        await server.close()


async def test_a_caller_whose_replies_consumer_the_broker_drops_silently_consumes_again(
    status_server: AmqpBus, cut_bus: AmqpBus, vhost: str, cut_user: str,
) -> None:
    """The same for a caller's own reply queue: it is made again, and answers reach it."""
    assert await cut_bus.request(MONITOR_RPC, StatusQuery()) == {"workers": 0}
    await out_and_back(cut_bus, vhost, cut_user)
    replies = cut_bus._rpc_channel
    assert replies is not None
    await eventually(lambda: not replies.is_closed, 5.0, "its reply channel back")
    underlay = await replies.get_underlay_channel()
    for tag in list(underlay.consumers):
        await underlay.basic_cancel(tag)  # the client still consumes
    await eventually(lambda: cut_bus._rpc_channel is not replies, 10.0, "replies made again")
    assert await cut_bus.request(MONITOR_RPC, StatusQuery(), timeout=5.0) == {"workers": 0}
