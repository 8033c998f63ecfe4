"""Fold recorded envelopes into the projections and host membership: live and in replay alike.

The monitor folds each committed batch with `Folded.fold`; a restart or `runner replay` folds
the log, a page at a time, with the same method, so a replay reproduces the live state exactly.

A replay decodes only what someone reads: an envelope of a type that neither the projections
(`projections.folds`), host membership nor the caller's `each` looks at is only counted
(`projections.counted`, which is all `fold` does with it), and the log does not even send it,
only counts it (`EventLog.pages(types=...)`). Most of a busy log is such (fills, commands),
and reading and decoding are most of a replay's cost.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from events import REGISTRY, Envelope
from events.envelope import LoggedEnvelope
from projections import EMPTY, Projections, apply, counted, fold, folds
from services.monitor.liveness import (
    HOST_TYPES,
    NO_HOSTS,
    SILENCE_TYPES,
    Hosts,
    apply_host,
    silenced,
)
from services.monitor.log import EventLog

log = logging.getLogger(__name__)


@dataclass
class Folded:
    """The state after the log up to `position`: the projections, host membership and the
    workers the log reports silent (`liveness.silenced`)."""

    state: Projections = EMPTY
    hosts: Hosts = NO_HOSTS
    position: int = 0
    silenced: set[str] = field(default_factory=set)
    _failed_types: set[str] = field(default_factory=set, repr=False)

    def fold(self, envelopes: Sequence[Envelope | LoggedEnvelope], position: int,
             skipped: int = 0) -> None:
        """Fold recorded `envelopes`, in log order, and `skipped` more envelopes of types only
        counted (`reads` is False for them); the last of all is at `position`.

        One new state for the whole batch. A projection that raises skips only that envelope
        (logged once per type): the batch is folded again one envelope at a time. The log stays
        the truth and a fixed projection rebuilds from it."""
        try:
            state = fold(envelopes, self.state)
        except Exception:
            state = self._fold_one_by_one(envelopes, position)
        self.state = counted(state, skipped) if skipped else state
        for envelope in envelopes:
            if envelope.type in HOST_TYPES:
                self.hosts = apply_host(self.hosts, envelope)
            elif envelope.type in SILENCE_TYPES:
                silenced(self.silenced, envelope)
        self.position = position

    def _fold_one_by_one(self, envelopes: Sequence[Envelope | LoggedEnvelope],
                         position: int) -> Projections:
        state = self.state
        for envelope in envelopes:
            try:
                state = apply(state, envelope)
            except Exception:
                if envelope.type not in self._failed_types:
                    self._failed_types.add(envelope.type)
                    log.exception("projection failed on %s in the batch up to position %d "
                                  "(skipped; logged once per type)", envelope.type, position)
        return state

    @staticmethod
    def reads(type_name: str) -> bool:
        """Whether `fold` looks into envelopes of this type (else counting them is the same)."""
        return folds(type_name) or type_name in HOST_TYPES or type_name in SILENCE_TYPES


async def replay(event_log: EventLog, *, until_position: int | None = None,
                 until_time: datetime | None = None,
                 each: Callable[[int, Envelope], None] | None = None,
                 each_types: Collection[str] | None = None,
                 start: Folded | None = None) -> Folded:
    """Fold the log from the start, or onto `start` from its position on (a snapshot),
    optionally only up to a position or a moment; `each` is called with every envelope, or
    only those of `each_types` when given, in log order, after the page it is in is folded."""
    folded = start or Folded()
    # the types `each` sees (None: every type); the log sends no body for any other type
    wanted = frozenset() if each is None else None if each_types is None else frozenset(each_types)
    read = frozenset(name for name in REGISTRY if Folded.reads(name))
    with _no_cycle_collection():
        async for page in event_log.pages(folded.position, until_position, until_time,
                                          types=None if wanted is None else read | wanted):
            envelopes: list[Envelope | LoggedEnvelope] = []
            seen: list[tuple[int, Envelope]] = []
            for position, type_name, body in page.rows:
                if wanted is None or type_name in wanted:
                    envelope = Envelope.from_json(body)
                    seen.append((position, envelope))
                    envelopes.append(envelope)
                else:  # only folded: the light decode gives the same state
                    envelopes.append(LoggedEnvelope.from_json(body))
            folded.fold(envelopes, page.last, skipped=page.skipped)
            if each is not None:
                for position, envelope in seen:
                    each(position, envelope)
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
