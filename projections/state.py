"""The read model: workers, positions, trading stats and entitlements, folded from the log.

`apply` is pure (no I/O, no clock, no ids made up here): everything it records comes from the
envelope, so the monitor's live state and any replay of the log are equal by construction.
Updates are copy-on-write on `immutables.Map`, so an old state stays valid after a new one is
built from it (replay to a point in time keeps every intermediate state cheaply).

Only the types with a handler below are parsed; every other envelope (commands, fills, host and
load events, and types this build does not know) only counts in `events_applied`. Events about a
worker the state has never seen are ignored the same way, never raised.

Speed (replay folds a million events in seconds): handlers are found by type name in a table
built once from the `singledispatch` registry, and new states are built by `_next`, which writes
the slots directly and counts the event in the same step (a frozen dataclass's `__init__` and
`dataclasses.replace` cost more than the fold itself).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import singledispatch
from typing import Any, TypeVar

import immutables

from events import (
    CrashReason,
    EntitlementDowngraded,
    EntitlementUpgraded,
    Envelope,
    HeartbeatMissed,
    JobAccepted,
    JobDispatched,
    JobQueued,
    JobRejected,
    JobRequested,
    JobStatus,
    Message,
    PositionChanged,
    PositionsFlattened,
    RestartsExhausted,
    StopRequested,
    TradeClosed,
    WorkerCrashed,
    WorkerRestarted,
    WorkerRestartScheduled,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerStopped,
)


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    job_id: str
    user_id: str
    strategy_id: str
    broker_id: str
    status: JobStatus
    created_at: datetime
    flatten_on_stop: bool = True
    pid: int | None = None
    host_id: str | None = None
    started_at: datetime | None = None
    restart_count: int = 0
    stop_requested: bool = False
    ended_at: datetime | None = None
    reason: str | None = None  # last crash / stop / failure reason, human-readable


@dataclass(frozen=True, slots=True)
class PositionView:
    instrument: str
    side: str
    amount: float
    entry_price: float


@dataclass(frozen=True, slots=True)
class TradingStats:
    total_trades: int = 0
    winning_trades: int = 0
    losing_trades: int = 0
    total_pnl: float = 0.0

    @property
    def win_rate(self) -> float:
        """Percent of closed trades that made money (0 when none closed)."""
        return 100.0 * self.winning_trades / self.total_trades if self.total_trades else 0.0


@dataclass(frozen=True, slots=True)
class EntitlementView:
    user_id: str
    tier: str
    max_workers: int
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class QueueStats:
    queued_jobs: int = 0
    running_workers: int = 0
    total_workers: int = 0
    failed_jobs: int = 0


@dataclass(frozen=True, slots=True)
class Projections:
    """Everything the status queries read. `positions` never holds an empty inner map."""

    workers: immutables.Map[str, WorkerView] = field(default_factory=immutables.Map)
    positions: immutables.Map[str, immutables.Map[str, PositionView]] = field(
        default_factory=immutables.Map
    )
    stats: immutables.Map[str, TradingStats] = field(default_factory=immutables.Map)
    entitlements: immutables.Map[str, EntitlementView] = field(default_factory=immutables.Map)
    rejected_jobs: int = 0
    events_applied: int = 0
    # JobRejected names only the job; this finds the worker view it has to remove.
    worker_by_job: immutables.Map[str, str] = field(default_factory=immutables.Map)


EMPTY = Projections()

_V = TypeVar("_V")

# The statuses a worker never leaves. Late reports never revive a worker that has ended: neither a
# redelivered dispatch (which would show it queued again) nor a crash report from a host that
# was cut off.
ENDED = frozenset({JobStatus.STOPPED, JobStatus.FAILED})
_NO_POSITIONS: immutables.Map[str, PositionView] = immutables.Map()
_NO_TRADES = TradingStats()


def apply(state: Projections, envelope: Envelope) -> Projections:
    """Fold one logged envelope into the state; counts every envelope, parses only folded types."""
    handler = _HANDLERS.get(envelope.type)
    if handler is None:
        return counted(state)
    after = handler(envelope.message(), state, envelope)
    # A handler that changes nothing returns `state` itself; one that changes it built the new
    # state with `_next`, which has counted the event already.
    return counted(state) if after is state else after


def fold(envelopes: Iterable[Envelope], state: Projections = EMPTY) -> Projections:
    for envelope in envelopes:
        state = apply(state, envelope)
    return state


# Frozen slots dataclasses built without their `__init__` (which goes through `object.__setattr__`
# once per field): the slots are written directly, for about half the cost. None of these classes
# has a `__post_init__` or a default computed at init.
_new = object.__new__
_S = {name: Projections.__dict__[name].__set__ for name in (
    "workers", "positions", "stats", "entitlements", "rejected_jobs", "events_applied",
    "worker_by_job")}
_set_workers, _set_positions, _set_stats, _set_entitlements = (
    _S["workers"], _S["positions"], _S["stats"], _S["entitlements"])
_set_rejected, _set_applied, _set_by_job = (
    _S["rejected_jobs"], _S["events_applied"], _S["worker_by_job"])
_set_instrument, _set_side, _set_amount, _set_entry = (
    PositionView.__dict__[name].__set__ for name in ("instrument", "side", "amount", "entry_price"))
_set_total, _set_won, _set_lost, _set_pnl = (
    TradingStats.__dict__[name].__set__
    for name in ("total_trades", "winning_trades", "losing_trades", "total_pnl"))


def _make_state(workers: immutables.Map[str, WorkerView],
                positions: immutables.Map[str, immutables.Map[str, PositionView]],
                stats: immutables.Map[str, TradingStats],
                entitlements: immutables.Map[str, EntitlementView], rejected_jobs: int,
                events_applied: int, worker_by_job: immutables.Map[str, str]) -> Projections:
    state = _new(Projections)
    _set_workers(state, workers)
    _set_positions(state, positions)
    _set_stats(state, stats)
    _set_entitlements(state, entitlements)
    _set_rejected(state, rejected_jobs)
    _set_applied(state, events_applied)
    _set_by_job(state, worker_by_job)
    return state


def _make_position(instrument: str, side: str, amount: float, entry_price: float) -> PositionView:
    position = _new(PositionView)
    _set_instrument(position, instrument)
    _set_side(position, side)
    _set_amount(position, amount)
    _set_entry(position, entry_price)
    return position


def _make_stats(total: int, won: int, lost: int, pnl: float) -> TradingStats:
    stats = _new(TradingStats)
    _set_total(stats, total)
    _set_won(stats, won)
    _set_lost(stats, lost)
    _set_pnl(stats, pnl)
    return stats


def counted(s: Projections, events: int = 1) -> Projections:
    """`s` after `events` more envelopes of types `folds` says are not parsed: that is all
    `apply` does with them (so a replay need not decode them at all)."""
    return _make_state(s.workers, s.positions, s.stats, s.entitlements, s.rejected_jobs,
                       s.events_applied + events, s.worker_by_job)


def _next(
    s: Projections,
    *,
    workers: immutables.Map[str, WorkerView] | None = None,
    positions: immutables.Map[str, immutables.Map[str, PositionView]] | None = None,
    stats: immutables.Map[str, TradingStats] | None = None,
    entitlements: immutables.Map[str, EntitlementView] | None = None,
    rejected_jobs: int | None = None,
    worker_by_job: immutables.Map[str, str] | None = None,
) -> Projections:
    """`s` with the given parts replaced and this event counted (what every changing handler
    returns)."""
    return _make_state(
        s.workers if workers is None else workers,
        s.positions if positions is None else positions,
        s.stats if stats is None else stats,
        s.entitlements if entitlements is None else entitlements,
        s.rejected_jobs if rejected_jobs is None else rejected_jobs,
        s.events_applied + 1,
        s.worker_by_job if worker_by_job is None else worker_by_job,
    )


def queue_stats(state: Projections, user_id: str | None = None) -> QueueStats:
    """The seed's `queueStats`, over one user's workers or over everyone's."""
    queued = running = total = failed = 0
    for worker in state.workers.values():
        if user_id is not None and worker.user_id != user_id:
            continue
        total += 1
        if worker.status is JobStatus.QUEUED:
            queued += 1
        elif worker.status is JobStatus.RUNNING:
            running += 1
        elif worker.status is JobStatus.FAILED:
            failed += 1
    return QueueStats(
        queued_jobs=queued, running_workers=running, total_workers=total, failed_jobs=failed
    )


