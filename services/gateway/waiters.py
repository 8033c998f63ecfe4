"""Waiting for the events that answer a request (WorkerStopped for a stop, …), from this
gateway's own transient queue; and the workers whose start was answered before the monitor
showed them."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
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


class Unseen:
    """Workers whose start this gateway has answered, which the monitor may not show yet: a
    status call that could show one asks the monitor to wait (bounded) until it does, so a
    client reads its own writes. An entry is forgotten once a status call has waited for it,
    or `keep` seconds after its start."""

    def __init__(self, keep: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keep, self.clock = keep, clock
        self._workers: dict[str, tuple[str, float]] = {}  # id → (user id, forgotten at), by age

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._workers

    def add(self, worker_id: str, user_id: str) -> None:
        moment = self.clock()
        self._forget_old(moment)
        self._workers[worker_id] = (user_id, moment + self.keep)

    def of(self, user_id: str | None) -> list[str]:
        """Those a status of `user_id`'s workers (None: everyone's) would show."""
        self._forget_old(self.clock())
        return [w for w, (owner, _) in self._workers.items() if user_id in (None, owner)]

    def seen(self, worker_ids: Iterable[str]) -> None:
        for worker_id in worker_ids:
            self._workers.pop(worker_id, None)

    def _forget_old(self, moment: float) -> None:
        while self._workers:
            oldest = next(iter(self._workers))
            if self._workers[oldest][1] > moment:
                return
            del self._workers[oldest]
