"""The log consumer: one log transaction per batch of deliveries from `monitor.log`.

At-least-once in, recorded exactly once: a batch is acked only after its transaction commits,
the log skips event ids it holds, and after a failed batch its envelopes are appended one at a
time so that one the database refuses fails alone. What it hands on (`on_recorded`) is the log
itself, in order, without a gap (rows another writer appended are read back first).
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

    def __init__(self, event_log: EventLog, on_recorded: Callable[[Recorded], None],
                 position: int = 0) -> None:
        self.log = event_log
        self.on_recorded = on_recorded
        self.position = position  # of the last row handed on

    async def record(self, batch: list[Delivery]) -> dict[int, str]:
        """Batch handler: returns once every envelope of `batch` is committed to the log (or was
        there already), except those it names (by index) with the reason they were refused."""
        recorded, refused = await self._append([d.envelope for d in batch])
        recorded = await self._without_gaps(recorded)
        try:
            self.on_recorded(recorded)
        except Exception:  # the log is the truth; a projection bug must not unrecord it
            log.exception("folding recorded events failed")
        return refused

    async def _without_gaps(self, recorded: Recorded) -> Recorded:
        """`recorded`, with the rows another writer appended before or among them."""
        whole: Recorded = []
        for position, envelope in recorded:
            if position != self.position + 1:
                missed = [row async for row in self.log.read(self.position,
                                                             until_position=position - 1)]
                log.warning("event log: %d rows recorded by another writer after position %d; "
                            "folding them first", len(missed), self.position)
                whole += missed
            whole.append((position, envelope))
            self.position = position
        return whole

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