def _update_worker(state: Projections, worker_id: str, **changes: object) -> Projections:
    worker = state.workers.get(worker_id)
    if worker is None:
        return state
    return _next(state, workers=state.workers.set(worker_id, replace(worker, **changes)))


def _without(mapping: immutables.Map[str, _V], key: str) -> immutables.Map[str, _V]:
    return mapping.delete(key) if key in mapping else mapping


def _is_stale(state: Projections, worker_id: str, attempt: int) -> bool:
    """A report about an ended worker or an earlier attempt than the latest one.

    A host cut off from the broker reports its workers' ends late, after the scheduler has
    already crashed and restarted them elsewhere; a restarted host may start (and at once fence)
    an attempt that was moved while it was down.
    """
    worker = state.workers.get(worker_id)
    return worker is not None and (worker.status in ENDED or attempt < worker.restart_count)


def _crash_reason(event: WorkerCrashed) -> str:
    if event.reason is CrashReason.EXITED and event.exit_code is not None:
        text = f"exited with code {event.exit_code}"
    else:
        text = event.reason.value.replace("_", " ")
    return f"{text}: {event.detail}" if event.detail else text


@singledispatch
def _on(message: Message, state: Projections, envelope: Envelope) -> Projections:
    """Most messages do not move the read model."""
    return state


