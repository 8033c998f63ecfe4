"""Fold recorded envelopes into the projections and host membership: live and in replay alike.

The monitor folds each committed batch with `Folded.apply`; a restart or `runner replay` folds
the log with the same method, so a replay reproduces the live state exactly.

A replay decodes only what someone reads: an envelope of a type that neither the projections
(`projections.folds`), host membership nor the caller's `each` looks at is only counted
(`projections.counted`, which is what `apply` does with it), straight from the log's type
column. Most of a busy log is such (fills, commands), and decoding is most of a replay's cost.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from events import Envelope
from events.envelope import LoggedEnvelope
from projections import EMPTY, Projections, apply, counted, folds
from services.monitor.liveness import HOST_TYPES, NO_HOSTS, Hosts, apply_host
from services.monitor.log import EventLog

log = logging.getLogger(__name__)


@dataclass
class Folded:
    """The state after the log up to `position`."""

    state: Projections = EMPTY
    hosts: Hosts = NO_HOSTS
    position: int = 0
    _failed_types: set[str] = field(default_factory=set, repr=False)

    def apply(self, position: int, envelope: Envelope | LoggedEnvelope) -> None:
        """Fold one recorded envelope. A projection that raises skips that envelope (logged once
        per type): the log stays the truth and a fixed projection rebuilds from it."""
        try:
            self.state = apply(self.state, envelope)
        except Exception:
            if envelope.type not in self._failed_types:
                self._failed_types.add(envelope.type)
                log.exception("projection failed on %s at position %d (skipped; logged once per "
                              "type)", envelope.type, position)
        if envelope.type in HOST_TYPES:
            self.hosts = apply_host(self.hosts, envelope)
        self.position = position

    def count(self, position: int, events: int = 1) -> None:
        """Fold `events` recorded envelopes, up to `position`, of types only counted (`reads` is
        False for them)."""
        self.state = counted(self.state, events)
        self.position = position

    @staticmethod
    def reads(type_name: str) -> bool:
        """Whether `apply` looks into envelopes of this type (else `count` does the same)."""
        return folds(type_name) or type_name in HOST_TYPES


async def replay(event_log: EventLog, *, until_position: int | None = None,
                 until_time: datetime | None = None,
                 each: Callable[[int, Envelope], None] | None = None,
                 each_types: Collection[str] | None = None) -> Folded:
    """Fold the log from the start (optionally only up to a position or a moment); `each` is
    called with every envelope after it is folded, or only those of `each_types` when given."""
    folded = Folded()
    wanted = None if each is None else each_types
    decoded: dict[str, bool] = {}  # by type: does anyone read envelopes of it?
    with _no_cycle_collection():
        async for rows in event_log.pages(until_position=until_position, until_time=until_time):
            skipped = 0
            for position, type_name, body in rows:
                decode = decoded.get(type_name)
                if decode is None:
                    decode = decoded[type_name] = (
                        Folded.reads(type_name)
                        or (each is not None and (wanted is None or type_name in wanted)))
                if not decode:
                    skipped += 1
                    continue
                if skipped:
                    folded.count(position - 1, skipped)
                    skipped = 0
                if each is not None and (wanted is None or type_name in wanted):
                    envelope = Envelope.from_json(body)
                    folded.apply(position, envelope)
                    each(position, envelope)
                else:  # only folded: the light decode gives the same state, twice as fast
                    folded.apply(position, LoggedEnvelope.from_json(body))
            if skipped:
                folded.count(rows[-1][0], skipped)
    return folded


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause the cyclic garbage collector: a fold makes no reference cycles (immutable maps and
    frozen dataclasses), but the millions of objects a long replay keeps alive make each of its
    automatic passes walk a large heap again (about 15 % of a replay)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
