"""The log consumer: one log transaction per batch of deliveries from `monitor.log`.

The bus (`Bus.consume_batches`) hands over up to a batch of decoded deliveries at a time and acks
them only after `record` returns, that is after their transaction has committed. A crash before
the commit leaves the whole batch unacked and the broker redelivers it; the log skips event ids
it already holds, so every message is recorded exactly once. If the batch's transaction fails,
its envelopes are appended one at a time, so an envelope the database refuses fails alone (the
bus retries it and dead-letters it in the end) and the rest are recorded and acked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from events import Envelope
from services.bus import Delivery
from services.monitor.log import EventLog

log = logging.getLogger(__name__)

Recorded = list[tuple[int, Envelope]]


class Recorder:
    """Appends each batch in one transaction and folds what it recorded (`on_recorded`)."""

    def __init__(self, event_log: EventLog, on_recorded: Callable[[Recorded], None]) -> None:
        self.log = event_log
        self.on_recorded = on_recorded

    async def record(self, batch: list[Delivery]) -> dict[int, str]:
        """Batch handler: returns once every envelope of `batch` is committed to the log (or was
        there already), except those it names (by index) with the reason they were refused."""
        recorded, refused = await self._append([d.envelope for d in batch])
        try:
            self.on_recorded(recorded)
        except Exception:  # the log is the truth; a projection bug must not unrecord it
            log.exception("folding recorded events failed")
        return refused

    async def _append(self, batch: list[Envelope]) -> tuple[Recorded, dict[int, str]]:
        """One transaction for the batch; if it fails, one per envelope, so that a single
        envelope the database refuses cannot take the rest of its batch down with it."""
        try:
            return await self.log.append(batch), {}
        except Exception as exc:
            log.warning("event log batch of %d failed (%r); appending one by one", len(batch), exc)
        recorded: Recorded = []
        refused: dict[int, str] = {}
        for index, envelope in enumerate(batch):
            try:
                recorded += await self.log.append([envelope])
            except Exception as exc:
                refused[index] = f"not recorded: {type(exc).__name__}"
        if refused:
            log.error("event log refused %d of %d envelopes (they will be retried, then "
                      "dead-lettered)", len(refused), len(batch))
        return recorded, refused
