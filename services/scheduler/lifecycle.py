"""A job's whole life as one pure decision: `decide(job, message, now, settings)`.

Every message about a job, and the scheduler's own inputs (a restart due, a placement), moves it
by `decide`, which returns the job as it is now, the events that tell so and the timers to set or
cancel (no I/O, no clock). A message about an earlier attempt, another host or a job in the wrong
state changes nothing, so no job ever gets two live workers from the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from events import (
    CrashReason,
    FlattenFailed,
    HostLost,
    JobAccepted,
    JobDispatched,
    JobQueued,
    JobRejected,
    JobRequested,
    Message,
    RestartsExhausted,
    StopRequested,
    StopRunner,
    StrategyConfig,
    WorkerCrashed,
    WorkerRestarted,
    WorkerRestartScheduled,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerStopped,
)
from services.decision import CancelTimer, SetTimer, Timer
from services.scheduler.policy import GiveUp, after_crash
from services.settings import Settings


class State(StrEnum):
    REQUESTED = "requested"  # awaiting the entitlement decision
    QUEUED = "queued"
    DISPATCHED = "dispatched"  # placed on a host, process not confirmed yet
    RUNNING = "running"
    CRASHED = "crashed"  # awaiting its restart
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    REJECTED = "rejected"


ON_HOST = (State.DISPATCHED, State.RUNNING, State.STOPPING)
HOLDS_SLOT = (State.REQUESTED, State.QUEUED, State.DISPATCHED, State.RUNNING, State.CRASHED,
              State.STOPPING)
ENDED = (State.STOPPED, State.FAILED, State.REJECTED)
NOT_RUNNING_YET = (State.REQUESTED, State.QUEUED, State.CRASHED)


@dataclass(frozen=True)
class Job:
    """A job as the scheduler keeps it. `attempt` is the incarnation (0 first start, +1 per
    restart); `streak` the restarts used since the worker was last healthy."""

    job_id: str
    worker_id: str
    user_id: str
    strategy_id: str
    broker_id: str
    credentials_sealed: str
    config: str  # the StrategyConfig as JSON
    flatten_on_stop: bool = True
    state: State = State.REQUESTED
    host_id: str | None = None
    attempt: int = 0
    streak: int = 0
    started_at: datetime | None = None
    ended_at: datetime | None = None  # stopped, failed or rejected: forgotten a retention later
    flatten_only: bool = False  # its run closes its positions and ends (a stop with flatten)
    seq: int | None = None  # its place in the queue, given by the store

    @classmethod
    def requested(cls, event: JobRequested, user_id: str) -> Job:
        return cls(job_id=event.job_id, worker_id=event.worker_id, user_id=user_id,
                   strategy_id=event.strategy_id, broker_id=event.broker_id,
                   credentials_sealed=event.credentials_sealed,
                   config=event.config.model_dump_json(), flatten_on_stop=event.flatten_on_stop)

    def ended(self, state: State, now: datetime) -> Job:
        return replace(self, state=state, ended_at=now, host_id=None)


@dataclass(frozen=True)
class RestartDue:
    """The scheduler's own timer: the backoff after a crash is over."""

    job_id: str


@dataclass(frozen=True)
class Dispatch:
    """The scheduler's own placement: run the job on `host_id` (its run `incarnation`)."""

    host_id: str
    incarnation: str


@dataclass(frozen=True)
class Decision:
    """The job after a message, what it emits, the timers it sets or cancels, and whether the
    message was a failure of the job's strategy (for its circuit breaker)."""

    job: Job
    events: tuple[Message, ...] = ()
    timers: tuple[Timer, ...] = ()
    strategy_failed: bool = False


Input = Message | RestartDue | Dispatch


def restart_timer(job_id: str) -> str:
    return f"restart:{job_id}"


