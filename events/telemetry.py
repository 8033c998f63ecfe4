"""Heartbeats: transient telemetry on its own exchange, never written to the log."""

from __future__ import annotations

from datetime import datetime

from events.base import Telemetry
from events.values import PositionMark


class WorkerHeartbeat(Telemetry):
    job_id: str
    worker_id: str
    host_id: str
    pid: int
    at: datetime
    positions: tuple[PositionMark, ...] = ()


class WorkerHeartbeats(Telemetry):
    """Several workers' heartbeats relayed by their host in one message: a thousand workers
    beating every 5 s are 200 messages a second one by one, a few as batches."""

    host_id: str
    beats: tuple[WorkerHeartbeat, ...]


class HostHeartbeat(Telemetry):
    host_id: str
    capacity: int
    workers: tuple[str, ...] = ()
    at: datetime
