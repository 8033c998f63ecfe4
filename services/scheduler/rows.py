"""The scheduler's tables and the statements on them (SQLAlchemy Core): jobs, hosts, circuits,
users' limits and the queue's pause flag."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Text, bindparam, func, insert, select, update
from sqlalchemy.sql import Executable
from sqlmodel import Field, SQLModel

from events.routing import circuit_key
from services.database import UtcDateTime
from services.scheduler.lifecycle import ENDED, HOLDS_SLOT, ON_HOST, Job, State
from services.scheduler.policy import Circuit, HostLoad, QueueFacts
from services.store import UnitOfWork


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
    attempt: int = 0
    streak: int = 0
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UtcDateTime, index=True)
    flatten_only: bool | None = None  # None: before flatten-only runs (a trading run)


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


TABLES = tuple(t.__table__ for t in (JobRow, HostRow, CircuitRow, LimitRow, FlagRow))  # type: ignore[attr-defined]
JOBS, HOSTS, CIRCUITS, LIMITS, FLAGS = TABLES
_JOB_FIELDS = tuple(f.name for f in fields(Job))
_MUTABLE = ("state", "host_id", "attempt", "streak", "started_at", "ended_at", "flatten_only")

JOB_BY_ID = select(JOBS).where(JOBS.c.job_id == bindparam("key"))
JOB_BY_WORKER = select(JOBS).where(JOBS.c.worker_id == bindparam("key"))
INSERT_JOB = insert(JOBS)
SAVE_JOB = update(JOBS).where(JOBS.c.seq == bindparam("job_seq")).values(
    {name: bindparam(f"new_{name}") for name in _MUTABLE})
JOBS_ON_HOST = (select(JOBS).where(JOBS.c.host_id == bindparam("host"),
                                   JOBS.c.state.in_(ON_HOST)).order_by(JOBS.c.seq))


def _count_in(*states: State) -> Any:
    return (select(func.count()).select_from(JOBS).where(JOBS.c.state.in_(states))
            .scalar_subquery())


# A placement round's read: the live jobs that bound it (counted through the state index, so a
# round costs the live jobs only, never the ended ones), and whether the queue is paused.
QUEUE_FACTS = select(
    _count_in(State.QUEUED).label("queued"),
    _count_in(State.DISPATCHED).label("in_flight"),
    _count_in(*ON_HOST).label("active"),
    select(FLAGS.c.value).where(FLAGS.c.name == "paused").scalar_subquery().label("paused"),
)
NEXT_QUEUED = (select(JOBS).where(JOBS.c.state == State.QUEUED).order_by(JOBS.c.seq)
               .limit(bindparam("budget")))
HOST_LOADS = (
    select(HOSTS.c.host_id, HOSTS.c.capacity, HOSTS.c.incarnation,
           select(func.count()).select_from(JOBS)
           .where(JOBS.c.host_id == HOSTS.c.host_id, JOBS.c.state.in_(ON_HOST))
           .scalar_subquery().label("load"))
    .where(HOSTS.c.online)
)
SLOTS_BEFORE = (select(func.count()).select_from(JOBS)
                .where(JOBS.c.user_id == bindparam("user"), JOBS.c.state.in_(HOLDS_SLOT),
                       JOBS.c.seq < bindparam("before")))
LIMIT_OF = select(LIMITS.c.max_workers).where(LIMITS.c.user_id == bindparam("user"))


def job_of(row: Any) -> Job:
    values = {name: getattr(row, name) for name in _JOB_FIELDS}
    return Job(**values | {"state": State(values["state"]),
                           "flatten_only": bool(values["flatten_only"])})


async def load_job(uow: UnitOfWork, *, job_id: str | None = None,
                   worker_id: str | None = None) -> Job | None:
    query = JOB_BY_ID if job_id is not None else JOB_BY_WORKER
    row = (await uow.execute(query, {"key": job_id or worker_id})).first()
    return None if row is None else job_of(row)


async def insert_job(uow: UnitOfWork, job: Job) -> None:
    await uow.execute(INSERT_JOB, {k: v for k, v in asdict(job).items() if k != "seq"})


async def save_jobs(uow: UnitOfWork, jobs: Sequence[Job]) -> None:
    """Write the jobs' changing columns (one statement for all)."""
    if jobs:
        await uow.execute(SAVE_JOB, [
            {"job_seq": job.seq} | {f"new_{name}": getattr(job, name) for name in _MUTABLE}
            for job in jobs])


