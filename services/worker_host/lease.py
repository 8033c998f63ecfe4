"""A worker-host's lease on its workers, on an injected monotonic clock (pure, no I/O)."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum


class Renewal(Enum):
    STALE = "stale"  # a later heartbeat was confirmed first: nothing changes
    RENEWED = "renewed"
    LAPSED = "lapsed"  # renewed, but it had run out before: fence first


class HostLease:
    """The host holds its lease while the broker confirms its heartbeats, each confirm renewing
    it from when that heartbeat was sent; past `duration` seconds without one it has lapsed, and
    the host must end its workers. Times are the clock's (`time.monotonic` by default, which the
    workers share)."""

    def __init__(self, duration: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.duration = duration
        self.clock = clock
        self.renewed_at: float | None = None  # None until the host has started

    def start(self) -> None:
        self.renewed_at = self.clock()

    def expired(self) -> bool:
        return self.renewed_at is not None and self.clock() - self.renewed_at > self.duration

    def silent_for(self) -> float:
        return 0.0 if self.renewed_at is None else self.clock() - self.renewed_at

    def until(self) -> float:
        """When the lease runs out, as the workers are told; a full lease from now while the
        host is still starting."""
        return (self.renewed_at or self.clock()) + self.duration

    def confirmed(self, sent_at: float) -> Renewal:
        """The broker confirmed the heartbeat sent at `sent_at`."""
        if self.renewed_at is not None and sent_at <= self.renewed_at:
            return Renewal.STALE
        lapsed = self.expired()
        self.renewed_at = sent_at
        return Renewal.LAPSED if lapsed else Renewal.RENEWED