@_on.register
def _(event: JobRequested, state: Projections, envelope: Envelope) -> Projections:
    """A new worker view, queued; a repeated request for a known worker changes nothing."""
    if event.worker_id in state.workers:
        return state
    worker = WorkerView(
        worker_id=event.worker_id,
        job_id=event.job_id,
        user_id=envelope.user_id or "",
        strategy_id=event.strategy_id,
        broker_id=event.broker_id,
        status=JobStatus.QUEUED,
        created_at=envelope.occurred_at,
        flatten_on_stop=event.flatten_on_stop,
    )
    return _next(
        state,
        workers=state.workers.set(event.worker_id, worker),
        worker_by_job=state.worker_by_job.set(event.job_id, event.worker_id),
    )


@_on.register
def _(event: JobRejected, state: Projections, envelope: Envelope) -> Projections:
    """A rejected job never ran: its worker view goes, the rejection is counted."""
    worker_id = state.worker_by_job.get(event.job_id)
    if worker_id is None:
        return _next(state, rejected_jobs=state.rejected_jobs + 1)
    return _next(
        state,
        workers=_without(state.workers, worker_id),
        positions=_without(state.positions, worker_id),
        stats=_without(state.stats, worker_id),
        worker_by_job=state.worker_by_job.delete(event.job_id),
        rejected_jobs=state.rejected_jobs + 1,
    )


@_on.register(JobAccepted)
@_on.register(JobQueued)
def _(event: JobAccepted | JobQueued, state: Projections, envelope: Envelope) -> Projections:
    worker = state.workers.get(event.worker_id)
    if worker is None or worker.status in ENDED:
        return state
    return _update_worker(state, event.worker_id, status=JobStatus.QUEUED)


@_on.register
def _(event: JobDispatched, state: Projections, envelope: Envelope) -> Projections:
    """Placed on a host, not yet running (also the way back from crashed to a restart)."""
    worker = state.workers.get(event.worker_id)
    if worker is None or worker.status in ENDED:
        return state
    return _update_worker(state, event.worker_id, status=JobStatus.QUEUED, host_id=event.host_id)


@_on.register
def _(event: WorkerSpawned, state: Projections, envelope: Envelope) -> Projections:
    if _is_stale(state, event.worker_id, event.attempt):
        return state
    return _update_worker(
        state,
        event.worker_id,
        status=JobStatus.RUNNING,
        pid=event.pid,
        host_id=event.host_id,
        started_at=envelope.occurred_at,
        restart_count=event.attempt,
        reason=None,
    )


@_on.register
def _(event: WorkerSpawnFailed, state: Projections, envelope: Envelope) -> Projections:
    if _is_stale(state, event.worker_id, event.attempt):
        return state
    return _update_worker(
        state,
        event.worker_id,
        status=JobStatus.CRASHED,
        pid=None,
        reason=f"spawn failed: {event.error}",
    )


@_on.register
def _(event: HeartbeatMissed, state: Projections, envelope: Envelope) -> Projections:
    """Only a note: the WorkerCrashed that follows changes the status."""
    return _update_worker(state, event.worker_id, reason=f"no heartbeat for {event.silent_for:g}s")


@_on.register
def _(event: WorkerCrashed, state: Projections, envelope: Envelope) -> Projections:
    if _is_stale(state, event.worker_id, event.attempt):
        return state
    return _update_worker(
        state, event.worker_id, status=JobStatus.CRASHED, pid=None, reason=_crash_reason(event)
    )