async def jobs_on_host(uow: UnitOfWork, host_id: str) -> list[Job]:
    return [job_of(row) for row in await uow.execute(JOBS_ON_HOST, {"host": host_id})]


async def entitled(uow: UnitOfWork, job: Job) -> bool:
    """Still within the user's limit, counting the user's older slot-holding jobs first."""
    limit = (await uow.execute(LIMIT_OF, {"user": job.user_id})).scalar()
    older = (await uow.execute(SLOTS_BEFORE, {"user": job.user_id, "before": job.seq})).scalar()
    return older < (1 if limit is None else limit)


async def queue_facts(uow: UnitOfWork) -> QueueFacts:
    facts = (await uow.execute(QUEUE_FACTS)).one()
    return QueueFacts(facts.queued, facts.in_flight, facts.active, bool(facts.paused))


async def next_queued(uow: UnitOfWork, budget: int) -> list[Job]:
    return [job_of(row) for row in await uow.execute(NEXT_QUEUED, {"budget": budget})]


async def online_hosts(uow: UnitOfWork) -> tuple[list[HostLoad], dict[str, str]]:
    """The online hosts with their loads, and each one's incarnation ("" before they had one)."""
    rows = (await uow.execute(HOST_LOADS)).all()
    return ([HostLoad(r.host_id, r.capacity, r.load) for r in rows],
            {r.host_id: r.incarnation or "" for r in rows})


async def _upsert(uow: UnitOfWork, table: Any, key: dict[str, Any], values: dict[str, Any]) -> None:
    where = [table.c[name] == value for name, value in key.items()]
    if not (await uow.execute(update(table).where(*where).values(values))).rowcount:  # type: ignore[attr-defined]
        await uow.execute(insert(table).values(key | values))


async def host_online(uow: UnitOfWork, host_id: str, capacity: int, incarnation: str) -> None:
    await _upsert(uow, HOSTS, {"host_id": host_id},
                  {"capacity": capacity, "online": True, "incarnation": incarnation})


async def host_offline(uow: UnitOfWork, host_id: str) -> None:
    await uow.execute(update(HOSTS).where(HOSTS.c.host_id == host_id).values(online=False))


async def set_limit(uow: UnitOfWork, user_id: str, max_workers: int) -> None:
    await _upsert(uow, LIMITS, {"user_id": user_id}, {"max_workers": max_workers})


async def set_paused(uow: UnitOfWork, paused: bool) -> None:
    await _upsert(uow, FLAGS, {"name": "paused"}, {"value": paused})


async def load_circuit(uow: UnitOfWork, user_id: str, strategy_id: str) -> Circuit:
    row = (await uow.execute(select(CIRCUITS).where(
        CIRCUITS.c.key == circuit_key(user_id, strategy_id)))).first()
    if row is None:
        return Circuit(user_id, strategy_id)
    failures = tuple(datetime.fromisoformat(f) for f in json.loads(row.failures))
    return Circuit(user_id, strategy_id, failures, row.open_until)


async def save_circuit(uow: UnitOfWork, circuit: Circuit) -> None:
    await _upsert(uow, CIRCUITS, {"key": circuit_key(circuit.user_id, circuit.strategy_id)}, {
        "failures": json.dumps([f.isoformat() for f in circuit.failures]),
        "open_until": circuit.open_until})


def untimed_ends() -> Executable:
    """Jobs ended before `ended_at` existed: their retention counts from now (a backfill)."""
    return update(JOBS).where(JOBS.c.ended_at.is_(None), JOBS.c.state.in_(ENDED)).values(
        ended_at=datetime.now(UTC))


async def job_exists(uow: UnitOfWork, job_id: str) -> bool:
    return (await uow.execute(JOB_BY_ID, {"key": job_id})).first() is not None