def decide(job: Job, message: Input, now: datetime, settings: Settings, *,
           occurred_at: datetime | None = None, sender: str | None = None,
           entitled: bool = True) -> Decision:
    """What `message` does to `job` at `now`. `occurred_at` is when the message's fact happened
    (a crash's backoff counts from it), `sender` the user who sent a command (a user may stop
    only their own worker), `entitled` whether the user may still run this job (asked of the
    store only when a crash needs it)."""
    unchanged = Decision(job)
    match message:
        case JobAccepted() if job.state == State.REQUESTED:
            return Decision(replace(job, state=State.QUEUED),
                            (JobQueued(job_id=job.job_id, worker_id=job.worker_id),))
        case JobRejected() if job.state == State.REQUESTED:
            return Decision(job.ended(State.REJECTED, now))
        case Dispatch(host_id, incarnation) if job.state == State.QUEUED:
            return Decision(replace(job, state=State.DISPATCHED, host_id=host_id), (
                JobDispatched(job_id=job.job_id, worker_id=job.worker_id, host_id=host_id,
                              attempt=job.attempt, strategy_id=job.strategy_id,
                              broker_id=job.broker_id,
                              credentials_sealed=job.credentials_sealed,
                              config=StrategyConfig.model_validate_json(job.config),
                              host_incarnation=incarnation,
                              mode="flatten" if job.flatten_only else "trade"),))
        case WorkerSpawned() | WorkerRestarted() if (
                job.state == State.DISPATCHED and message.attempt == job.attempt):
            return Decision(replace(job, state=State.RUNNING, host_id=message.host_id,
                                    started_at=occurred_at or now))
        case WorkerCrashed() | WorkerSpawnFailed() if message.attempt == job.attempt:
            return _crashed(job, message, now, settings, occurred_at, entitled)
        case WorkerStopped() if job.state in (*ON_HOST, State.CRASHED, State.QUEUED):
            return Decision(job.ended(State.STOPPED, now),
                            timers=(CancelTimer(restart_timer(job.job_id)),))
        case RestartDue() if job.state == State.CRASHED:
            return Decision(replace(job, state=State.QUEUED, attempt=job.attempt + 1))
        case StopRunner() if sender is None or sender == job.user_id:
            return _stop(job, message, now)
        case HostLost() if job.host_id == message.host_id and job.state in ON_HOST:
            return _host_lost(job, message, now, settings, entitled)
    return unchanged


def _crashed(job: Job, crash: WorkerCrashed | WorkerSpawnFailed, now: datetime,
             settings: Settings, occurred_at: datetime | None, entitled: bool) -> Decision:
    if job.state == State.STOPPING:  # died while being stopped: it is stopped
        return Decision(job.ended(State.STOPPED, now), (
            WorkerStopped(job_id=job.job_id, worker_id=job.worker_id,
                          reason="stopped (the worker died while stopping)"),))
    if job.state not in (State.DISPATCHED, State.RUNNING):
        return Decision(job)
    if job.flatten_only:  # its flatten could not run: said so, and it ends stopped
        why = crash.error if isinstance(crash, WorkerSpawnFailed) else (
            crash.detail or str(crash.reason))
        return Decision(job.ended(State.STOPPED, now), (
            FlattenFailed(job_id=job.job_id, worker_id=job.worker_id,
                          error=f"the flatten-only run did not complete: {why}"),
            WorkerStopped(job_id=job.job_id, worker_id=job.worker_id,
                          reason="stopped; its flatten-only run failed")))
    if isinstance(crash, WorkerSpawnFailed) and crash.permanent:  # restarting cannot help
        return Decision(job.ended(State.FAILED, now), (
            RestartsExhausted(job_id=job.job_id, worker_id=job.worker_id, attempts=job.streak,
                              detail=crash.error),))
    host_lost = isinstance(crash, WorkerCrashed) and crash.reason == CrashReason.HOST_LOST
    return replace(_restart_or_give_up(job, now, settings, entitled, crashed_at=occurred_at),
                   strategy_failed=not host_lost)


