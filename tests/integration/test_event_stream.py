"""`GET /events` on the real broker: the monitor records, the gateway streams. A user sees only
their own events; a stream cut and resumed from its last id misses none and repeats none; a
client that reads nothing is cut while another keeps receiving every event promptly."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from events import Envelope, UpgradeEntitlement
from events.queries import HeadQuery, LogQuery
from runner_client import Event, RunnerClient, RunnerError
from services.bus import AmqpBus
from services.cli.local import free_port
from services.gateway.service import GatewayService
from services.monitor.service import MonitorService
from services.settings import Settings
from services.topology import MONITOR_RPC
from tests.integration.broker_helpers import eventually

pytestmark = pytest.mark.broker

ADMIN = "test-admin-token-of-32-characters-at-least"


@contextlib.asynccontextmanager
async def gateway_of(settings: Settings, **env: Any) -> AsyncIterator[GatewayService]:
    gateway = GatewayService(settings.model_copy(update={"http_port": free_port(),
                                                         "admin_token": ADMIN, **env}))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


@contextlib.asynccontextmanager
async def publisher(settings: Settings) -> AsyncIterator[AmqpBus]:
    bus = AmqpBus(settings, "test")
    await bus.start()
    try:
        yield bus
    finally:
        await bus.close()


def upgrade(user: str) -> Envelope:
    return Envelope.wrap(UpgradeEntitlement(tier="pro", days=1), stream=f"user-{user}",
                         user_id=user)


def url(gateway: GatewayService) -> str:
    return f"http://127.0.0.1:{gateway.settings.http_port}"


async def take(events: AsyncIterator[Event], count: int, timeout: float = 10.0) -> list[Event]:
    got: list[Event] = []

    async def run() -> None:
        async for event in events:
            got.append(event)
            if len(got) == count:
                return

    await asyncio.wait_for(run(), timeout)
    return got


async def test_a_user_streams_only_their_events_and_resumes_without_gap_or_duplicate(
        settings: Settings) -> None:
    monitor = MonitorService(settings)
    await monitor.start()
    try:
        async with gateway_of(settings) as gateway, publisher(settings) as bus, \
                RunnerClient(url(gateway), ADMIN) as admin:
            ann = RunnerClient(url(gateway), await admin.add_user("ann"))
            await admin.add_user("bob")
            await bus.publish_many([upgrade(u) for u in ["ann", "bob"] * 5])
            await eventually(lambda: monitor.folded.position == 10, 10, "ten recorded")

            # from the start: the history, ann's only
            async with contextlib.aclosing(ann.events(after=0)) as stream:
                first = await take(stream, 3)
            assert [e.position for e in first] == [1, 3, 5]
            assert {e.user_id for e in first} == {"ann"}

            # resumed after the third: the rest of the history, then live events
            async with contextlib.aclosing(ann.events(after=first[-1].position)) as stream:
                rest = asyncio.ensure_future(take(stream, 2 + 5))
                await eventually(lambda: gateway.tail.subscribers == 1, 10, "ann subscribed")
                sent = time.perf_counter()
                await bus.publish_many([upgrade(u) for u in ["bob", "ann"] * 5])
                resumed = await rest
                latency = time.perf_counter() - sent
            positions = [e.position for e in first + resumed]
            assert positions == [1, 3, 5, 7, 9, 12, 14, 16, 18, 20]
            assert {e.user_id for e in resumed} == {"ann"}
            assert latency < 2.0, f"live events took {latency:.3f}s"

            # the admin: everyone's, or one user's; a user may not ask for another's
            async with contextlib.aclosing(admin.events(after=0, follow=False)) as stream:
                every = [e.position async for e in stream]
            assert every == list(range(1, 21))
            async with contextlib.aclosing(admin.events(after=0, user_id="bob", follow=False,
                                                        types=["UpgradeEntitlement"])) as stream:
                bobs = [e async for e in stream]
            assert {e.user_id for e in bobs} == {"bob"} and len(bobs) == 10
            with pytest.raises(RunnerError) as refused:
                async with contextlib.aclosing(ann.events(user_id="bob")) as stream:
                    await anext(stream)
            assert refused.value.status == 403
            with pytest.raises(RunnerError) as bad_type:
                async with contextlib.aclosing(ann.events(types=["NoSuchEvent"])) as stream:
                    await anext(stream)
            assert bad_type.value.status == 422
            await ann.close()
    finally:
        await monitor.stop()


async def test_the_last_event_id_header_wins_over_after(settings: Settings) -> None:
    """A browser's EventSource reconnects to the same URL (with `?after=`) and sends the last
    id it saw: the stream goes on from that id."""
    monitor = MonitorService(settings)
    await monitor.start()
    try:
        async with gateway_of(settings) as gateway, publisher(settings) as bus:
            await bus.publish_many([upgrade("ann") for _ in range(4)])
            await eventually(lambda: monitor.folded.position == 4, 10, "four recorded")
            async with httpx.AsyncClient(base_url=url(gateway), headers={
                    "Authorization": f"Bearer {ADMIN}"}) as http:
                response = await http.get("/events", params={"after": 0, "follow": "false"},
                                          headers={"Last-Event-ID": "2"})
                ids = [line for line in response.text.splitlines() if line.startswith("id:")]
                assert ids == ["id: 3", "id: 4"]
                assert response.headers["content-type"].startswith("text/event-stream")
                bad = await http.get("/events", headers={"Last-Event-ID": "x"})
                assert bad.status_code == 422 and bad.json()["success"] is False
                anonymous = await http.get("/events", headers={"Authorization": ""})
                assert anonymous.status_code == 401
    finally:
        await monitor.stop()


class StandInLog:
    """The monitor's `log` and `head` ops over a list, answering long polls (so that tens of
    thousands of entries can be made in a moment)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.appended = asyncio.Event()

    def append(self, count: int, user: str) -> None:
        padding = "x" * 800  # a few MB in all: more than the sockets' buffers hold
        for _ in range(count):
            position = len(self.rows) + 1
            self.rows.append({"position": position, "envelope": {
                "type": "UpgradeEntitlement", "user_id": user, "stream": f"user-{user}",
                "occurred_at": "2026-01-01T00:00:00+00:00",
                "payload": {"tier": "pro", "days": 1, "note": padding}}})
        self.appended.set()
        self.appended = asyncio.Event()

    async def head(self, query: HeadQuery) -> Any:
        return {"position": len(self.rows)}

    async def page(self, query: LogQuery) -> Any:
        if len(self.rows) <= query.after and query.wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.appended.wait(), query.wait)
        return self.rows[query.after:query.after + query.limit]


