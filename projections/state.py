"""The read model: workers, positions, trading stats and entitlements, folded from the log.

`fold` is pure (no I/O, no clock, no ids made up here), so the monitor's live state and any
replay of the log are equal by construction. Ended workers are forgotten `ENDED_KEPT_HOURS` after
they end, by the log's own clock (`Projections.clock`), so a replay forgets what the live state
forgot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import singledispatch
from typing import Any

import immutables

from events import (
    REGISTRY,
    CrashReason,
    EntitlementDowngraded,
    EntitlementUpgraded,
    Envelope,
    HeartbeatMissed,
    JobDispatched,
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
from events.envelope import LoggedEnvelope


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
    # The log's clock: the latest time a worker was requested, started or ended (None before).
    clock: datetime | None = None
    # Ended workers by the hour they ended (hours since the epoch): worker id → job id.
    ended_by_hour: immutables.Map[int, immutables.Map[str, str]] = field(
        default_factory=immutables.Map)
    # A job's events recorded before its request (whose publish was retried), in log order, by
    # job id: folded right after the request, or forgotten with the ended workers.
    early: immutables.Map[str, tuple[LoggedEnvelope, ...]] = field(
        default_factory=immutables.Map)


EMPTY = Projections()

# The statuses a worker never leaves. Late reports never revive a worker that has ended: neither a
# redelivered dispatch (which would show it queued again) nor a crash report from a host that
# was cut off.
ENDED = frozenset({JobStatus.STOPPED, JobStatus.FAILED})
ENDED_KEPT_HOURS = 7 * 24  # how long an ended worker stays in the state (and the status)
_NO_POSITIONS: immutables.Map[str, PositionView] = immutables.Map()
_NO_ENDS: immutables.Map[str, str] = immutables.Map()
_NO_TRADES = TradingStats()


class Draft:
    """A state being folded: `immutables` mutations changed in place, which `finish` freezes
    into a new `Projections` (the state it started from stays valid), so a batch of events
    builds one new state, not one per event."""

    __slots__ = ("clock", "early", "ended_by_hour", "entitlements", "positions",
                 "rejected_jobs", "stats", "worker_by_job", "workers")

    def __init__(self, state: Projections) -> None:
        self.workers = state.workers.mutate()
        self.positions = state.positions.mutate()
        self.stats = state.stats.mutate()
        self.entitlements = state.entitlements.mutate()
        self.worker_by_job = state.worker_by_job.mutate()
        self.rejected_jobs = state.rejected_jobs
        self.clock = state.clock
        self.ended_by_hour = state.ended_by_hour.mutate()
        self.early = state.early.mutate()

    def finish(self, events_applied: int) -> Projections:
        return Projections(self.workers.finish(), self.positions.finish(), self.stats.finish(),
                           self.entitlements.finish(), self.rejected_jobs, events_applied,
                           self.worker_by_job.finish(), self.clock, self.ended_by_hour.finish(),
                           self.early.finish())

    def tick(self, at: datetime) -> None:
        """The log's clock reads `at`, if that is later. Only a worker's request, start and
        first end move it: never a late event about an ended worker, which a state that has
        forgotten it ignores."""
        if self.clock is None or at > self.clock:
            self.clock = at

    def end_worker(self, worker_id: str, at: datetime, **changes: object) -> None:
        """The worker has ended (or, ended before, changes how): its end time is its first."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        if worker.ended_at is None:
            self.tick(at)
            changes["ended_at"] = at
            hour = _hour(at)
            self.ended_by_hour[hour] = self.ended_by_hour.get(hour, _NO_ENDS).set(
                worker_id, worker.job_id)
        self.workers[worker_id] = _replaced_worker(worker, changes)

    def forget_ended(self, before_hour: int) -> None:
        """Forget the workers that ended before `before_hour`: their views, positions, stats."""
        ended = self.ended_by_hour.finish()  # (a mutation cannot list its keys)
        self.ended_by_hour = ended.mutate()
        for hour in [h for h in ended if h < before_hour]:
            for worker_id, job_id in self.ended_by_hour.pop(hour).items():
                for views in (self.workers, self.positions, self.stats):
                    views.pop(worker_id, None)
                self.worker_by_job.pop(job_id, None)
        early = self.early.finish()
        self.early = early.mutate()
        for job_id, held in early.items():
            if _hour(held[0].occurred_at) < before_hour:
                self.early.pop(job_id)

    def hold(self, job_id: str, envelope: Envelope) -> None:
        """Keep `envelope` until the request of its job `job_id` is folded."""
        self.early[job_id] = (*self.early.get(job_id, ()), LoggedEnvelope.of(envelope))

    def update_worker(self, worker_id: str, **changes: object) -> None:
        worker = self.workers.get(worker_id)
        if worker is not None:
            self.workers[worker_id] = _replaced_worker(worker, changes)


