"""The worker-host's heartbeat relay: batches per window, a worker's first beat at once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from events import WorkerHeartbeat, WorkerHeartbeats
from services.worker_host.beats import BeatRelay

pytestmark = pytest.mark.asyncio

WINDOW = 0.5


def beat(n: int) -> WorkerHeartbeat:
    return WorkerHeartbeat(job_id=f"j{n}", worker_id=f"w{n}", host_id="h", pid=100 + n,
                           at=datetime.now(UTC))


async def relaying(window: float = WINDOW) -> tuple[
        BeatRelay, list[tuple[float, WorkerHeartbeats]], asyncio.Task[None]]:
    sent: list[tuple[float, WorkerHeartbeats]] = []

    async def send(message: WorkerHeartbeats) -> None:
        sent.append((asyncio.get_running_loop().time(), message))

    relay = BeatRelay("h", send, window)
    return relay, sent, asyncio.create_task(relay.run())


async def sent_at_least(sent: list[object], count: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while len(sent) < count:
            await asyncio.sleep(0.005)


async def test_beats_within_a_window_go_as_one_message_once_it_is_over() -> None:
    relay, sent, task = await relaying()
    try:
        began = asyncio.get_running_loop().time()
        for n in range(5):
            relay.add(beat(n))
        await sent_at_least(sent, 1, 10 * WINDOW)
        [(at, message)] = sent
        assert [b.worker_id for b in message.beats] == ["w0", "w1", "w2", "w3", "w4"]
        assert message.host_id == "h" and at - began >= WINDOW
    finally:
        task.cancel()


async def test_a_workers_first_beat_goes_at_once_with_those_waiting() -> None:
    """With a window far longer than the test may wait, only the first beat's urgency sends."""
    relay, sent, task = await relaying(window=60.0)
    try:
        relay.add(beat(1))
        relay.add(beat(2), first=True)
        await sent_at_least(sent, 1, 5.0)
        [(_, message)] = sent
        assert [b.worker_id for b in message.beats] == ["w1", "w2"]
    finally:
        task.cancel()


async def test_after_an_urgent_send_the_next_window_starts_afresh() -> None:
    relay, sent, task = await relaying()
    try:
        relay.add(beat(1), first=True)
        await sent_at_least(sent, 1, 5.0)
        relay.add(beat(3))
        await sent_at_least(sent, 2, 10 * WINDOW)
        assert [[b.worker_id for b in m.beats] for _, m in sent] == [["w1"], ["w3"]]
        assert sent[1][0] - sent[0][0] >= WINDOW
    finally:
        task.cancel()
