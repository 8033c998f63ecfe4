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


class HostHeartbeat(Telemetry):
    host_id: str
    capacity: int
    workers: tuple[str, ...] = ()
    at: datetime
