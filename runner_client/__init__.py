"""A typed Python client of Runner Orchestrator's gateway: start, stop, status, users,
entitlements, and `async for event in client.events(...)` with resume."""

from runner_client.client import RunnerClient, RunnerError
from runner_client.models import (
    Entitlement,
    Event,
    Host,
    Position,
    QueueStats,
    Started,
    Status,
    Stopped,
    TradingStats,
    Upgraded,
    Worker,
    WorkerEntry,
)

__all__ = [
    "Entitlement",
    "Event",
    "Halted",
    "Host",
    "Position",
    "QueueStats",
    "RunnerClient",
    "RunnerError",
    "Started",
    "Status",
    "Stopped",
    "TradingStats",
    "Upgraded",
    "Worker",
    "WorkerEntry",
]
