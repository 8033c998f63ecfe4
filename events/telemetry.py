"""Heartbeats: transient telemetry on its own exchange, never written to the log."""

from __future__ import annotations

from datetime import datetime

from events.base import Telemetry
from events.values import Id, PositionMark


class WorkerHeartbeat(Telemetry):
    job_id: Id
    worker_id: Id
    host_id: Id
    pid: int
    at: datetime
    positions: tuple[PositionMark, ...] = ()


class WorkerHeartbeats(Telemetry):
    """Several workers' heartbeats relayed by their host in one message, so that many workers'
    beats are a few messages a second rather than one each."""

    host_id: Id
    beats: tuple[WorkerHeartbeat, ...]


class HostHeartbeat(Telemetry):
    host_id: Id
    capacity: int
    workers: tuple[Id, ...] = ()
    at: datetime
