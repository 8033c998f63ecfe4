"""Waiting for the events that answer a request (JobAccepted for a start, WorkerStopped for a
stop, …), from this gateway's own transient queue."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from events import Envelope, Message
from services.bus import Delivery

Key = tuple[str, str]  # (message type, job id | worker id | user id)


class Waiters:
    def __init__(self) -> None:
        self._watching: dict[Key, list[asyncio.Queue[tuple[Envelope, Message]]]] = defaultdict(list)

    @contextmanager
    def watch(self, *keys: Key) -> Iterator[asyncio.Queue[tuple[Envelope, Message]]]:
        """Collect matching events from now on (enter before publishing the request)."""
        queue: asyncio.Queue[tuple[Envelope, Message]] = asyncio.Queue()
        for key in keys:
            self._watching[key].append(queue)
        try:
            yield queue
        finally:
            for key in keys:
                self._watching[key].remove(queue)
                if not self._watching[key]:
                    del self._watching[key]

    async def deliver(self, batch: list[Delivery]) -> None:
        """`Bus.consume_batches` handler: hands each event to whoever waits for it."""
        for envelope, message in ((d.envelope, d.message) for d in batch):
            ids = {
                getattr(message, "job_id", None),
                getattr(message, "worker_id", None),
                envelope.user_id,
            }
            for ident in ids - {None}:
                for queue in self._watching.get((envelope.type, ident), ()):
                    queue.put_nowait((envelope, message))
