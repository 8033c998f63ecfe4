"""Job and worker lifecycle events (stream `job-<job_id>`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from events.base import Event
from events.values import CrashReason, Fill, Id, Position, RejectReason, StrategyConfig, Tier


class _JobEvent(Event):
    category = "job"
    job_id: Id


class JobRequested(_JobEvent):
    """A user asked for a runner; the entitlement service decides on it."""

    worker_id: Id
    strategy_id: str
    broker_id: str
    credentials_sealed: str
    config: StrategyConfig
    flatten_on_stop: bool = True


class JobAccepted(_JobEvent):
    worker_id: Id
    tier: Tier
    max_workers: int
    in_use: int


class JobRejected(_JobEvent):
    reason: RejectReason
    detail: str
    retry_at: datetime | None = None


class JobQueued(_JobEvent):
    worker_id: Id


class JobDispatched(_JobEvent):
    """The scheduler placed the job on a host; `attempt` 0 is the first start. Carries all the
    host needs to spawn the worker (credentials still sealed)."""

    worker_id: Id
    host_id: Id
    attempt: int = 0
    strategy_id: str
    broker_id: str
    credentials_sealed: str
    config: StrategyConfig
    host_incarnation: str = ""  # the run of the host it is meant for (HostOnline); "": any
    mode: Literal["trade", "flatten"] = "trade"  # flatten: close its positions, then end


class _WorkerEvent(Event):
    category = "worker"
    job_id: Id
    worker_id: Id


class WorkerSpawned(_WorkerEvent):
    """A worker process is running on a host."""

    host_id: Id
    pid: int
    attempt: int = 0


class WorkerSpawnFailed(_WorkerEvent):
    """The worker did not come up. `permanent`: restarting cannot help (e.g. the exchange
    rejected the API key); `error` is then the reason the user reads in status."""

    host_id: Id
    attempt: int = 0
    error: str
    permanent: bool = False


class HeartbeatMissed(_WorkerEvent):
    host_id: Id
    silent_for: float


class WorkerCrashed(_WorkerEvent):
    """The worker's process is gone (or declared gone); `attempt` names which incarnation."""

    host_id: Id | None
    attempt: int = 0
    reason: CrashReason
    exit_code: int | None = None
    detail: str = ""


class WorkerRestartScheduled(_WorkerEvent):
    attempt: int
    delay: float
    due_at: datetime


class WorkerRestarted(_WorkerEvent):
    """A crashed worker runs again under the same `worker_id`."""

    host_id: Id
    pid: int
    attempt: int


class RestartsExhausted(_WorkerEvent):
    attempts: int
    detail: str = ""


class StopRequested(_WorkerEvent):
    host_id: Id | None
    flatten: bool
    reason: str


class PositionsFlattened(_WorkerEvent):
    count: int
    fills: tuple[Fill, ...] = ()
    realized_pnl: float = 0.0


class FlattenFailed(_WorkerEvent):
    error: str
    remaining: tuple[Position, ...] = ()


class WorkerStopped(_WorkerEvent):
    reason: str
    exit_code: int | None = None
