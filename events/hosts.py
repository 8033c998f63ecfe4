"""Load control and worker-host membership (streams `host-<host_id>`, `queue`, `circuit-…`)."""

from __future__ import annotations

from datetime import datetime

from events.base import Event
from events.values import Id


class _HostEvent(Event):
    category = "host"
    host_id: Id


class HostOnline(_HostEvent):
    """A worker-host runs and takes work. `incarnation` names this run of it: work dispatched
    to an earlier run is refused (empty in logs from before it existed)."""

    capacity: int
    hostname: str
    pid: int
    incarnation: str = ""
    isolated: bool = False  # its workers run under uids of their own
    isolation: str = ""  # how its workers are isolated (docs/SECURITY.md), one line


class HostLost(_HostEvent):
    silent_for: float


class _LoadEvent(Event):
    category = "load"


class QueuePaused(_LoadEvent):
    reason: str
    running: int
    ceiling: int


class QueueResumed(_LoadEvent):
    running: int
    ceiling: int


class CircuitOpened(_LoadEvent):
    strategy_id: str
    failures: int
    retry_at: datetime


class CircuitClosed(_LoadEvent):
    strategy_id: str
