"""Pure decisions of the scheduler: restarts, circuit breaker, placement, queue admission."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Restart:
    streak: int  # restarts used in this crash streak, including this one
    delay: float


@dataclass(frozen=True)
class GiveUp:
    attempts: int
    detail: str


def after_crash(
    *,
    streak: int,
    ran_for: float | None,
    entitled: bool,
    max_restarts: int,
    healthy_reset_after: float,
    backoff: float,
    backoff_max: float,
) -> Restart | GiveUp:
    """What to do with a crashed worker.

    `streak` is the restarts already used since the worker was last healthy; a worker that ran
    for `healthy_reset_after` seconds before this crash starts a new streak. Backoff doubles
    per restart in the streak, capped at `backoff_max`.
    """
    if ran_for is not None and ran_for >= healthy_reset_after:
        streak = 0
    if not entitled:
        return GiveUp(streak, "not restarted: the user is not entitled to this worker any more")
    if streak >= max_restarts:
        return GiveUp(streak, f"gave up after {streak} restart attempts")
    return Restart(streak=streak + 1, delay=min(backoff * 2**streak, backoff_max))


def record_failure(
    failures: Sequence[datetime], now: datetime, *, window: float, threshold: int, cooldown: float
) -> tuple[list[datetime], datetime | None]:
    """Add a failure; returns the failures still inside the window and, when they reach the
    threshold, the time until which the circuit is open."""
    recent = [f for f in failures if (now - f).total_seconds() < window] + [now]
    if len(recent) >= threshold:
        return [], now + timedelta(seconds=cooldown)
    return recent, None


@dataclass(frozen=True)
class HostLoad:
    host_id: str
    capacity: int
    load: int

    @property
    def free(self) -> int:
        return self.capacity - self.load


def place(hosts: Sequence[HostLoad]) -> str | None:
    """The online host with the most free capacity (ties: lowest id); None when all are full."""
    best = min((h for h in hosts if h.free > 0), key=lambda h: (-h.free, h.host_id), default=None)
    return best.host_id if best else None


def dispatch_budget(*, active: int, in_flight: int, concurrency: int, ceiling: int) -> int:
    """How many queued jobs may be dispatched now: bounded by spawns in flight and by the
    system-wide worker ceiling."""
    return max(0, min(concurrency - in_flight, ceiling - active))
