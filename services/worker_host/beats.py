"""Relaying workers' heartbeats to the monitor in batches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from events import WorkerHeartbeat, WorkerHeartbeats


class BeatRelay:
    """Sends the heartbeats `add`ed to it as one `WorkerHeartbeats` per `window` seconds, not a
    message each; a worker's first heartbeat goes at once (with whatever waits beside it), so a
    new worker is seen alive without delay, and the others are at most `window` late."""

    def __init__(self, host_id: str, send: Callable[[WorkerHeartbeats], Awaitable[None]],
                 window: float) -> None:
        self.host_id, self.send, self.window = host_id, send, window
        self._beats: list[WorkerHeartbeat] = []
        self._waiting = asyncio.Event()
        self._urgent = asyncio.Event()

    def add(self, beat: WorkerHeartbeat, *, first: bool = False) -> None:
        self._beats.append(beat)
        self._waiting.set()
        if first:
            self._urgent.set()

    async def run(self) -> None:
        """Relay until cancelled; `send` must not raise (telemetry is best effort)."""
        while True:
            await self._waiting.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent.wait(), self.window)
            self._waiting.clear()
            self._urgent.clear()
            beats, self._beats = tuple(self._beats), []
            await self.send(WorkerHeartbeats(host_id=self.host_id, beats=beats))
