"""Scheduler service: owns the job queue (its own store, so it survives restarts).

Every message about a job loads it, decides (`lifecycle.decide`), saves it and emits what the
decision says in the inbox batch's transaction (at-least-once in, exactly-once effect, acked after
the commit); queued jobs are then placed on hosts in the same transaction (`policy.admit`,
`policy.assign`), so an accepted job is dispatched in the commit that queues it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from events import (
    EntitlementDowngraded,
    EntitlementExpired,
    EntitlementUpgraded,
    Envelope,
    HostLost,
    HostOnline,
    JobAccepted,
    JobRejected,
    JobRequested,
    Message,
    StopRunner,
    WorkerCrashed,
    WorkerRestarted,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerStopped,
)
from events.routing import QUEUE_STREAM, circuit_stream, job_stream
from services.scheduler import rows
from services.scheduler.lifecycle import Decision, Dispatch, Input, Job, RestartDue, State, decide
from services.scheduler.policy import admit, assign, circuit_cooled, strategy_failed
from services.service import Service
from services.store import UnitOfWork
from services.topology import SCHEDULER_INBOX

log = logging.getLogger(__name__)

# messages whose decision may restart the job, and so asks whether its user is still entitled
_MAY_RESTART = (WorkerCrashed, WorkerSpawnFailed, HostLost)


class SchedulerService(Service):
    name = "scheduler"
    tables = rows.TABLES
    backfills = (rows.untimed_ends,)
    single_active = True

    async def setup(self) -> None:
        about_a_job = (StopRunner, JobRejected, WorkerSpawned, WorkerRestarted, WorkerSpawnFailed,
                       WorkerCrashed, WorkerStopped)
        self.handle(
            SCHEDULER_INBOX,
            {
                JobRequested: self.on_job_requested,
                JobAccepted: self.on_job_accepted,
                **dict.fromkeys(about_a_job, self.on_job_message),
                HostOnline: self.on_host_online,
                HostLost: self.on_host_lost,
                **dict.fromkeys((EntitlementUpgraded, EntitlementDowngraded, EntitlementExpired),
                                self.on_limit_changed),
            },
            then=self.place_queued,
            then_skip={JobRequested},  # a requested job waits for its decision: nothing to place
        )
        self.timer_handlers["restart"] = self.on_restart_due
        self.timer_handlers["circuit"] = self.on_circuit_cooled

    async def started(self) -> None:
        self.background(self._dispatch_loop(), "dispatcher")

    async def forget_ended(self, before: float) -> int:
        """Deletes the jobs ended before `before`, with their sealed credentials; a late message
        about one is then as about a job never known."""
        return await self.store.forget_rows(rows.JOBS.c.ended_at,
                                            datetime.fromtimestamp(before, UTC))

    # ------------------------------------------------------------------ handlers

    async def on_job_requested(self, uow: UnitOfWork, env: Envelope, event: JobRequested) -> None:
        """Records the job, awaiting its entitlement decision; a duplicate changes nothing."""
        if not await rows.job_exists(uow, event.job_id):
            await rows.insert_job(uow, Job.requested(event, env.user_id or ""))

    async def on_job_accepted(self, uow: UnitOfWork, env: Envelope, event: JobAccepted) -> None:
        """Queues the job. A decision about a job not here yet is retried (its request comes on
        another path); one older than the retention is about a job ended and forgotten."""
        job = await rows.load_job(uow, job_id=event.job_id)
        if job is None:
            if (self.clock() - env.occurred_at).total_seconds() > self.settings.ledger_retention:
                log.warning("%s: a decision older than the retention, about a job not here "
                            "(ended and forgotten): ignored", event.job_id)
                return
            raise LookupError(f"{event.job_id} accepted before it was requested here; retrying")
        await self._decide(uow, job, event, env)

    async def on_job_message(self, uow: UnitOfWork, env: Envelope, message: Any) -> None:
        """Any other message about one job: decided on the job; about no job known, a no-op."""
        job_id = getattr(message, "job_id", None)
        job = await rows.load_job(uow, job_id=job_id, worker_id=None if job_id else
                                  message.worker_id)
        if job is not None:
            await self._decide(uow, job, message, env)

    async def on_host_lost(self, uow: UnitOfWork, env: Envelope, event: HostLost) -> None:
        """The host goes offline and each of its jobs decides on the loss."""
        await rows.host_offline(uow, event.host_id)
        for job in await rows.jobs_on_host(uow, event.host_id):
            await self._decide(uow, job, event, env)

    async def on_host_online(self, uow: UnitOfWork, env: Envelope, event: HostOnline) -> None:
        await rows.host_online(uow, event.host_id, event.capacity, event.incarnation)

    async def on_limit_changed(self, uow: UnitOfWork, env: Envelope, event: Any) -> None:
        if not isinstance(event, EntitlementExpired):  # the Downgraded that follows says how
            await rows.set_limit(uow, env.user_id or "", event.max_workers)

    async def on_restart_due(self, uow: UnitOfWork, key: str, data: dict[str, Any]) -> None:
        """The backoff is over: the crashed job is queued again as its next attempt."""
        job = await rows.load_job(uow, job_id=data["job_id"])
        if job is not None:
            await self._decide(uow, job, RestartDue(job.job_id))
            await self.place_queued(uow)

    async def on_circuit_cooled(self, uow: UnitOfWork, key: str, data: dict[str, Any]) -> None:
        circuit = await rows.load_circuit(uow, data["user_id"], data["strategy_id"])
        circuit, events = circuit_cooled(circuit, self.clock())
        await rows.save_circuit(uow, circuit)
        self._emit_circuit(uow, circuit.user_id, circuit.strategy_id, events)

    # ------------------------------------------------------------------ deciding

    async def _decide(self, uow: UnitOfWork, job: Job, message: Input,
                      env: Envelope | None = None) -> None:
        entitled = True
        if isinstance(message, _MAY_RESTART) and job.state in (State.DISPATCHED, State.RUNNING):
            entitled = await rows.entitled(uow, job)
        decision = decide(job, message, self.clock(), self.settings,
                          occurred_at=env.occurred_at if env else None,
                          sender=(env.user_id or None) if env else None, entitled=entitled)
        await self._save(uow, job, decision)

    async def _save(self, uow: UnitOfWork, before: Job, decision: Decision) -> None:
        """Save the decided job, apply its timers, emit its events on the job's stream."""
        if decision.job != before:
            await rows.save_jobs(uow, [decision.job])
        await uow.apply(decision.timers)
        self._emit(uow, before, decision.events)
        if decision.strategy_failed:
            circuit = await rows.load_circuit(uow, before.user_id, before.strategy_id)
            circuit, events, timers = strategy_failed(
                circuit, self.clock(), window=self.settings.circuit_window,
                threshold=self.settings.circuit_failures, cooldown=self.settings.circuit_cooldown)
            await rows.save_circuit(uow, circuit)
            await uow.apply(timers)
            self._emit_circuit(uow, before.user_id, before.strategy_id, events)

    @staticmethod
    def _emit(uow: UnitOfWork, job: Job, events: tuple[Message, ...]) -> None:
        for event in events:
            uow.emit(event, stream=job_stream(job.job_id), user_id=job.user_id,
                     correlation_id=job.job_id)

    @staticmethod
    def _emit_circuit(uow: UnitOfWork, user_id: str, strategy_id: str,
                      events: tuple[Message, ...]) -> None:
        for event in events:
            uow.emit(event, stream=circuit_stream(user_id, strategy_id), user_id=user_id)

    # ------------------------------------------------------------------ placement

    async def _dispatch_loop(self) -> None:
        """A placement round of its own every second: a safety net, since every batch and every
        due restart places queued jobs in its own transaction."""
        while True:
            await asyncio.sleep(1.0)
            async with self.store.transaction() as uow:
                await self.place_queued(uow)

    async def place_queued(self, uow: UnitOfWork) -> None:
        """Place queued jobs on hosts within the spawn throttle and the system ceiling; pause or
        resume the queue at the ceiling."""
        admission = admit(await rows.queue_facts(uow),
                          concurrency=self.settings.spawn_concurrency,
                          ceiling=self.settings.max_system_workers)
        if admission.pause is not None:
            await rows.set_paused(uow, admission.pause)
        for event in admission.events:
            uow.emit(event, stream=QUEUE_STREAM)
        if admission.budget <= 0:
            return
        hosts, incarnations = await rows.online_hosts(uow)
        queued = await rows.next_queued(uow, admission.budget)
        now = self.clock()
        decisions = [
            (job, decide(job, Dispatch(host_id, incarnations[host_id]), now, self.settings))
            for job, host_id in zip(queued, assign(len(queued), hosts), strict=False)]
        await rows.save_jobs(uow, [decision.job for _, decision in decisions])
        for job, decision in decisions:
            self._emit(uow, job, decision.events)
