"""Pure rules of the scheduler: restarts, circuit breaker, placement, queue admission."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from events import CircuitClosed, CircuitOpened, Message, QueuePaused, QueueResumed
from events.routing import circuit_key
from services.decision import SetTimer


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


def assign(count: int, hosts: Sequence[HostLoad]) -> list[str]:
    """Hosts for up to `count` jobs in queue order, each on the host with the most free
    capacity at its turn; shorter when every host is full."""
    loads = list(hosts)
    chosen: list[str] = []
    for _ in range(count):
        host_id = place(loads)
        if host_id is None:
            break
        chosen.append(host_id)
        loads = [HostLoad(h.host_id, h.capacity, h.load + (h.host_id == host_id)) for h in loads]
    return chosen


@dataclass(frozen=True)
class QueueFacts:
    queued: int  # jobs waiting for a host
    in_flight: int  # dispatched, not running yet
    active: int  # on a host (dispatched, running, stopping)
    paused: bool


@dataclass(frozen=True)
class Admission:
    """How many queued jobs to dispatch now, and whether the queue pauses or resumes."""

    budget: int
    pause: bool | None = None  # True: pause now; False: resume now; None: as it is
    events: tuple[Message, ...] = ()


def admit(facts: QueueFacts, *, concurrency: int, ceiling: int) -> Admission:
    """The queue at the system-wide worker ceiling pauses (jobs wait, nothing is dropped) and
    resumes when there is room again; dispatches are bounded by spawns in flight."""
    pause: bool | None = None
    events: tuple[Message, ...] = ()
    if facts.queued and facts.active >= ceiling and not facts.paused:
        pause, events = True, (QueuePaused(reason="system worker ceiling reached",
                                           running=facts.active, ceiling=ceiling),)
    elif facts.paused and facts.active < ceiling:
        pause, events = False, (QueueResumed(running=facts.active, ceiling=ceiling),)
    budget = dispatch_budget(active=facts.active, in_flight=facts.in_flight,
                             concurrency=concurrency, ceiling=ceiling)
    return Admission(budget if facts.queued else 0, pause, events)


@dataclass(frozen=True)
class Circuit:
    """One user's strategy as the circuit breaker sees it: its recent failures, and until when
    its circuit is open (new starts of it are refused)."""

    user_id: str
    strategy_id: str
    failures: tuple[datetime, ...] = ()
    open_until: datetime | None = None


def circuit_timer(circuit: Circuit) -> str:
    return f"circuit:{circuit_key(circuit.user_id, circuit.strategy_id)}"


def strategy_failed(circuit: Circuit, now: datetime, *, window: float, threshold: int,
                    cooldown: float) -> tuple[Circuit, tuple[Message, ...], tuple[SetTimer, ...]]:
    """A failure of the strategy: at `threshold` within the window its circuit opens
    (CircuitOpened) until the cool-down timer closes it."""
    failures, open_until = record_failure(circuit.failures, now, window=window,
                                          threshold=threshold, cooldown=cooldown)
    if open_until is None:
        return replace(circuit, failures=tuple(failures)), (), ()
    opened = replace(circuit, failures=(), open_until=open_until)
    return opened, (
        CircuitOpened(strategy_id=circuit.strategy_id, failures=threshold, retry_at=open_until),
    ), (SetTimer(circuit_timer(circuit), "circuit", open_until,
                 {"user_id": circuit.user_id, "strategy_id": circuit.strategy_id}),)


def circuit_cooled(circuit: Circuit, now: datetime) -> tuple[Circuit, tuple[Message, ...]]:
    """The cool-down is over: the circuit closes (CircuitClosed)."""
    if circuit.open_until is None or circuit.open_until > now:
        return circuit, ()
    return replace(circuit, open_until=None), (CircuitClosed(strategy_id=circuit.strategy_id),)