def _host_lost(job: Job, event: HostLost, now: datetime, settings: Settings,
               entitled: bool) -> Decision:
    """The host's workers are crashed (`host_lost`) and restart no sooner than the host has
    surely fenced them: a host declared lost may still be alive, and a strategy must never run
    twice. A host that shut down cleanly (`silent_for` 0) has reported its workers' ends."""
    crashed = WorkerCrashed(job_id=job.job_id, worker_id=job.worker_id, host_id=event.host_id,
                            attempt=job.attempt, reason=CrashReason.HOST_LOST,
                            detail=f"host {event.host_id} silent for {event.silent_for:.1f}s")
    if job.state == State.STOPPING:  # it ends as stopped when its crash comes back here
        return Decision(job, (crashed,))
    fence_wait = settings.host_fenced_within if event.silent_for > 0 else 0.0
    decision = _restart_or_give_up(job, now, settings, entitled, not_before=fence_wait)
    return replace(decision, events=(crashed, *decision.events))


def _restart_or_give_up(job: Job, now: datetime, settings: Settings, entitled: bool, *,
                        not_before: float = 0.0, crashed_at: datetime | None = None) -> Decision:
    """The restart policy on a crashed job: WorkerRestartScheduled after the backoff (no sooner
    than `not_before` seconds from now), or RestartsExhausted. The backoff counts from
    `crashed_at` (when the host saw the process end), not from when the news arrived here."""
    ran_for = (now - job.started_at).total_seconds() if job.started_at else None
    outcome = after_crash(streak=job.streak, ran_for=ran_for, entitled=entitled,
                          max_restarts=settings.max_restarts,
                          healthy_reset_after=settings.healthy_reset_after,
                          backoff=settings.restart_backoff,
                          backoff_max=settings.restart_backoff_max)
    if isinstance(outcome, GiveUp):
        return Decision(job.ended(State.FAILED, now), (
            RestartsExhausted(job_id=job.job_id, worker_id=job.worker_id,
                              attempts=outcome.attempts, detail=outcome.detail),))
    delay = max(outcome.delay, not_before)
    due = now + timedelta(seconds=delay)
    if crashed_at is not None:
        due = min(due, max(now, crashed_at + timedelta(seconds=delay)))
    return Decision(
        replace(job, state=State.CRASHED, streak=outcome.streak, host_id=None),
        (WorkerRestartScheduled(job_id=job.job_id, worker_id=job.worker_id,
                                attempt=job.attempt + 1, delay=delay, due_at=due),),
        (SetTimer(restart_timer(job.job_id), "restart", due, {"job_id": job.job_id}),),
    )


def _stop(job: Job, command: StopRunner, now: datetime) -> Decision:
    """Stop the worker wherever it is in its life: ask its host, or, before it runs on one, end
    it here at once. A job that ran and is not running now, asked to flatten, gets a
    flatten-only run that closes what its account holds; any other ended job stays as it is."""
    ids = {"job_id": job.job_id, "worker_id": job.worker_id}
    if job.state in (State.DISPATCHED, State.RUNNING):
        return Decision(replace(job, state=State.STOPPING), (
            StopRequested(**ids, host_id=job.host_id, flatten=command.flatten,
                          reason=command.reason),))
    stopped = StopRequested(**ids, host_id=None, flatten=command.flatten, reason=command.reason)
    cancel = (CancelTimer(restart_timer(job.job_id)),)
    if command.flatten and (job.state == State.CRASHED or (
            job.state == State.FAILED and job.started_at is not None)) and not job.flatten_only:
        return Decision(replace(job, state=State.QUEUED, attempt=job.attempt + 1,
                                flatten_only=True, ended_at=None), (stopped,), cancel)
    if job.state not in NOT_RUNNING_YET:
        return Decision(job)
    return Decision(job.ended(State.STOPPED, now), (stopped, WorkerStopped(
        **ids, reason=f"{command.reason} (before it was running)")), cancel)
