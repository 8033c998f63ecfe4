"""Scheduler service: owns the job queue (its own store, so it survives restarts).

- JobRequested records the job; JobAccepted → JobQueued (the entitlement service decides).
- The dispatcher places queued jobs on online hosts with free capacity, at most
  `spawn_concurrency` spawns in flight; at `max_system_workers` it pauses (QueuePaused) and
  resumes (QueueResumed) when there is room again: jobs wait, nothing is dropped.
- WorkerCrashed → restart with backoff while the user is entitled (WorkerRestartScheduled), or
  RestartsExhausted; repeated failures of a strategy open its circuit (CircuitOpened, which
  the entitlement service enforces on new starts, then CircuitClosed after the cool-down).
- StopRunner → StopRequested for the host running the worker (or WorkerStopped at once when
  nothing runs yet). HostLost → the host's workers are crashed (`host_lost`) and rescheduled.

Every handler is idempotent (processed ledger) and stale events (an older attempt, another
host) are ignored, so no job ever gets two live workers from the scheduler.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Column, Text, bindparam, func, insert, update
from sqlalchemy.sql import Executable
from sqlmodel import Field, SQLModel, select

from events import (
    CircuitClosed,
    CircuitOpened,
    CrashReason,
    EntitlementDowngraded,
    EntitlementExpired,
    EntitlementUpgraded,
    Envelope,
    FlattenFailed,
    HostLost,
    HostOnline,
    JobAccepted,
    JobDispatched,
    JobQueued,
    JobRejected,
    JobRequested,
    QueuePaused,
    QueueResumed,
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
from events.envelope import as_utc
from services.scheduler.policy import (
    GiveUp,
    HostLoad,
    after_crash,
    dispatch_budget,
    place,
    record_failure,
)
from services.service import Service, now
from services.store import UnitOfWork, UtcDateTime
from services.topology import SCHEDULER_INBOX

log = logging.getLogger(__name__)


class State:
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
HOLDS_SLOT = (
    State.REQUESTED,
    State.QUEUED,
    State.DISPATCHED,
    State.RUNNING,
    State.CRASHED,
    State.STOPPING,
)


class JobRow(SQLModel, table=True):
    __tablename__ = "jobs"
    seq: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(unique=True, max_length=100)
    worker_id: str = Field(unique=True, max_length=100)
    user_id: str = Field(index=True, max_length=100)
    strategy_id: str = Field(max_length=100)
    broker_id: str = Field(max_length=50)
    credentials_sealed: str = Field(sa_column=Column(Text, nullable=False))
    config: str = Field(sa_column=Column(Text, nullable=False))
    flatten_on_stop: bool = True
    state: str = Field(index=True, max_length=20)
    host_id: str | None = Field(default=None, index=True, max_length=100)
    attempt: int = 0  # incarnation: 0 first start, +1 per restart (the worker's restartCount)
    streak: int = 0  # restarts used since the worker was last healthy
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # when it was stopped, failed or rejected: it is deleted one `ledger_retention` later
    ended_at: datetime | None = Field(default=None, sa_type=UtcDateTime, index=True)

    def end(self, state: str) -> None:
        self.state, self.ended_at = state, now()


class HostRow(SQLModel, table=True):
    __tablename__ = "hosts"
    host_id: str = Field(primary_key=True, max_length=100)
    capacity: int
    online: bool = True
    incarnation: str | None = Field(default=None, max_length=100)  # None: before incarnations


class CircuitRow(SQLModel, table=True):
    __tablename__ = "circuits"
    key: str = Field(primary_key=True, max_length=250)
    failures: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    open_until: datetime | None = Field(default=None, sa_type=UtcDateTime)


class LimitRow(SQLModel, table=True):
    __tablename__ = "limits"
    user_id: str = Field(primary_key=True, max_length=100)
    max_workers: int


class FlagRow(SQLModel, table=True):
    __tablename__ = "flags"
    name: str = Field(primary_key=True, max_length=50)
    value: bool = False


JOBS = JobRow.__table__  # type: ignore[attr-defined]
HOSTS = HostRow.__table__  # type: ignore[attr-defined]


def _count_in(*states: str) -> Any:
    return (select(func.count()).select_from(JOBS).where(JOBS.c.state.in_(states))
            .scalar_subquery())


# The start path's statements, built once and run as Core (each replaces an ORM read, a flush
# and an update: most of the scheduler's CPU per start went to the ORM). Every ORM read of a
# job refreshes it (`_job`), so it sees what these changed in the same transaction.
JOB_EXISTS = select(JOBS.c.seq).where(JOBS.c.job_id == bindparam("job_id"))
INSERT_JOB = insert(JOBS)
QUEUE_JOB = (update(JOBS)
             .where(JOBS.c.job_id == bindparam("accepted_job"), JOBS.c.state == State.REQUESTED)
             .values(state=State.QUEUED).returning(JOBS.c.worker_id, JOBS.c.user_id))
JOB_RUNS = (update(JOBS)
            .where(JOBS.c.worker_id == bindparam("running_worker"),
                   JOBS.c.attempt == bindparam("running_attempt"),
                   JOBS.c.state == State.DISPATCHED)
            .values(state=State.RUNNING, host_id=bindparam("on_host"),
                    started_at=bindparam("at")))
# A placement round's read: the live jobs that bound it (counted through the state index, so a
# round costs the live jobs only, never the ended ones that pile up over a deployment's life),
# and whether the queue is paused.
PLACEMENT_FACTS = select(
    _count_in(State.QUEUED).label("queued"),
    _count_in(State.DISPATCHED).label("in_flight"),
    _count_in(*ON_HOST).label("active"),
    select(FlagRow.__table__.c.value).where(FlagRow.__table__.c.name == "paused")  # type: ignore[attr-defined]
    .scalar_subquery().label("paused"),
)
NEXT_QUEUED = (select(JOBS).where(JOBS.c.state == State.QUEUED).order_by(JOBS.c.seq)
               .limit(bindparam("budget")))
HOST_LOADS = (
    select(HOSTS.c.host_id, HOSTS.c.capacity, HOSTS.c.incarnation,
           select(func.count()).select_from(JOBS)
           .where(JOBS.c.host_id == HOSTS.c.host_id, JOBS.c.state.in_(ON_HOST))
           .scalar_subquery())
    .where(HOSTS.c.online)
)
DISPATCH_JOB = (update(JOBS).where(JOBS.c.seq == bindparam("job_seq"))
                .values(state=State.DISPATCHED, host_id=bindparam("to_host")))


ENDED = (State.STOPPED, State.FAILED, State.REJECTED)


def _time_untimed_ends() -> Executable:
    """Jobs ended before `ended_at` existed: their retention counts from now (a backfill)."""
    return (update(JOBS).where(JOBS.c.ended_at.is_(None), JOBS.c.state.in_(ENDED))
            .values(ended_at=now()))


def job_stream(job_id: str) -> str:
    return f"job-{job_id}"


def circuit_key(user_id: str, strategy_id: str) -> str:
    return f"{user_id}|{strategy_id}"


class SchedulerService(Service):
    name = "scheduler"
    backfills = (_time_untimed_ends,)
    tables = tuple(t.__table__ for t in (JobRow, HostRow, CircuitRow, LimitRow, FlagRow))  # type: ignore[attr-defined]

    async def setup(self) -> None:
        self.handle(
            SCHEDULER_INBOX,
            {
                JobRequested: self.on_job_requested,
                StopRunner: self.on_stop_runner,
                JobAccepted: self.on_job_accepted,
                JobRejected: self.on_job_rejected,
                WorkerSpawned: self.on_worker_running,
                WorkerRestarted: self.on_worker_running,
                WorkerSpawnFailed: self.on_worker_crashed,
                WorkerCrashed: self.on_worker_crashed,
                WorkerStopped: self.on_worker_stopped,
                HostOnline: self.on_host_online,
                HostLost: self.on_host_lost,
                EntitlementUpgraded: self.on_limit_changed,
                EntitlementDowngraded: self.on_limit_changed,
                EntitlementExpired: self.on_limit_changed,
            },
            then=self.place_queued,
            then_skip={JobRequested},  # a requested job waits for its decision: nothing to place
        )
        self.timer_handlers["restart"] = self.on_restart_due
        self.timer_handlers["circuit"] = self.on_circuit_cooled

    async def started(self) -> None:
        self.background(self._dispatch_loop(), "dispatcher")

    async def forget_ended(self, before: float) -> int:
        """Deletes the jobs ended before `before`, with their sealed credentials. A late copy of
        a message about one is then as about a job never known: a StopRunner or a worker's
        report changes nothing; a JobAccepted is ignored (it is older than the retention)."""
        return await self.store.forget_rows(JOBS.c.ended_at, datetime.fromtimestamp(before, UTC))

    # ------------------------------------------------------------------ commands

    async def on_job_requested(self, uow: UnitOfWork, env: Envelope, event: JobRequested) -> None:
        """Records the job (awaiting its entitlement decision)."""
        connection = await uow.connection()
        if (await connection.execute(JOB_EXISTS, {"job_id": event.job_id})).first():
            return
        job = JobRow(
            job_id=event.job_id,
            worker_id=event.worker_id,
            user_id=env.user_id or "",
            strategy_id=event.strategy_id,
            broker_id=event.broker_id,
            credentials_sealed=event.credentials_sealed,
            config=event.config.model_dump_json(),
            flatten_on_stop=event.flatten_on_stop,
            state=State.REQUESTED,
        )
        await connection.execute(INSERT_JOB, job.model_dump(exclude={"seq"}))  # its defaults

    async def on_stop_runner(self, uow: UnitOfWork, env: Envelope, cmd: StopRunner) -> None:
        """Stops the worker wherever it is in its life; a no-op for ended jobs."""
        job = await _job(uow, worker_id=cmd.worker_id)
        if job is None or (env.user_id and env.user_id != job.user_id):
            return  # the gateway checks ownership; never act on another user's worker
        stream, jid = job_stream(job.job_id), job.job_id
        if job.state in ON_HOST and job.state != State.STOPPING:
            job.state = State.STOPPING
            uow.session.add(job)
            uow.emit(
                StopRequested(
                    job_id=jid,
                    worker_id=job.worker_id,
                    host_id=job.host_id,
                    flatten=cmd.flatten,
                    reason=cmd.reason,
                ),
                stream=stream,
                correlation_id=jid,
                user_id=job.user_id,
            )
        elif job.state in (State.REQUESTED, State.QUEUED, State.CRASHED):
            await uow.cancel_timer(f"restart:{jid}")
            uow.emit(
                StopRequested(
                    job_id=jid,
                    worker_id=job.worker_id,
                    host_id=None,
                    flatten=cmd.flatten,
                    reason=cmd.reason,
                ),
                stream=stream,
                correlation_id=jid,
                user_id=job.user_id,
            )
            if cmd.flatten and job.state == State.CRASHED:
                uow.emit(
                    FlattenFailed(
                        job_id=jid,
                        worker_id=job.worker_id,
                        error="worker was not running (crashed); positions left "
                        "as they are on the broker",
                    ),
                    stream=stream,
                    correlation_id=jid,
                    user_id=job.user_id,
                )
            uow.emit(
                WorkerStopped(
                    job_id=jid,
                    worker_id=job.worker_id,
                    reason=f"{cmd.reason} (before it was running)",
                ),
                stream=stream,
                correlation_id=jid,
                user_id=job.user_id,
            )
            job.end(State.STOPPED)
            uow.session.add(job)

    # ------------------------------------------------------------------ job events

    async def on_job_accepted(self, uow: UnitOfWork, env: Envelope, event: JobAccepted) -> None:
        connection = await uow.connection()
        queued = (await connection.execute(QUEUE_JOB, {"accepted_job": event.job_id})).first()
        if queued is None:
            if (await connection.execute(JOB_EXISTS, {"job_id": event.job_id})).first():
                return  # decided before, or stopped while it waited for the decision
            if (now() - env.occurred_at).total_seconds() > self.settings.ledger_retention:
                log.warning("%s: a decision older than the retention, about a job not here "
                            "(ended and forgotten): ignored", event.job_id)
                return
            raise LookupError(f"{event.job_id} accepted before it was requested here; retrying")
        uow.emit(
            JobQueued(job_id=event.job_id, worker_id=queued.worker_id),
            stream=env.stream,
            user_id=queued.user_id,
        )

    async def on_job_rejected(self, uow: UnitOfWork, env: Envelope, event: JobRejected) -> None:
        job = await _job(uow, job_id=event.job_id)
        if job is not None and job.state == State.REQUESTED:
            job.end(State.REJECTED)
            uow.session.add(job)

    async def on_worker_running(self, uow: UnitOfWork, env: Envelope, event: Any) -> None:
        """WorkerSpawned / WorkerRestarted for the current attempt: the job runs."""
        await (await uow.connection()).execute(JOB_RUNS, {
            "running_worker": event.worker_id, "running_attempt": event.attempt,
            "on_host": event.host_id, "at": env.occurred_at})

    async def on_worker_crashed(self, uow: UnitOfWork, env: Envelope, event: Any) -> None:
        """WorkerCrashed / WorkerSpawnFailed of the current attempt: restart or give up."""
        job = await _job(uow, worker_id=event.worker_id)
        if job is None or event.attempt != job.attempt:
            return
        if job.state == State.STOPPING:  # died while being stopped: it is stopped
            job.end(State.STOPPED)
            uow.session.add(job)
            uow.emit(
                WorkerStopped(
                    job_id=job.job_id,
                    worker_id=job.worker_id,
                    reason="stopped (the worker died while stopping)",
                ),
                stream=env.stream,
                user_id=job.user_id,
            )
            return
        if job.state not in (State.DISPATCHED, State.RUNNING):
            return
        if getattr(event, "reason", None) != CrashReason.HOST_LOST:
            await self._record_strategy_failure(uow, job, now())
        await self._restart_or_give_up(uow, job, env.stream, crashed_at=env.occurred_at)

    async def _restart_or_give_up(
        self, uow: UnitOfWork, job: JobRow, stream: str, not_before: float = 0.0,
        crashed_at: datetime | None = None,
    ) -> None:
        """Apply the restart policy to a crashed job: WorkerRestartScheduled (after the backoff,
        and no sooner than `not_before` seconds from now) or RestartsExhausted. The backoff
        counts from `crashed_at` (when the host saw the process end), not from when the news
        arrived here; a host clock off from ours moves it by at most the backoff itself."""
        at = now()
        ran_for = (at - as_utc(job.started_at)).total_seconds() if job.started_at else None
        decision = after_crash(
            streak=job.streak,
            ran_for=ran_for,
            entitled=await self._entitled(uow, job),
            max_restarts=self.settings.max_restarts,
            healthy_reset_after=self.settings.healthy_reset_after,
            backoff=self.settings.restart_backoff,
            backoff_max=self.settings.restart_backoff_max,
        )
        if isinstance(decision, GiveUp):
            job.end(State.FAILED)
            job.host_id = None
            uow.session.add(job)
            uow.emit(
                RestartsExhausted(
                    job_id=job.job_id,
                    worker_id=job.worker_id,
                    attempts=decision.attempts,
                    detail=decision.detail,
                ),
                stream=stream,
                user_id=job.user_id,
            )
            return
        delay = max(decision.delay, not_before)
        due = at + timedelta(seconds=delay)
        if crashed_at is not None:
            due = min(due, max(at, crashed_at + timedelta(seconds=delay)))
        job.state, job.streak, job.host_id = State.CRASHED, decision.streak, None
        uow.session.add(job)
        await uow.set_timer(f"restart:{job.job_id}", "restart", due, job_id=job.job_id)
        uow.emit(
            WorkerRestartScheduled(
                job_id=job.job_id,
                worker_id=job.worker_id,
                attempt=job.attempt + 1,
                delay=delay,
                due_at=due,
            ),
            stream=stream,
            user_id=job.user_id,
        )

    async def on_worker_stopped(self, uow: UnitOfWork, env: Envelope, event: WorkerStopped) -> None:
        job = await _job(uow, worker_id=event.worker_id)
        if job is not None and job.state in (*ON_HOST, State.CRASHED, State.QUEUED):
            await uow.cancel_timer(f"restart:{job.job_id}")
            job.end(State.STOPPED)
            uow.session.add(job)

    async def on_restart_due(self, uow: UnitOfWork, key: str, data: dict[str, Any]) -> None:
        """The backoff is over: the crashed job is queued again as its next attempt."""
        job = await _job(uow, job_id=data["job_id"])
        if job is None or job.state != State.CRASHED:
            return
        job.state, job.attempt = State.QUEUED, job.attempt + 1
        uow.session.add(job)
        await self.place_queued(uow)

    # ------------------------------------------------------------------ hosts & limits

    async def on_host_online(self, uow: UnitOfWork, env: Envelope, event: HostOnline) -> None:
        host = await uow.session.get(HostRow, event.host_id) or HostRow(
            host_id=event.host_id, capacity=event.capacity
        )
        host.capacity, host.online, host.incarnation = event.capacity, True, event.incarnation
        uow.session.add(host)

    async def on_host_lost(self, uow: UnitOfWork, env: Envelope, event: HostLost) -> None:
        """The host's workers are crashed (`host_lost`) and go through the restart policy, but
        restart no sooner than the host has surely fenced them (`host_fenced_within`): a host
        declared lost may still be alive, and a strategy must never run twice. A host that shut
        down cleanly (`silent_for` 0) has reported its workers' ends already."""
        host = await uow.session.get(HostRow, event.host_id)
        if host is not None:
            host.online = False
            uow.session.add(host)
        jobs = (
            await uow.session.exec(
                select(JobRow).where(JobRow.host_id == event.host_id, JobRow.state.in_(ON_HOST))  # type: ignore[attr-defined]
                .execution_options(populate_existing=True)
            )
        ).all()
        fence_wait = self.settings.host_fenced_within if event.silent_for > 0 else 0.0
        for job in jobs:
            stream = job_stream(job.job_id)
            uow.emit(
                WorkerCrashed(
                    job_id=job.job_id,
                    worker_id=job.worker_id,
                    host_id=event.host_id,
                    attempt=job.attempt,
                    reason=CrashReason.HOST_LOST,
                    detail=f"host {event.host_id} silent for {event.silent_for:.1f}s",
                ),
                stream=stream,
                correlation_id=job.job_id,
                user_id=job.user_id,
            )
            if job.state != State.STOPPING:  # a stopping one ends as stopped (on_worker_crashed)
                await self._restart_or_give_up(uow, job, stream, not_before=fence_wait)

    async def on_limit_changed(self, uow: UnitOfWork, env: Envelope, event: Any) -> None:
        if isinstance(event, EntitlementExpired):
            return  # the EntitlementDowngraded that follows carries the new limit
        row = await uow.session.get(LimitRow, env.user_id) or LimitRow(
            user_id=env.user_id or "", max_workers=event.max_workers
        )
        row.max_workers = event.max_workers
        uow.session.add(row)

    # ------------------------------------------------------------------ circuit breaker

    async def _record_strategy_failure(self, uow: UnitOfWork, job: JobRow, at: datetime) -> None:
        key = circuit_key(job.user_id, job.strategy_id)
        row = await uow.session.get(CircuitRow, key) or CircuitRow(key=key)
        failures = [datetime.fromisoformat(f) for f in json.loads(row.failures)]
        failures, open_until = record_failure(
            failures,
            at,
            window=self.settings.circuit_window,
            threshold=self.settings.circuit_failures,
            cooldown=self.settings.circuit_cooldown,
        )
        row.failures = json.dumps([f.isoformat() for f in failures])
        if open_until is not None:
            row.open_until = open_until
            await uow.set_timer(
                f"circuit:{key}",
                "circuit",
                open_until,
                key=key,
                user_id=job.user_id,
                strategy_id=job.strategy_id,
            )
            uow.emit(
                CircuitOpened(
                    strategy_id=job.strategy_id,
                    failures=self.settings.circuit_failures,
                    retry_at=open_until,
                ),
                stream=f"circuit-{key}",
                user_id=job.user_id,
            )
        uow.session.add(row)

    async def on_circuit_cooled(self, uow: UnitOfWork, key: str, data: dict[str, Any]) -> None:
        row = await uow.session.get(CircuitRow, data["key"])
        if row is None or row.open_until is None or as_utc(row.open_until) > now():
            return
        row.open_until = None
        uow.session.add(row)
        uow.emit(
            CircuitClosed(strategy_id=data["strategy_id"]),
            stream=f"circuit-{data['key']}",
            user_id=data["user_id"],
        )

    async def _entitled(self, uow: UnitOfWork, job: JobRow) -> bool:
        """Still within the user's limit, counting the user's older slot-holding jobs first."""
        limit_row = await uow.session.get(LimitRow, job.user_id)
        limit = limit_row.max_workers if limit_row else 1
        older = (
            await uow.session.exec(
                select(func.count())
                .select_from(JobRow)
                .where(
                    JobRow.user_id == job.user_id,
                    JobRow.state.in_(HOLDS_SLOT),  # type: ignore[attr-defined]
                    JobRow.seq < job.seq,
                )  # type: ignore[operator]
            )
        ).one()
        return older < limit

    # ------------------------------------------------------------------ dispatcher

    async def _dispatch_loop(self) -> None:
        """A placement round of its own every second: a safety net, since every batch and every
        due restart places queued jobs in its own transaction."""
        while True:
            await asyncio.sleep(1.0)
            async with self.store.transaction() as uow:
                await self.place_queued(uow)

    async def place_queued(self, uow: UnitOfWork) -> None:
        """Place queued jobs on hosts within the spawn throttle and the system ceiling; pause or
        resume the queue at the ceiling. Runs at the end of every inbox batch, in its
        transaction, so a job accepted is dispatched in the same commit that queues it."""
        connection = await uow.connection()
        facts = (await connection.execute(PLACEMENT_FACTS)).one()
        ceiling = self.settings.max_system_workers
        if facts.queued and facts.active >= ceiling and not facts.paused:
            await self._set_paused(uow, True)
            uow.emit(
                QueuePaused(
                    reason="system worker ceiling reached", running=facts.active,
                    ceiling=ceiling
                ),
                stream="queue",
            )
        elif facts.paused and facts.active < ceiling:
            await self._set_paused(uow, False)
            uow.emit(QueueResumed(running=facts.active, ceiling=ceiling), stream="queue")
        budget = dispatch_budget(
            active=facts.active,
            in_flight=facts.in_flight,
            concurrency=self.settings.spawn_concurrency,
            ceiling=ceiling,
        )
        if not facts.queued or budget <= 0:
            return
        online = (await connection.execute(HOST_LOADS)).all()
        hosts = [HostLoad(h.host_id, h.capacity, h[3]) for h in online]
        incarnations = {h.host_id: h.incarnation or "" for h in online}
        dispatched = []
        for job in (await connection.execute(NEXT_QUEUED, {"budget": budget})).all():
            host_id = place(hosts)
            if host_id is None:
                break
            hosts = [
                HostLoad(h.host_id, h.capacity, h.load + (h.host_id == host_id)) for h in hosts
            ]
            dispatched.append({"job_seq": job.seq, "to_host": host_id})
            uow.emit(
                JobDispatched(
                    job_id=job.job_id,
                    worker_id=job.worker_id,
                    host_id=host_id,
                    attempt=job.attempt,
                    strategy_id=job.strategy_id,
                    broker_id=job.broker_id,
                    credentials_sealed=job.credentials_sealed,
                    config=StrategyConfig.model_validate_json(job.config),
                    host_incarnation=incarnations[host_id],
                ),
                stream=job_stream(job.job_id),
                correlation_id=job.job_id,
                user_id=job.user_id,
            )
        if dispatched:
            await connection.execute(DISPATCH_JOB, dispatched)

    @staticmethod
    async def _set_paused(uow: UnitOfWork, value: bool) -> None:
        flag = await uow.session.get(FlagRow, "paused") or FlagRow(name="paused")
        flag.value = value
        uow.session.add(flag)


async def _job(
    uow: UnitOfWork, *, job_id: str | None = None, worker_id: str | None = None
) -> JobRow | None:
    """The job as an ORM row, read afresh: the start path's Core statements (`QUEUE_JOB`,
    `JOB_RUNS`, `DISPATCH_JOB`) may have changed it in this transaction since it was loaded."""
    column = JobRow.job_id if job_id is not None else JobRow.worker_id
    query = (select(JobRow).where(column == (job_id or worker_id))
             .execution_options(populate_existing=True))
    return (await uow.session.exec(query)).first()
