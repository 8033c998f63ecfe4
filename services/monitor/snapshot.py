"""Snapshots of the monitor's folded state, so that a restart folds only the log's tail.

A snapshot is `Folded` at a log position, as JSON in the monitor's database, written every
`Settings.snapshot_every` recorded events and when the monitor stops. A restart starts from the
latest one made by this build's fold (`CODE`) whose chain hash is the log's at its position, else
replays the whole log; either way it reaches the state a full replay gives.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import immutables
import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    LargeBinary,
    MetaData,
    String,
    Table,
    delete,
    insert,
    select,
)

import events
import projections
from events import JobStatus
from events.envelope import LoggedEnvelope
from projections import EntitlementView, PositionView, Projections, TradingStats, WorkerView
from services.database import Database
from services.monitor.liveness import HostView
from services.monitor.log import EventLog
from services.monitor.replay import Folded

log = logging.getLogger(__name__)

KEEP = 2  # snapshots kept: the latest, and the one before in case the latest is cut off


def _code_digest() -> str:
    """A digest of every source file the folded state depends on."""
    files = sorted([*Path(events.__file__).parent.glob("*.py"),
                    *Path(projections.__file__).parent.glob("*.py"),
                    *(Path(__file__).parent / name for name in ("replay.py", "liveness.py",
                                                                "snapshot.py"))])
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


CODE = _code_digest()

metadata = MetaData()
snapshots = Table(
    "monitor_snapshot",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("log_hash", String(64), nullable=False),
    Column("code", String(64), nullable=False),
    Column("taken_at", DateTime(timezone=True), nullable=False),
    Column("body", LargeBinary, nullable=False),
)


# ------------------------------------------------------------------------------ JSON


def encode(folded: Folded) -> bytes:
    """The folded state as deflated JSON (maps as objects, views as objects of their fields)."""
    state = folded.state
    return zlib.compress(orjson.dumps({
        "position": folded.position,
        "workers": dict(state.workers),
        "positions": {worker: dict(held) for worker, held in state.positions.items()},
        "stats": dict(state.stats),
        "entitlements": dict(state.entitlements),
        "rejected_jobs": state.rejected_jobs,
        "events_applied": state.events_applied,
        "worker_by_job": dict(state.worker_by_job),
        "clock": state.clock,
        "ended_by_hour": {str(hour): dict(ended) for hour, ended in state.ended_by_hour.items()},
        "early": {job: [[e.type, e.version, e.user_id, e.occurred_at, e.payload] for e in held]
                  for job, held in state.early.items()},
        "hosts": dict(folded.hosts),
        "silenced": sorted(folded.silenced),
    }), 1)


def decode(body: bytes) -> Folded:
    raw = orjson.loads(zlib.decompress(body))
    state = Projections(
        workers=immutables.Map({k: _worker(v) for k, v in raw["workers"].items()}),
        positions=immutables.Map({
            worker: immutables.Map({k: PositionView(**v) for k, v in held.items()})
            for worker, held in raw["positions"].items()}),
        stats=immutables.Map({k: TradingStats(**v) for k, v in raw["stats"].items()}),
        entitlements=immutables.Map({
            k: EntitlementView(**{**v, "expires_at": _time(v["expires_at"])})
            for k, v in raw["entitlements"].items()}),
        rejected_jobs=raw["rejected_jobs"],
        events_applied=raw["events_applied"],
        worker_by_job=immutables.Map(raw["worker_by_job"]),
        clock=_time(raw["clock"]),
        ended_by_hour=immutables.Map({int(hour): immutables.Map(ended)
                                      for hour, ended in raw["ended_by_hour"].items()}),
        early=immutables.Map({job: tuple(LoggedEnvelope(*row) for row in held)
                              for job, held in raw["early"].items()}),
    )
    hosts = immutables.Map({k: HostView(**{**v, "online_at": _time(v["online_at"])})
                            for k, v in raw["hosts"].items()})
    return Folded(state=state, hosts=hosts, position=raw["position"],
                  silenced=set(raw["silenced"]))


def _worker(raw: dict[str, Any]) -> WorkerView:
    return WorkerView(**{**raw, "status": JobStatus(raw["status"]),
                         **{name: _time(raw[name])
                            for name in ("created_at", "started_at", "ended_at")}})


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


# ------------------------------------------------------------------------------ storage


class Snapshots:
    """The snapshots of one monitor's log, in its database."""

    def __init__(self, engine: Database, event_log: EventLog) -> None:
        self.engine = engine
        self.log = event_log

    async def open(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def save(self, folded: Folded) -> int:
        """Keep `folded` as the latest snapshot (encoded off the event loop: `folded` must not
        change meanwhile); returns its size in bytes."""
        log_hash = await self.log.hash_at(folded.position)
        if log_hash is None:
            raise LookupError(f"the log has no position {folded.position}")
        body = await asyncio.to_thread(encode, folded)
        async with self.engine.begin() as conn:
            await conn.execute(delete(snapshots).where(snapshots.c.position >= folded.position))
            await conn.execute(insert(snapshots).values(
                position=folded.position, log_hash=log_hash, code=CODE,
                taken_at=datetime.now(UTC), body=body))
            kept = (await conn.execute(select(snapshots.c.position)
                                       .order_by(snapshots.c.position.desc())
                                       .limit(KEEP))).scalars().all()
            await conn.execute(delete(snapshots).where(snapshots.c.position < min(kept)))
        return len(body)

    async def latest(self) -> Folded | None:
        """The latest snapshot this build can start from, decoded; None if there is none."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                select(snapshots.c.position, snapshots.c.log_hash, snapshots.c.code,
                       snapshots.c.body)
                .order_by(snapshots.c.position.desc()))).all()
        for position, log_hash, code, body in rows:
            if code != CODE:
                log.info("snapshot at %d was made by another build of the fold; not used",
                         position)
            elif await self.log.hash_at(position) != log_hash:
                log.warning("snapshot at %d does not match the log there (restored or replaced "
                            "log?); not used", position)
            else:
                try:
                    return decode(body)
                except Exception:
                    log.exception("snapshot at %d does not decode; not used", position)
        return None
