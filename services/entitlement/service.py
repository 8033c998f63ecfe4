"""Entitlement service: owns plans, slot usage and open circuits; decides every start
(StartRunner → JobRequested + JobAccepted | JobRejected, one transaction); expires upgrades.

A start, whether a bus command or the gateway's `DecideStart` query, goes through one handler and
one ledger, so it is decided once; each decision counts the user's slots and takes one in a single
write transaction, so N parallel starts against a limit of one give exactly one JobAccepted.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from events import (
    CircuitClosed,
    CircuitOpened,
    Envelope,
    JobAccepted,
    JobRequested,
    RestartsExhausted,
    StartRunner,
    UpgradeEntitlement,
    WorkerStopped,
)
from events.queries import CheckEntitlement, Conflict, DecideStart, Invalid, SlotQuery
from events.routing import job_stream, user_stream
from services.bus import RawJson
from services.entitlement import rows
from services.entitlement.rules import (
    FREE,
    TIER_LIMITS,
    Plan,
    expire,
    judge_start,
    stop_excess,
    upgrade,
)
from services.service import Service
from services.store import UnitOfWork
from services.topology import ENTITLEMENT_INBOX, ENTITLEMENT_RPC


class EntitlementService(Service):
    name = "entitlement"
    tables = rows.TABLES
    single_active = True

    async def setup(self) -> None:
        self.handle(ENTITLEMENT_INBOX, {
            StartRunner: self.on_start_runner,
            CircuitOpened: self.on_circuit,
            CircuitClosed: self.on_circuit,
            WorkerStopped: self.on_job_ended,
            RestartsExhausted: self.on_job_ended,
            UpgradeEntitlement: self.on_upgrade,
        })
        self.bus.serve(ENTITLEMENT_RPC, {DecideStart: self.decide_start,
                                         CheckEntitlement: self.check,
                                         SlotQuery: self.slot})
        self._freed = asyncio.Event()
        self.timer_handlers["expire"] = self.on_expiry_due

    # ------------------------------------------------------------------ handlers

    async def on_start_runner(self, uow: UnitOfWork, env: Envelope,
                              cmd: StartRunner) -> Envelope | None:
        """Records the request (JobRequested) and decides it in the same transaction: exactly one
        JobAccepted (taking a slot) or JobRejected per job, kept for a request delivered again.
        Returns the decision, or None for a job decided before."""
        user_id = env.user_id or ""
        await uow.lock(f"quota:{user_id}")
        facts = await rows.start_facts(uow, cmd.job_id, user_id, cmd.strategy_id)
        if facts.decided is not None or facts.taken is not None:
            return None  # decided before (the same start sent twice)
        where = {"stream": env.stream, "correlation_id": cmd.job_id}
        verdict = judge_start(rows.plan_of(facts), facts.in_use, facts.circuit_until,
                              self.clock(), job_id=cmd.job_id, worker_id=cmd.worker_id,
                              strategy_id=cmd.strategy_id)
        # A rejected start is recorded without its parameters (up to 8 KiB each): the log is
        # never pruned, and a user at their limit could otherwise fill it with retries.
        config = (cmd.config if isinstance(verdict, JobAccepted)
                  else cmd.config.model_copy(update={"parameters": {}}))
        uow.emit(JobRequested(job_id=cmd.job_id, worker_id=cmd.worker_id,
                              strategy_id=cmd.strategy_id, broker_id=cmd.broker_id,
                              credentials_sealed=cmd.credentials_sealed, config=config,
                              flatten_on_stop=cmd.flatten_on_stop), **where)
        if isinstance(verdict, JobAccepted):
            await rows.take_slot(uow, cmd.job_id, user_id, cmd.worker_id, cmd.flatten_on_stop)
        decision = uow.emit(verdict, **where)
        await rows.record_decision(uow, cmd.job_id, decision)
        return decision

    async def forget_ended(self, before: float) -> int:
        """Forgets the decisions older than the ledger's retention, as the ledger does."""
        return await self.store.forget_rows(rows.DECISIONS.c.decided_at, int(before))

    async def on_circuit(self, uow: UnitOfWork, env: Envelope, event: Any) -> None:
        """Remembers which strategies' circuits are open (the scheduler counts the failures)."""
        if isinstance(event, CircuitOpened):
            await rows.open_circuit(uow, env.user_id or "", event.strategy_id, event.retry_at)
        else:
            await rows.close_circuit(uow, env.user_id or "", event.strategy_id)

    async def on_job_ended(self, uow: UnitOfWork, env: Envelope, event: Any) -> None:
        """Frees the job's slot (a job without one: a no-op)."""
        await rows.free_slot(uow, event.job_id)
        uow.after_commit.append(self._wake_slot_queries)

    def _wake_slot_queries(self) -> None:
        self._freed.set()
        self._freed = asyncio.Event()

    async def on_upgrade(self, uow: UnitOfWork, env: Envelope, cmd: UpgradeEntitlement) -> None:
        """Puts the user on the tier until now + days, arms the expiry timer, emits
        EntitlementUpgraded; a lower tier than before stops the excess workers."""
        user_id = env.user_id or ""
        await uow.lock(f"quota:{user_id}")
        plan, upgraded = upgrade(cmd.tier, cmd.days, self.clock())
        await rows.save_plan(uow, user_id, plan)
        await uow.set_timer(f"expire:{user_id}", "expire", upgraded.expires_at, user_id=user_id)
        uow.emit(upgraded, stream=user_stream(user_id), user_id=user_id)
        await self._stop_excess(uow, user_id, TIER_LIMITS[cmd.tier],
                                f"tier changed to {cmd.tier} ({TIER_LIMITS[cmd.tier]} workers)")

    async def on_expiry_due(self, uow: UnitOfWork, key: str, data: dict[str, Any]) -> None:
        """At the expiry: EntitlementExpired, EntitlementDowngraded to free, and the newest
        workers above the free limit are stopped."""
        user_id = data["user_id"]
        ended = expire(await rows.load_plan(uow, user_id), self.clock())
        if ended is None:
            return  # extended or already downgraded since the timer was set
        await rows.save_plan(uow, user_id, Plan())
        for event in ended:
            uow.emit(event, stream=user_stream(user_id), user_id=user_id)
        await self._stop_excess(uow, user_id, TIER_LIMITS[FREE], ended[1].reason)

    async def _stop_excess(self, uow: UnitOfWork, user_id: str, limit: int, reason: str) -> None:
        for job_id, stop in stop_excess(await rows.slots_of(uow, user_id), limit, reason):
            uow.emit(stop, stream=job_stream(job_id), user_id=user_id, correlation_id=job_id)

    # ------------------------------------------------------------------ queries

    async def decide_start(self, query: DecideStart) -> RawJson:
        """Decides the StartRunner in `query` as `on_start_runner` does (marked processed in the
        inbox's ledger, concurrent requests in one commit) and answers with the decision's
        envelope once committed; a start asked again gets its recorded decision."""
        envelope = query.envelope
        try:
            command = envelope.message()
        except (ValueError, LookupError) as exc:
            raise Invalid(f"'envelope' must be a StartRunner envelope ({exc})") from None
        if not isinstance(command, StartRunner):
            raise Invalid(f"'envelope' must be a StartRunner envelope, not {envelope.type}")

        async def take_decision(uow: UnitOfWork) -> Envelope:
            decision = None
            if await self.store.claim(uow, [envelope], ENTITLEMENT_INBOX.name):
                uow.cause = envelope
                decision = await self.on_start_runner(uow, envelope, command)
            if decision is None:
                decision = await rows.decision_of(uow, command.job_id)
            if decision is None:  # decided longer ago than the ledger's retention
                raise Conflict(f"job {command.job_id} was decided before")
            return decision

        return RawJson((await self.store.grouped(take_decision)).to_json())

    async def slot(self, query: SlotQuery) -> dict[str, bool]:
        """Whether the job holds a slot, once it does not or the `wait` is over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + query.wait
        while True:
            freed = self._freed  # before the read: a slot freed during it wakes this one
            async with self.store.reading() as connection:
                held = await rows.slot_held(connection, query.job_id)
            if not held or (remaining := deadline - loop.time()) <= 0:
                return {"held": held}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), timeout=remaining)

    async def check(self, query: CheckEntitlement) -> dict[str, Any]:
        """The user's tier, limit and usage, as of now."""
        async with self.store.reading() as connection:
            facts = (await connection.execute(rows.USER_FACTS, {"user": query.user_id})).one()
        plan, in_use = rows.plan_of(facts), facts.in_use
        tier = plan.effective_tier(self.clock())
        limit = TIER_LIMITS[tier]
        return {
            "userId": query.user_id,
            "isEntitled": in_use < limit,
            "tier": tier,
            "maxWorkers": limit,
            "currentWorkers": in_use,
            "expiresAt": plan.expires_at.isoformat() if plan.expires_at and tier != FREE else None,
        }