@_on.register
def _(event: WorkerRestartScheduled, state: Projections, envelope: Envelope) -> Projections:
    """Still crashed until it runs again; the reason keeps the crash cause and names the attempt."""
    worker = state.workers.get(event.worker_id)
    if worker is None:
        return state
    note = f"restart {event.attempt} scheduled in {event.delay:g}s"
    return _update_worker(
        state, event.worker_id, reason=f"{worker.reason} ({note})" if worker.reason else note
    )


@_on.register
def _(event: WorkerRestarted, state: Projections, envelope: Envelope) -> Projections:
    """Running again; the reason still tells why it had to restart."""
    if _is_stale(state, event.worker_id, event.attempt):
        return state
    return _update_worker(
        state,
        event.worker_id,
        status=JobStatus.RUNNING,
        pid=event.pid,
        host_id=event.host_id,
        started_at=envelope.occurred_at,
        restart_count=event.attempt,
    )


@_on.register
def _(event: RestartsExhausted, state: Projections, envelope: Envelope) -> Projections:
    reason = f"restarts exhausted after {event.attempts} attempts"
    return _update_worker(
        state,
        event.worker_id,
        status=JobStatus.FAILED,
        pid=None,
        ended_at=envelope.occurred_at,
        reason=f"{reason}: {event.detail}" if event.detail else reason,
    )


@_on.register
def _(event: StopRequested, state: Projections, envelope: Envelope) -> Projections:
    return _update_worker(state, event.worker_id, stop_requested=True)


@_on.register
def _(event: WorkerStopped, state: Projections, envelope: Envelope) -> Projections:
    return _update_worker(
        state,
        event.worker_id,
        status=JobStatus.STOPPED,
        pid=None,
        ended_at=envelope.occurred_at,
        reason=event.reason,
    )


@_on.register
def _(event: PositionChanged, state: Projections, envelope: Envelope) -> Projections:
    """The position on one instrument is now this; flat removes it."""
    if event.worker_id not in state.workers:
        return state
    held = state.positions.get(event.worker_id, _NO_POSITIONS)
    if event.amount == 0:
        if event.instrument not in held:
            return state
        held = held.delete(event.instrument)
    else:
        held = held.set(
            event.instrument,
            _make_position(event.instrument, event.side, event.amount, event.entry_price),
        )
    positions = (
        state.positions.set(event.worker_id, held)
        if held
        else _without(state.positions, event.worker_id)
    )
    return _next(state, positions=positions)


@_on.register
def _(event: PositionsFlattened, state: Projections, envelope: Envelope) -> Projections:
    """Everything was closed at market, whatever PositionChanged events arrived before."""
    if event.worker_id not in state.positions:
        return state
    return _next(state, positions=state.positions.delete(event.worker_id))


@_on.register
def _(event: TradeClosed, state: Projections, envelope: Envelope) -> Projections:
    if event.worker_id not in state.workers:
        return state
    stats = state.stats.get(event.worker_id, _NO_TRADES)
    pnl = event.realized_pnl
    stats = _make_stats(
        stats.total_trades + 1,
        stats.winning_trades + (pnl > 0),
        stats.losing_trades + (pnl < 0),
        stats.total_pnl + pnl,
    )
    return _next(state, stats=state.stats.set(event.worker_id, stats))


@_on.register
def _(event: EntitlementUpgraded, state: Projections, envelope: Envelope) -> Projections:
    user_id = envelope.user_id
    if user_id is None:
        return state
    view = EntitlementView(user_id, event.tier, event.max_workers, event.expires_at)
    return _next(state, entitlements=state.entitlements.set(user_id, view))


@_on.register
def _(event: EntitlementDowngraded, state: Projections, envelope: Envelope) -> Projections:
    """The lower tier has no end date (EntitlementExpired alone changes nothing: this follows)."""
    user_id = envelope.user_id
    if user_id is None:
        return state
    view = EntitlementView(user_id, event.to_tier, event.max_workers, None)
    return _next(state, entitlements=state.entitlements.set(user_id, view))


# Computed once every handler is registered: the handler of each type name `apply` parses at all.
_HANDLERS: dict[str, Callable[[Any, Projections, Envelope], Projections]] = {
    t.type_name(): _on.dispatch(t)
    for t in list(_on.registry)
    if t is not object and issubclass(t, Message)
}


def folds(type_name: str) -> bool:
    """Whether `apply` parses envelopes of this type; for all others it is `counted`."""
    return type_name in _HANDLERS
