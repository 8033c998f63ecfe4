"""The worker-host's table of the workers it is responsible for, and its statements (Core)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, Text, bindparam, delete, insert, select, update
from sqlmodel import Field, SQLModel

from services.database import UtcDateTime
from services.store import UnitOfWork


class LocalWorker(SQLModel, table=True):
    """A worker this host is responsible for, from dispatch until its end is reported."""

    __tablename__ = "local_workers"
    worker_id: str = Field(primary_key=True, max_length=100)
    job_id: str = Field(max_length=100)
    user_id: str = Field(max_length=100)
    attempt: int = 0
    strategy_id: str = Field(max_length=100)
    broker_id: str = Field(max_length=50)
    credentials_sealed: str = Field(sa_column=Column(Text, nullable=False))
    config: str = Field(sa_column=Column(Text, nullable=False))
    pid: int | None = None
    stopping: bool = False
    flatten: bool = False
    stop_reason: str | None = None
    dispatched_at: datetime = Field(sa_type=UtcDateTime)


LOCAL_WORKERS = LocalWorker.__table__  # type: ignore[attr-defined]
TABLES = (LOCAL_WORKERS,)

_BY_ID = LOCAL_WORKERS.c.worker_id == bindparam("worker")
LATEST_ATTEMPT = select(LOCAL_WORKERS.c.attempt).where(_BY_ID)
FORGET = delete(LOCAL_WORKERS).where(_BY_ID)
RECORD_INTENT = insert(LOCAL_WORKERS)
LOCAL = select(LOCAL_WORKERS).where(_BY_ID)
ALL = select(LOCAL_WORKERS)
RECORD_PID = (update(LOCAL_WORKERS).where(_BY_ID).values(pid=bindparam("pid"))
              .returning(LOCAL_WORKERS.c.stopping, LOCAL_WORKERS.c.flatten))
MARK_STOPPING = (update(LOCAL_WORKERS).where(_BY_ID)
                 .values(stopping=True, flatten=bindparam("flatten"),
                         stop_reason=bindparam("reason")))


async def latest_attempt(uow: UnitOfWork, worker_id: str) -> int | None:
    return (await uow.execute(LATEST_ATTEMPT, {"worker": worker_id})).scalar()


async def record_intent(uow: UnitOfWork, intent: LocalWorker, *, replacing: bool) -> None:
    """Record `intent`, `replacing` what this host knew of the worker (an earlier attempt)."""
    if replacing:
        await uow.execute(FORGET, {"worker": intent.worker_id})
    await uow.execute(RECORD_INTENT, intent.model_dump())


async def local(uow: UnitOfWork, worker_id: str) -> Any:
    return (await uow.execute(LOCAL, {"worker": worker_id})).first()


async def forget(uow: UnitOfWork, worker_id: str) -> None:
    await uow.execute(FORGET, {"worker": worker_id})


async def record_pid(uow: UnitOfWork, worker_id: str, pid: int) -> Any:
    """The worker's pid; returns whether a stop came meanwhile (stopping, flatten)."""
    return (await uow.execute(RECORD_PID, {"worker": worker_id, "pid": pid})).first()


async def mark_stopping(uow: UnitOfWork, worker_id: str, flatten: bool, reason: str) -> bool:
    result = await uow.execute(MARK_STOPPING, {"worker": worker_id, "flatten": flatten,
                                               "reason": reason})
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def every_worker(uow: UnitOfWork) -> list[Any]:
    return list(await uow.execute(ALL))
