"""Entitlement service: owns plans, slot usage and open circuits; decides every start
(StartRunner → JobRequested + JobAccepted | JobRejected, one transaction); expires upgrades.

A start comes as a command on the bus, or (from the gateway) as the RPC `start`, answered with
the decision once it has committed: one hop instead of three for the HTTP answer. Both ways
decide in the same handler and record the command in the same ledger, so either way a command
is decided once.

Race-free counting: every decision runs in one write transaction (SQLite `BEGIN IMMEDIATE`, or a
per-user advisory lock elsewhere) that counts the user's slots and takes one, so N parallel
starts against a limit of one give exactly one JobAccepted. A slot is held from JobAccepted until
the job ends (WorkerStopped, RestartsExhausted): queued, starting, running and
crashed-awaiting-restart jobs all count.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, func
from sqlmodel import Field, SQLModel, select

from events import (
    CircuitClosed,
    CircuitOpened,
    EntitlementDowngraded,
    EntitlementExpired,
    EntitlementUpgraded,
    Envelope,
    JobAccepted,
    JobRejected,
    JobRequested,
    RejectReason,
    RestartsExhausted,
    StartRunner,
    StopRunner,
    UpgradeEntitlement,
    WorkerStopped,
)
from events.envelope import as_utc
from services.bus import RawJson
from services.entitlement.rules import FREE, TIER_LIMITS, Accept, Plan, decide, excess
from services.service import Service, now
from services.store import UnitOfWork, UtcDateTime
from services.topology import ENTITLEMENT_INBOX, rpc_queue


class PlanRow(SQLModel, table=True):
    __tablename__ = "plans"
    user_id: str = Field(primary_key=True, max_length=100)
    tier: str = Field(max_length=20)
    expires_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class CircuitRow(SQLModel, table=True):
    """A strategy (per user) whose circuit is open until `open_until`."""

    __tablename__ = "open_circuits"
    key: str = Field(primary_key=True, max_length=250)
    open_until: datetime = Field(sa_type=UtcDateTime)


class SlotRow(SQLModel, table=True):
    """A job holding one of its user's worker slots."""

    __tablename__ = "slots"
    seq: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(unique=True, max_length=100)
    user_id: str = Field(index=True, max_length=100)
    worker_id: str = Field(max_length=100)
    flatten_on_stop: bool = True


SLOTS, PLANS, CIRCUITS = SlotRow.__table__, PlanRow.__table__, CircuitRow.__table__  # type: ignore[attr-defined]
# A user's plan and the slots they hold, in one read: what a start's decision and the `check`
# query both go by (an ORM lookup each cost more than the rest of the decision).
PLAN_FACTS = (
    select(PLANS.c.tier).where(PLANS.c.user_id == bindparam("user"))
    .scalar_subquery().label("tier"),
    select(PLANS.c.expires_at).where(PLANS.c.user_id == bindparam("user"))
    .scalar_subquery().label("expires_at"),
    select(func.count()).select_from(SLOTS).where(SLOTS.c.user_id == bindparam("user"))
    .scalar_subquery().label("in_use"),
)
USER_FACTS = select(*PLAN_FACTS)
# Everything a start's decision reads, in one statement: whether the job holds a slot already,
# its strategy's open circuit, and the user's facts.
START_FACTS = select(
    select(SLOTS.c.seq).where(SLOTS.c.job_id == bindparam("job"))
    .scalar_subquery().label("taken"),
    select(CIRCUITS.c.open_until).where(CIRCUITS.c.key == bindparam("circuit"))
    .scalar_subquery().label("circuit_until"),
    *PLAN_FACTS,
)


def plan_of(facts: Any) -> Plan:
    """The plan in a row of `USER_FACTS` or `START_FACTS` (the free plan for a user without one)."""
    if facts.tier is None:
        return Plan()
    return Plan(facts.tier, as_utc(facts.expires_at) if facts.expires_at else None)


def circuit_key(user_id: str, strategy_id: str) -> str:
    return f"{user_id}|{strategy_id}"


def user_stream(user_id: str) -> str:
    return f"user-{user_id}"


