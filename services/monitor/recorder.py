"""The log consumer: batches deliveries from `monitor.log` into one log transaction per batch.

Each delivery's handler adds its envelope to the open batch and waits for that batch's commit;
the bus acks after the handler returns, so a message is acked only once it is in the log. A
crash before the commit leaves the whole batch unacked and the broker redelivers it; the log
skips event ids it already holds, so every message is recorded exactly once. If the batch's
transaction fails, its envelopes are appended one at a time, so an envelope the database refuses
fails alone (the bus retries it and dead-letters it in the end) and the rest are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from events import Envelope, Message
from services.monitor.log import EventLog

log = logging.getLogger(__name__)

Recorded = list[tuple[int, Envelope]]


class RecorderStopped(RuntimeError):
    """The recorder stopped before the batch was committed (the message will be redelivered)."""


class NotRecorded(RuntimeError):
    """The log refused this envelope (the bus retries it, then dead-letters it with this)."""


class Recorder:
    """One writer task, many waiting handlers (the subscription's prefetch bounds the batch)."""

    def __init__(self, event_log: EventLog, on_recorded: Callable[[Recorded], None], *,
                 batch_size: int = 1000, linger: float = 0.005) -> None:
        self.log = event_log
        self.on_recorded = on_recorded
        self.batch_size = batch_size
        self.linger = linger
        self._pending: list[Envelope] = []
        self._commit: asyncio.Future[dict[str, str]] | None = None
        self._wake = asyncio.Event()
        self._full = asyncio.Event()

    async def record(self, envelope: Envelope, message: Message) -> None:
        """Bus handler. Returns once `envelope` is committed to the log (or was already there);
        raises if it was not, so the bus redelivers it (and dead-letters it in the end)."""
        if self._commit is None:
            self._commit = asyncio.get_running_loop().create_future()
        commit = self._commit
        self._pending.append(envelope)
        self._wake.set()
        if len(self._pending) >= self.batch_size:
            self._full.set()
        # shielded: one cancelled delivery must not cancel the commit the others wait for
        refused = await asyncio.shield(commit)
        if (reason := refused.get(str(envelope.event_id))) is not None:
            raise NotRecorded(reason)

    async def run(self) -> None:
        """Flush a batch when it is full or `linger` seconds after its first envelope."""
        try:
            while True:
                await self._wake.wait()
                if len(self._pending) < self.batch_size:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), self.linger)
                await self._flush()
        finally:
            if self._commit is not None and not self._commit.done():
                self._commit.set_exception(RecorderStopped("recorder stopped"))

    async def _flush(self) -> None:
        batch, commit = self._pending, self._commit
        self._pending, self._commit = [], None
        self._wake.clear()
        self._full.clear()
        if not batch or commit is None:
            return
        try:
            recorded, refused = await self._append(batch)
        except asyncio.CancelledError:
            commit.set_exception(RecorderStopped("recorder stopped mid-batch"))
            raise
        try:
            self.on_recorded(recorded)
        except Exception:  # the log is the truth; a projection bug must not unrecord it
            log.exception("folding recorded events failed")
        commit.set_result(refused)

    async def _append(self, batch: list[Envelope]) -> tuple[Recorded, dict[str, str]]:
        """One transaction for the batch; if it fails, one per envelope, so that a single
        envelope the database refuses cannot take the rest of its batch down with it."""
        try:
            return await self.log.append(batch), {}
        except Exception as exc:
            log.warning("event log batch of %d failed (%r); appending one by one", len(batch), exc)
        recorded: Recorded = []
        refused: dict[str, str] = {}
        for envelope in batch:
            try:
                recorded += await self.log.append([envelope])
            except Exception as exc:
                refused[str(envelope.event_id)] = f"not recorded: {type(exc).__name__}"
        if refused:
            log.error("event log refused %d of %d envelopes (they will be retried, then "
                      "dead-lettered)", len(refused), len(batch))
        return recorded, refused
