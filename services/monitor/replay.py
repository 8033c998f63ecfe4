"""Fold recorded envelopes into the projections and host membership: live and in replay alike.

The monitor folds each committed batch with `Folded.apply`; a restart or `runner replay` folds
the log with the same method, so a replay reproduces the live state exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from events import Envelope
from projections import EMPTY, Projections, apply
from services.monitor.liveness import NO_HOSTS, Hosts, apply_host
from services.monitor.log import EventLog

log = logging.getLogger(__name__)


@dataclass
class Folded:
    """The state after the log up to `position`."""

    state: Projections = EMPTY
    hosts: Hosts = NO_HOSTS
    position: int = 0
    _failed_types: set[str] = field(default_factory=set, repr=False)

    def apply(self, position: int, envelope: Envelope) -> None:
        """Fold one recorded envelope. A projection that raises skips that envelope (logged once
        per type): the log stays the truth and a fixed projection rebuilds from it."""
        try:
            self.state = apply(self.state, envelope)
        except Exception:
            if envelope.type not in self._failed_types:
                self._failed_types.add(envelope.type)
                log.exception("projection failed on %s at position %d (skipped; logged once per "
                              "type)", envelope.type, position)
        self.hosts = apply_host(self.hosts, envelope)
        self.position = position


async def replay(event_log: EventLog, *, until_position: int | None = None,
                 until_time: datetime | None = None,
                 each: Callable[[int, Envelope], None] | None = None) -> Folded:
    """Fold the log from the start (optionally only up to a position or a moment)."""
    folded = Folded()
    async for position, envelope in event_log.read(until_position=until_position,
                                                   until_time=until_time):
        folded.apply(position, envelope)
        if each is not None:
            each(position, envelope)
    return folded