async def test_a_client_reading_nothing_is_cut_and_the_others_are_not_delayed(
        settings: Settings) -> None:
    log = StandInLog()
    stand_in = AmqpBus(settings, "stand-in")
    stand_in.serve(MONITOR_RPC, {HeadQuery: log.head, LogQuery: log.page})
    await stand_in.start()
    try:
        async with gateway_of(settings, sse_buffer=2000) as gateway:
            await eventually(lambda: gateway.tail.ready.is_set(), 10, "the tail")
            # the slow client: asks for the stream, then never reads (a small receive buffer)
            slow = socket.socket()
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.connect(("127.0.0.1", gateway.settings.http_port))
            slow.sendall(b"GET /events?after=0 HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + ADMIN.encode() + b"\r\n\r\n")
            await eventually(lambda: gateway.tail.subscribers == 1, 10, "the slow subscriber")

            async with RunnerClient(url(gateway), ADMIN) as fast:
                stream = fast.events(after=0, reconnect=False)
                total, received, worst = 0, 0, 0.0
                async with contextlib.aclosing(stream):
                    for _ in range(12):  # 12 bursts of 1,000 entries, 10 MB in all
                        log.append(1000, "ann")
                        sent, total = time.perf_counter(), total + 1000
                        got = await take(stream, 1000, timeout=20)
                        worst = max(worst, time.perf_counter() - sent)
                        received += len(got)
                        assert got[-1].position == total
            assert received == total
            await eventually(lambda: gateway.tail.dropped == 1, 10, "the slow client cut")
            await eventually(lambda: gateway.tail.subscribers == 0, 10, "both streams ended")
            assert worst < 5.0, f"a burst took {worst:.2f}s to reach the fast client"

            # what the slow client gets when it reads at last: events, then the cut
            slow.setblocking(False)
            received_bytes = b""
            deadline = time.monotonic() + 10
            while b"event: dropped" not in received_bytes and time.monotonic() < deadline:
                try:
                    chunk = slow.recv(1 << 20)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
                    continue
                if not chunk:
                    break
                received_bytes += chunk
            slow.close()
            tail_part = received_bytes[received_bytes.index(b"event: dropped"):]
            cut = orjson.loads(tail_part.split(b"data: ", 1)[1].split(b"\n", 1)[0])
            assert "too slow" in cut["error"] and cut["lastEventId"] > 0
    finally:
        await stand_in.close()
