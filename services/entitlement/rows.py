"""The entitlement service's tables and statements (SQLAlchemy Core): plans, slots, open
circuits."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Text, bindparam, delete, func, insert, select, update
from sqlmodel import Field, SQLModel

from events import Envelope
from events.routing import circuit_key
from services.database import UtcDateTime
from services.entitlement.rules import Plan, Slot
from services.store import DbConnection, UnitOfWork


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


class DecisionRow(SQLModel, table=True):
    """A start's decision as answered (its envelope), kept for the ledger's retention so that a
    request delivered again (its first answer lost with a replica) gets the same answer."""

    __tablename__ = "decisions"
    job_id: str = Field(primary_key=True, max_length=100)
    envelope: str = Field(sa_column=Column(Text, nullable=False))
    decided_at: int = Field(index=True)  # Unix seconds


TABLES = tuple(t.__table__ for t in (PlanRow, SlotRow, CircuitRow, DecisionRow))  # type: ignore[attr-defined]
PLANS, SLOTS, CIRCUITS, DECISIONS = TABLES

# A user's plan and the slots they hold, in one read: what a start's decision and the check
# query both go by.
_PLAN_FACTS = (
    select(PLANS.c.tier).where(PLANS.c.user_id == bindparam("user"))
    .scalar_subquery().label("tier"),
    select(PLANS.c.expires_at).where(PLANS.c.user_id == bindparam("user"))
    .scalar_subquery().label("expires_at"),
    select(func.count()).select_from(SLOTS).where(SLOTS.c.user_id == bindparam("user"))
    .scalar_subquery().label("in_use"),
)
USER_FACTS = select(*_PLAN_FACTS)
# Everything a start's decision reads, in one statement: whether the job was decided or holds a
# slot already, its strategy's open circuit, and the user's facts.
SLOT_OF = select(SLOTS.c.seq).where(SLOTS.c.job_id == bindparam("job"))
START_FACTS = select(
    select(DECISIONS.c.job_id).where(DECISIONS.c.job_id == bindparam("job"))
    .scalar_subquery().label("decided"),
    SLOT_OF.scalar_subquery().label("taken"),
    select(CIRCUITS.c.open_until).where(CIRCUITS.c.key == bindparam("circuit"))
    .scalar_subquery().label("circuit_until"),
    *_PLAN_FACTS,
)
TAKE_SLOT = insert(SLOTS)
FREE_SLOT = delete(SLOTS).where(SLOTS.c.job_id == bindparam("job"))
SLOTS_OF = (select(SLOTS.c.job_id, SLOTS.c.worker_id, SLOTS.c.flatten_on_stop)
            .where(SLOTS.c.user_id == bindparam("user")).order_by(SLOTS.c.seq))


def plan_of(facts: Any) -> Plan:
    """The plan in a row of `USER_FACTS` or `START_FACTS` (the free plan for a user without one)."""
    return Plan() if facts.tier is None else Plan(facts.tier, facts.expires_at)


async def start_facts(uow: UnitOfWork, job_id: str, user_id: str, strategy_id: str) -> Any:
    return (await uow.execute(START_FACTS, {"job": job_id, "user": user_id,
                                            "circuit": circuit_key(user_id, strategy_id)})).one()


async def take_slot(uow: UnitOfWork, job_id: str, user_id: str, worker_id: str,
                    flatten_on_stop: bool) -> None:
    await uow.execute(TAKE_SLOT, {"job_id": job_id, "user_id": user_id, "worker_id": worker_id,
                                  "flatten_on_stop": flatten_on_stop})


async def free_slot(uow: UnitOfWork, job_id: str) -> None:
    await uow.execute(FREE_SLOT, {"job": job_id})


async def slot_held(connection: DbConnection, job_id: str) -> bool:
    return (await connection.execute(SLOT_OF, {"job": job_id})).first() is not None


async def slots_of(uow: UnitOfWork, user_id: str) -> list[Slot]:
    return [Slot(r.job_id, r.worker_id, r.flatten_on_stop)
            for r in await uow.execute(SLOTS_OF, {"user": user_id})]


async def load_plan(uow: UnitOfWork, user_id: str) -> Plan:
    return plan_of((await uow.execute(USER_FACTS, {"user": user_id})).one())


async def save_plan(uow: UnitOfWork, user_id: str, plan: Plan) -> None:
    values = {"tier": plan.tier, "expires_at": plan.expires_at}
    if not (await uow.execute(update(PLANS).where(PLANS.c.user_id == user_id)
                              .values(values))).rowcount:  # type: ignore[attr-defined]
        await uow.execute(insert(PLANS).values(user_id=user_id, **values))


async def open_circuit(uow: UnitOfWork, user_id: str, strategy_id: str,
                       until: datetime) -> None:
    key = circuit_key(user_id, strategy_id)
    await uow.execute(delete(CIRCUITS).where(CIRCUITS.c.key == key))
    await uow.execute(insert(CIRCUITS).values(key=key, open_until=until))


async def close_circuit(uow: UnitOfWork, user_id: str, strategy_id: str) -> None:
    await uow.execute(delete(CIRCUITS).where(CIRCUITS.c.key == circuit_key(user_id, strategy_id)))


async def record_decision(uow: UnitOfWork, job_id: str, decision: Envelope) -> None:
    await uow.execute(insert(DECISIONS).values(
        job_id=job_id, envelope=decision.to_json().decode(), decided_at=int(time.time())))


async def decision_of(uow: UnitOfWork, job_id: str) -> Envelope | None:
    """The decision recorded for `job_id`, or None (never decided, or forgotten)."""
    body = (await uow.execute(select(DECISIONS.c.envelope)
                              .where(DECISIONS.c.job_id == job_id))).scalar()
    return None if body is None else Envelope.from_json(body)