class EntitlementService(Service):
    name = "entitlement"
    tables = (PlanRow.__table__, SlotRow.__table__, CircuitRow.__table__)  # type: ignore[attr-defined]

    async def setup(self) -> None:
        self.handle(
            ENTITLEMENT_INBOX,
            {
                StartRunner: self.on_start_runner,
                CircuitOpened: self.on_circuit,
                CircuitClosed: self.on_circuit,
                WorkerStopped: self.on_job_ended,
                RestartsExhausted: self.on_job_ended,
                UpgradeEntitlement: self.on_upgrade,
            },
        )
        self.bus.serve(rpc_queue(self.name), self.answer)
        self.timer_handlers["expire"] = self.on_expiry_due

    # ------------------------------------------------------------------ handlers

    async def on_start_runner(self, uow: UnitOfWork, env: Envelope,
                              cmd: StartRunner) -> Envelope | None:
        """Records the request (JobRequested) and decides it in the same transaction: exactly one
        JobAccepted (taking a slot) or JobRejected (worker_limit, entitlement_expired,
        circuit_open) per job. Returns the decision, or None for a job accepted before."""
        user_id = env.user_id or ""
        await uow.lock(f"quota:{user_id}")
        connection = await uow.connection()  # sees a slot freed earlier in this transaction
        facts = (await connection.execute(
            START_FACTS, {"job": cmd.job_id, "user": user_id,
                          "circuit": circuit_key(user_id, cmd.strategy_id)})).one()
        if facts.taken is not None:
            return None  # accepted before (the same start sent twice)
        where = dict(stream=env.stream, correlation_id=cmd.job_id)
        uow.emit(
            JobRequested(
                job_id=cmd.job_id,
                worker_id=cmd.worker_id,
                strategy_id=cmd.strategy_id,
                broker_id=cmd.broker_id,
                credentials_sealed=cmd.credentials_sealed,
                config=cmd.config,
                flatten_on_stop=cmd.flatten_on_stop,
            ),
            **where,
        )
        if facts.circuit_until is not None and as_utc(facts.circuit_until) > now():
            retry_at = as_utc(facts.circuit_until)
            return uow.emit(
                JobRejected(
                    job_id=cmd.job_id,
                    reason=RejectReason.CIRCUIT_OPEN,
                    detail=f"strategy {cmd.strategy_id} keeps failing; circuit open, "
                    f"retry after {retry_at:%Y-%m-%d %H:%M:%S}Z",
                    retry_at=retry_at,
                ),
                **where,
            )
        decision = decide(plan_of(facts), facts.in_use, now())
        if isinstance(decision, Accept):
            await connection.execute(SLOTS.insert().values(
                job_id=cmd.job_id, user_id=user_id, worker_id=cmd.worker_id,
                flatten_on_stop=cmd.flatten_on_stop))
            return uow.emit(
                JobAccepted(
                    job_id=cmd.job_id,
                    worker_id=cmd.worker_id,
                    tier=decision.tier,
                    max_workers=decision.max_workers,
                    in_use=decision.in_use,
                ),
                **where,
            )
        return uow.emit(
            JobRejected(job_id=cmd.job_id, reason=decision.reason, detail=decision.detail),
            **where,
        )

    async def on_circuit(self, uow: UnitOfWork, env: Envelope, event: Any) -> None:
        """Remembers which strategies' circuits are open (the scheduler counts the failures)."""
        key = circuit_key(env.user_id or "", event.strategy_id)
        if isinstance(event, CircuitOpened):
            await uow.session.merge(CircuitRow(key=key, open_until=event.retry_at))
        elif (row := await uow.session.get(CircuitRow, key)) is not None:
            await uow.session.delete(row)

    async def on_job_ended(self, uow: UnitOfWork, env: Envelope, event: Any) -> None:
        """Frees the job's slot (idempotent: a job without a slot is a no-op)."""
        slot = (
            await uow.session.exec(select(SlotRow).where(SlotRow.job_id == event.job_id))
        ).first()
        if slot is not None:
            await uow.session.delete(slot)

    async def on_upgrade(self, uow: UnitOfWork, env: Envelope, cmd: UpgradeEntitlement) -> None:
        """Puts the user on the tier until now + days; arms the expiry timer; emits
        EntitlementUpgraded. A lower tier than the current one stops the excess workers."""
        user_id = env.user_id or ""
        await uow.lock(f"quota:{user_id}")
        expires_at = now() + timedelta(days=cmd.days)
        row = await uow.session.get(PlanRow, user_id) or PlanRow(user_id=user_id, tier=FREE)
        row.tier, row.expires_at = cmd.tier, expires_at
        uow.session.add(row)
        await uow.set_timer(f"expire:{user_id}", "expire", expires_at, user_id=user_id)
        uow.emit(
            EntitlementUpgraded(
                tier=cmd.tier, max_workers=TIER_LIMITS[cmd.tier], expires_at=expires_at
            ),
            stream=user_stream(user_id),
            user_id=user_id,
        )
        await self._stop_excess(
            uow,
            user_id,
            TIER_LIMITS[cmd.tier],
            f"tier changed to {cmd.tier} ({TIER_LIMITS[cmd.tier]} workers)",
        )

    async def on_expiry_due(self, uow: UnitOfWork, key: str, data: dict[str, Any]) -> None:
        """At `expires_at`: EntitlementExpired, EntitlementDowngraded to free, and the newest
        workers above the free limit are stopped (with their own flatten setting)."""
        user_id = data["user_id"]
        row = await uow.session.get(PlanRow, user_id)
        if (
            row is None
            or row.tier == FREE
            or row.expires_at is None
            or as_utc(row.expires_at) > now()
        ):
            return  # extended or already downgraded since the timer was set
        old_tier, expired_at = row.tier, as_utc(row.expires_at)
        row.tier, row.expires_at = FREE, None
        uow.session.add(row)
        stream = user_stream(user_id)
        uow.emit(
            EntitlementExpired(tier=old_tier, expired_at=expired_at), stream=stream, user_id=user_id
        )
        reason = f"{old_tier} entitlement expired; free allows {TIER_LIMITS[FREE]} worker"
        uow.emit(
            EntitlementDowngraded(
                from_tier=old_tier, to_tier=FREE, max_workers=TIER_LIMITS[FREE], reason=reason
            ),
            stream=stream,
            user_id=user_id,
        )
        await self._stop_excess(uow, user_id, TIER_LIMITS[FREE], reason)

    async def _stop_excess(self, uow: UnitOfWork, user_id: str, limit: int, reason: str) -> None:
        slots = (
            await uow.session.exec(
                select(SlotRow).where(SlotRow.user_id == user_id).order_by(SlotRow.seq)
            )
        ).all()
        by_job = {s.job_id: s for s in slots}
        for job_id in excess([s.job_id for s in slots], limit):
            slot = by_job[job_id]
            uow.emit(
                StopRunner(
                    worker_id=slot.worker_id,
                    flatten=slot.flatten_on_stop,
                    reason=f"stopped: {reason}",
                ),
                stream=f"job-{job_id}",
                user_id=user_id,
                correlation_id=job_id,
            )

    # ------------------------------------------------------------------ RPC

    async def _start(self, request: dict[str, Any]) -> RawJson:
        """RPC `start` {envelope: a StartRunner's}: decides it as `on_start_runner` does and
        answers, once that has committed, with the decision's envelope (JobAccepted or
        JobRejected). The command itself never travels on the bus: its JobRequested, in the
        same commit, records it (every field, and its id as the causation). It is marked
        processed in the inbox's ledger, so the same command sent on the bus is skipped.
        Concurrent requests share a transaction (group commit). A command decided before is an
        error."""
        try:
            envelope = Envelope.model_validate(request["envelope"])
            command = envelope.message()
        except (KeyError, TypeError, ValidationError, LookupError) as exc:
            raise ValueError(f"'envelope' must be a StartRunner envelope ({exc})") from None
        if not isinstance(command, StartRunner):
            raise ValueError(f"'envelope' must be a StartRunner envelope, not {envelope.type}")

        async def take_decision(uow: UnitOfWork) -> Envelope:
            if not await self.store.claim(uow, [envelope], ENTITLEMENT_INBOX.name):
                raise LookupError(f"job {command.job_id} was decided before")
            uow.cause = envelope
            decision = await self.on_start_runner(uow, envelope, command)
            if decision is None:
                raise LookupError(f"job {command.job_id} was accepted before")
            return decision

        return RawJson((await self.store.grouped(take_decision)).to_json())

    # ------------------------------------------------------------------ queries

    async def answer(self, request: dict[str, Any]) -> Any:
        op = request.get("op")
        if op == "start":
            return await self._start(request)
        if op != "check":
            raise ValueError(f"unknown op {op!r} (expected start or check)")
        user_id = str(request["user_id"])
        async with self.store.reading() as session:
            facts = (await session.execute(USER_FACTS, {"user": user_id})).one()
        plan, in_use = plan_of(facts), facts.in_use
        tier = plan.effective_tier(now())
        limit = TIER_LIMITS[tier]
        return {
            "userId": user_id,
            "isEntitled": in_use < limit,
            "tier": tier,
            "maxWorkers": limit,
            "currentWorkers": in_use,
            "expiresAt": plan.expires_at.isoformat() if plan.expires_at and tier != FREE else None,
        }
