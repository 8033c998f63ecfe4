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


async def relaying() -> tuple[BeatRelay, list[tuple[float, WorkerHeartbeats]], asyncio.Task[None]]:
    sent: list[tuple[float, WorkerHeartbeats]] = []

    async def send(message: WorkerHeartbeats) -> None:
        sent.append((asyncio.get_running_loop().time(), message))

    relay = BeatRelay("h", send, WINDOW)
    return relay, sent, asyncio.create_task(relay.run())


async def test_beats_within_a_window_go_as_one_message() -> None:
    relay, sent, task = await relaying()
    try:
        began = asyncio.get_running_loop().time()
        for n in range(5):
            relay.add(beat(n))
        await asyncio.sleep(WINDOW * 1.5)
        [(at, message)] = sent  # one message, once the window was over
        assert [b.worker_id for b in message.beats] == ["w0", "w1", "w2", "w3", "w4"]
        assert message.host_id == "h" and at - began >= WINDOW
    finally:
        task.cancel()


async def test_a_workers_first_beat_goes_at_once_with_those_waiting() -> None:
    relay, sent, task = await relaying()
    try:
        relay.add(beat(1))
        await asyncio.sleep(0.01)
        added = asyncio.get_running_loop().time()
        relay.add(beat(2), first=True)
        await asyncio.sleep(0.02)
        [(at, message)] = sent
        assert [b.worker_id for b in message.beats] == ["w1", "w2"]
        assert at - added < WINDOW / 4
        relay.add(beat(3))  # the next window starts afresh
        await asyncio.sleep(WINDOW * 1.5)
        assert [b.worker_id for _, m in sent for b in m.beats] == ["w1", "w2", "w3"]
    finally:
        task.cancel()
