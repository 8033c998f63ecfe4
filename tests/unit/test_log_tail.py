"""The gateway's event streams over a log held in memory: a stream resumed from any position
gets every wanted position after it once, in order, across the switch from history (the tail's
recent entries, then pages of the log) to live, whatever the interleaving of appends, the tail's
reads and the client's; a subscriber that falls behind is dropped without holding up the rest."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gateway.log_tail import Dropped, EventFilter, LogEntry, LogTail


def row(position: int, user: str, kind: str = "OrderFilled") -> dict[str, Any]:
    return {"position": position,
            "envelope": {"type": kind, "user_id": user, "stream": f"job-{position}",
                         "payload": {"worker_id": f"w-{user}", "job_id": f"j-{user}",
                                     "credentials_sealed": "gAAAA-sealed"}}}


class MemoryLog:
    """The monitor's `log` and `head` RPCs over a list, with the long poll's wait."""

    def __init__(self, users: list[str], delay: float = 0.0) -> None:
        self.rows = [row(n + 1, user) for n, user in enumerate(users)]
        self.delay = delay  # an RPC's round trip
        self.appended = asyncio.Event()
        self.fetches = 0

    def append(self, users: list[str]) -> None:
        for user in users:
            self.rows.append(row(len(self.rows) + 1, user))
        self.appended.set()
        self.appended = asyncio.Event()

    async def fetch(self, after: int, limit: int, wait: float) -> list[dict[str, Any]]:
        self.fetches += 1
        await asyncio.sleep(self.delay)
        if len(self.rows) <= after and wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.appended.wait(), wait)
        return self.rows[after:after + limit]

    async def head(self) -> int:
        return len(self.rows)


async def collect(stream: Any, count: int, timeout: float = 5.0) -> list[LogEntry]:
    got: list[LogEntry] = []

    async def take() -> None:
        async for batch in stream:
            got.extend(batch)
            if len(got) >= count:
                return

    await asyncio.wait_for(take(), timeout)
    return got


users_st = st.lists(st.sampled_from(["ann", "bob"]), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=users_st, at_start=st.integers(0, 40), after=st.integers(0, 80),
       appends=st.lists(users_st, max_size=6), keep=st.integers(0, 30),
       page=st.integers(1, 7), reader_pauses=st.lists(st.integers(0, 4), min_size=1),
       who=st.sampled_from([None, "ann"]))
def test_a_resumed_stream_has_every_wanted_position_once_in_order(
        before: list[str], at_start: int, after: int, appends: list[list[str]], keep: int,
        page: int, reader_pauses: list[int], who: str | None) -> None:
    async def scenario() -> None:
        memory = MemoryLog(before[:at_start])
        tail = LogTail(memory.fetch, memory.head, keep=keep, page=page, wait=0.05, idle=0.02,
                       max_pending=10_000)
        follower = asyncio.create_task(tail.run())
        await tail.ready.wait()
        memory.append(before[at_start:])  # recorded while the tail starts up

        async def producer() -> None:
            for batch in appends:
                for _ in range(len(batch) % 3):
                    await asyncio.sleep(0)
                memory.append(batch)

        start = min(after, len(memory.rows))
        wanted = EventFilter(user_id=who)
        owners = before + [user for batch in appends for user in batch]
        expected = [n for n in range(start + 1, len(owners) + 1)
                    if who is None or owners[n - 1] == who]
        got: list[int] = []

        async def reader() -> None:
            stream = tail.stream(wanted, start)
            pauses = iter(reader_pauses * 1000)
            async for batch in stream:
                for _ in range(next(pauses)):
                    await asyncio.sleep(0)
                for entry in batch:
                    got.append(entry.position)
                    assert entry.user_id == who or who is None
                if len(got) >= len(expected):
                    await stream.aclose()
                    return

        try:
            await asyncio.wait_for(asyncio.gather(producer(), reader()), 10)
        finally:
            await stopped(follower)
        assert got == expected
        assert tail.subscribers == 0

    asyncio.run(scenario())


async def test_a_stream_from_now_shows_only_what_comes_after() -> None:
    memory = MemoryLog(["ann"] * 5)
    tail = LogTail(memory.fetch, memory.head, wait=0.05, idle=0.02)
    follower = asyncio.create_task(tail.run())
    try:
        await tail.ready.wait()
        stream = tail.stream(EventFilter(), None)
        first = asyncio.ensure_future(collect(stream, 2))
        await subscribed(tail, 1)
        memory.append(["bob", "ann"])
        assert [e.position for e in await first] == [6, 7]
    finally:
        await stopped(follower)


async def test_history_only_ends_at_the_position_the_log_had_when_it_began() -> None:
    memory = MemoryLog(["ann", "bob"] * 10)
    tail = LogTail(memory.fetch, memory.head, keep=3, page=4, wait=0.05, idle=0.02)
    follower = asyncio.create_task(tail.run())
    try:
        await tail.ready.wait()
        stream = tail.stream(EventFilter(user_id="bob"), 5, follow=False)
        got = [e.position for e in await anext(stream)]
        memory.append(["bob"])  # after the stream began: not in it
        got += [e.position async for batch in stream for e in batch]
        assert got == [6, 8, 10, 12, 14, 16, 18, 20]
    finally:
        await stopped(follower)


async def test_a_slow_subscriber_is_dropped_and_the_others_keep_every_event() -> None:
    memory = MemoryLog([], delay=0.002)
    tail = LogTail(memory.fetch, memory.head, page=2, wait=0.05, idle=0.02, max_pending=5)
    follower = asyncio.create_task(tail.run())
    try:
        await tail.ready.wait()
        slow = tail.stream(EventFilter(), 0)
        assert await anext(slow) == []  # subscribed, then reads nothing more
        fast = tail.stream(EventFilter(), 0)
        reading = asyncio.ensure_future(collect(fast, 20))
        await subscribed(tail, 2)
        memory.append(["ann"] * 20)  # read two at a time: the fast reader keeps up
        assert [e.position for e in await reading] == list(range(1, 21))
        assert tail.dropped == 1 and tail.subscribers == 1
        try:
            await anext(slow)
            raise AssertionError("the slow stream was not cut")
        except Dropped as cut:
            assert "too slow" in str(cut)
    finally:
        await stopped(follower)


def test_the_frame_is_an_sse_event_withholding_the_sealed_credentials() -> None:
    entry = LogEntry.from_row(row(42, "ann", "StartRunner"))
    head, _, data = entry.frame.partition(b"data: ")
    assert head == b"id: 42\nevent: StartRunner\n"
    assert data.endswith(b"\n\n")
    payload = orjson.loads(data)["payload"]
    assert payload["credentials_sealed"] == "(withheld)" and payload["worker_id"] == "w-ann"
    assert (entry.user_id, entry.worker_id, entry.job_id) == ("ann", "w-ann", "j-ann")


async def test_with_no_stream_open_the_tail_stops_asking_and_resumes_at_the_head() -> None:
    memory = MemoryLog(["ann"] * 3)
    tail = LogTail(memory.fetch, memory.head, wait=0.05, idle=0.02)
    follower = asyncio.create_task(tail.run())
    try:
        await tail.ready.wait()
        await asyncio.sleep(0.2)  # an observation window: it may settle, then must not ask
        asked = memory.fetches
        memory.append(["bob"] * 4)  # recorded while nobody watches
        await asyncio.sleep(0.2)  # another window, in which nothing may be asked
        assert memory.fetches == asked, "it polled with no stream open"
        stream = tail.stream(EventFilter(), 2)  # history from 2, then live
        reading = asyncio.ensure_future(collect(stream, 6))
        await until(lambda: memory.fetches > asked, "the tail asking again")
        memory.append(["ann"])
        assert [e.position for e in await reading] == [3, 4, 5, 6, 7, 8]
    finally:
        await stopped(follower)


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


async def subscribed(tail: LogTail, count: int) -> None:
    await until(lambda: tail.subscribers == count, f"{count} subscribers")