Handler = Callable[[Any, Draft, Envelope], None]


def apply(state: Projections, envelope: Envelope) -> Projections:
    """Fold one logged envelope into the state; counts every envelope, parses only folded types."""
    return fold((envelope,), state)


def fold(envelopes: Iterable[Envelope], state: Projections = EMPTY) -> Projections:
    """`state` after `envelopes`, in order: each counted, those of folded types parsed and
    handled. Raises what a handler raises (`state` itself is unchanged then)."""
    draft = Draft(state)
    handlers, after_request, worker_by_job = _HANDLERS, _AFTER_REQUEST, draft.worker_by_job
    events = 0
    for envelope in envelopes:
        events += 1
        type_name = envelope.type
        handler = handlers.get(type_name)
        if handler is not None:
            message = envelope.message()
            if type_name in after_request and message.job_id not in worker_by_job:
                draft.hold(message.job_id, envelope)
            else:
                handler(message, draft, envelope)
    if (kept_since := kept_from(draft.clock)) > kept_from(state.clock):
        draft.forget_ended(kept_since)
    return draft.finish(state.events_applied + events)


def _hour(moment: datetime) -> int:
    return int(moment.timestamp() // 3600)


def kept_from(clock: datetime | None) -> int:
    """The hour (since the epoch) from which ended workers are kept, at the log's `clock`."""
    return -1 if clock is None else _hour(clock) - ENDED_KEPT_HOURS


def forget_ended(state: Projections) -> Projections:
    """`state` without the ended workers its clock no longer keeps: what folding the same log
    gives, for a state put together otherwise (the union of partitions folded apart)."""
    draft = Draft(state)
    draft.forget_ended(kept_from(state.clock))
    return draft.finish(state.events_applied)


# The hot events' values (positions, trade stats, changed workers) are built without their
# `__init__` (which goes through `object.__setattr__` once per field of a frozen dataclass): the
# slots are written directly. None of these classes has a `__post_init__` or a computed default.
_new = object.__new__
_set_instrument, _set_side, _set_amount, _set_entry = (
    PositionView.__dict__[name].__set__ for name in ("instrument", "side", "amount", "entry_price"))
_set_total, _set_won, _set_lost, _set_pnl = (
    TradingStats.__dict__[name].__set__
    for name in ("total_trades", "winning_trades", "losing_trades", "total_pnl"))


_WORKER_SLOTS = tuple((name, WorkerView.__dict__[name].__set__, WorkerView.__dict__[name].__get__)
                      for name in WorkerView.__slots__)


def _replaced_worker(worker: WorkerView, changes: dict[str, object]) -> WorkerView:
    """`dataclasses.replace(worker, **changes)`, its slots written directly (lifecycle events)."""
    new = _new(WorkerView)
    for name, set_slot, get_slot in _WORKER_SLOTS:
        set_slot(new, changes[name] if name in changes else get_slot(worker))
    return new


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
    return replace(s, events_applied=s.events_applied + events)


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


def _is_stale(draft: Draft, worker_id: str, attempt: int) -> bool:
    """A report about an ended worker or an earlier attempt than the latest one.

    A host cut off from the broker reports its workers' ends late, after the scheduler has
    already crashed and restarted them elsewhere; a restarted host may start (and at once fence)
    an attempt that was moved while it was down.
    """
    worker = draft.workers.get(worker_id)
    return worker is not None and (worker.status in ENDED or attempt < worker.restart_count)


def _crash_reason(event: WorkerCrashed) -> str:
    if event.reason is CrashReason.EXITED and event.exit_code is not None:
        text = f"exited with code {event.exit_code}"
    else:
        text = event.reason.value.replace("_", " ")
    return f"{text}: {event.detail}" if event.detail else text


@singledispatch
def _on(message: Message, draft: Draft, envelope: Envelope) -> None:
    """Most messages do not move the read model."""


@_on.register
def _(event: JobRequested, draft: Draft, envelope: Envelope) -> None:
    """A new worker view, queued; a repeated request for a known worker changes nothing."""
    if event.worker_id in draft.workers:
        return
    draft.tick(envelope.occurred_at)
    draft.workers[event.worker_id] = WorkerView(
        worker_id=event.worker_id,
        job_id=event.job_id,
        user_id=envelope.user_id or "",
        strategy_id=event.strategy_id,
        broker_id=event.broker_id,
        status=JobStatus.QUEUED,
        created_at=envelope.occurred_at,
        flatten_on_stop=event.flatten_on_stop,
    )
    draft.worker_by_job[event.job_id] = event.worker_id
    for held in draft.early.pop(event.job_id, ()):
        _HANDLERS[held.type](held.message(), draft, held)


@_on.register
def _(event: JobRejected, draft: Draft, envelope: Envelope) -> None:
    """A rejected job never ran: its worker view goes, the rejection is counted."""
    draft.rejected_jobs += 1
    worker_id = draft.worker_by_job.pop(event.job_id, None)
    if worker_id is not None:
        for views in (draft.workers, draft.positions, draft.stats):
            views.pop(worker_id, None)


@_on.register
def _(event: JobDispatched, draft: Draft, envelope: Envelope) -> None:
    """Placed on a host, not yet running (also the way back from crashed to a restart). A
    dispatch recorded after its own attempt's spawn or crash (its publish retried) changes
    nothing."""
    worker = draft.workers.get(event.worker_id)
    if worker is not None and worker.status not in ENDED and (
            worker.status is JobStatus.QUEUED or event.attempt > worker.restart_count):
        draft.update_worker(event.worker_id, status=JobStatus.QUEUED, host_id=event.host_id)


@_on.register(WorkerSpawned)
@_on.register(WorkerRestarted)
def _(event: WorkerSpawned | WorkerRestarted, draft: Draft, envelope: Envelope) -> None:
    """Running; after a restart the reason still tells why it had to restart."""
    if not _is_stale(draft, event.worker_id, event.attempt) and event.worker_id in draft.workers:
        draft.tick(envelope.occurred_at)
        draft.update_worker(
            event.worker_id,
            status=JobStatus.RUNNING,
            pid=event.pid,
            host_id=event.host_id,
            started_at=envelope.occurred_at,
            restart_count=event.attempt,
            **({"reason": None} if isinstance(event, WorkerSpawned) else {}),
        )


@_on.register
def _(event: WorkerSpawnFailed, draft: Draft, envelope: Envelope) -> None:
    """A permanent failure's error is the user's reason as it is ("exchange rejected the API
    key"); the event that ends the job follows."""
    if not _is_stale(draft, event.worker_id, event.attempt):
        reason = event.error if event.permanent else f"spawn failed: {event.error}"
        draft.update_worker(event.worker_id, status=JobStatus.CRASHED, pid=None, reason=reason)


@_on.register
def _(event: HeartbeatMissed, draft: Draft, envelope: Envelope) -> None:
    """Only a note: the WorkerCrashed that follows changes the status."""
    draft.update_worker(event.worker_id, reason=f"no heartbeat for {event.silent_for:g}s")


@_on.register
def _(event: WorkerCrashed, draft: Draft, envelope: Envelope) -> None:
    if not _is_stale(draft, event.worker_id, event.attempt):
        draft.update_worker(event.worker_id, status=JobStatus.CRASHED, pid=None,
                            reason=_crash_reason(event))


@_on.register
def _(event: WorkerRestartScheduled, draft: Draft, envelope: Envelope) -> None:
    """Still crashed until it runs again; the reason keeps the crash cause and names the attempt."""
    worker = draft.workers.get(event.worker_id)
    if worker is not None:
        note = f"restart {event.attempt} scheduled in {event.delay:g}s"
        draft.update_worker(event.worker_id,
                            reason=f"{worker.reason} ({note})" if worker.reason else note)


@_on.register
def _(event: RestartsExhausted, draft: Draft, envelope: Envelope) -> None:
    """Failed for good: after its restarts, or at once (no restart tried) with why."""
    reason = f"restarts exhausted after {event.attempts} attempts"
    if event.detail:
        reason = event.detail if event.attempts == 0 else f"{reason}: {event.detail}"
    draft.end_worker(event.worker_id, envelope.occurred_at, status=JobStatus.FAILED, pid=None,
                     reason=reason)


@_on.register
def _(event: StopRequested, draft: Draft, envelope: Envelope) -> None:
    draft.update_worker(event.worker_id, stop_requested=True)


@_on.register
def _(event: WorkerStopped, draft: Draft, envelope: Envelope) -> None:
    draft.end_worker(event.worker_id, envelope.occurred_at, status=JobStatus.STOPPED, pid=None,
                     reason=event.reason)


@_on.register
def _(event: PositionChanged, draft: Draft, envelope: Envelope) -> None:
    """The position on one instrument is now this; flat removes it."""
    worker_id = event.worker_id
    if worker_id not in draft.workers:
        return
    held = draft.positions.get(worker_id, _NO_POSITIONS)
    if event.amount == 0:
        if event.instrument not in held:
            return
        held = held.delete(event.instrument)
    else:
        held = held.set(
            event.instrument,
            _make_position(event.instrument, event.side, event.amount, event.entry_price),
        )
    if held:
        draft.positions[worker_id] = held
    else:
        draft.positions.pop(worker_id, None)


@_on.register
def _(event: PositionsFlattened, draft: Draft, envelope: Envelope) -> None:
    """Everything was closed at market, whatever PositionChanged events arrived before."""
    draft.positions.pop(event.worker_id, None)


@_on.register
def _(event: TradeClosed, draft: Draft, envelope: Envelope) -> None:
    worker_id = event.worker_id
    if worker_id not in draft.workers:
        return
    stats = draft.stats.get(worker_id, _NO_TRADES)
    pnl = event.realized_pnl
    draft.stats[worker_id] = _make_stats(
        stats.total_trades + 1,
        stats.winning_trades + (pnl > 0),
        stats.losing_trades + (pnl < 0),
        stats.total_pnl + pnl,
    )


@_on.register
def _(event: EntitlementUpgraded, draft: Draft, envelope: Envelope) -> None:
    if envelope.user_id is not None:
        draft.entitlements[envelope.user_id] = EntitlementView(
            envelope.user_id, event.tier, event.max_workers, event.expires_at)


@_on.register
def _(event: EntitlementDowngraded, draft: Draft, envelope: Envelope) -> None:
    """The lower tier has no end date (EntitlementExpired alone changes nothing: this follows)."""
    if envelope.user_id is not None:
        draft.entitlements[envelope.user_id] = EntitlementView(
            envelope.user_id, event.to_tier, event.max_workers, None)


# Computed once every handler is registered: the handler of each type name `fold` parses at all.
_HANDLERS: dict[str, Handler] = {
    t.type_name(): _on.dispatch(t)
    for t in list(_on.registry)
    if t is not object and issubclass(t, Message)
}


# The folded types of a job's events that come after its request, and are held until it.
_AFTER_REQUEST = frozenset(name for name in _HANDLERS if name != JobRequested.type_name()
                           and "job_id" in REGISTRY[name].model_fields)


def folds(type_name: str) -> bool:
    """Whether `fold` parses envelopes of this type; for all others it is `counted`."""
    return type_name in _HANDLERS
