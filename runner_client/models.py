"""The gateway's answers as typed models (its JSON keys are the seed's camelCase)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Answer(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True,
                              extra="ignore")


class Worker(_Answer):
    worker_id: str
    job_id: str
    user_id: str
    strategy_id: str
    broker_id: str
    status: str
    pid: int | None = None
    host_id: str | None = None
    started_at: int | None = None  # epoch milliseconds
    restart_count: int = 0
    last_heartbeat: int | None = None
    reason: str | None = None


class Position(_Answer):
    instrument_name: str
    side: str
    amount: float
    entry_price: float
    unrealized_pnl: float = Field(0.0, alias="unrealizedPnL")


class TradingStats(_Answer):
    total_trades: int = 0
    winning_trades: int = 0
    losing_trades: int = 0
    total_pnl: float = Field(0.0, alias="totalPnL")
    win_rate: float = 0.0


class WorkerEntry(_Answer):
    worker: Worker
    positions: list[Position] = []
    stats: TradingStats = TradingStats()


class QueueStats(_Answer):
    queued_jobs: int = 0
    running_workers: int = 0
    total_workers: int = 0
    failed_jobs: int = 0


class StatusPage(_Answer):
    offset: int
    limit: int
    total: int


class Status(_Answer):
    workers: list[WorkerEntry]
    queue_stats: QueueStats
    page: StatusPage | None = None

    def worker(self, worker_id: str) -> WorkerEntry | None:
        return next((e for e in self.workers if e.worker.worker_id == worker_id), None)


class Started(_Answer):
    job_id: str
    worker_id: str
    message: str


class Stopped(_Answer):
    message: str
    flattened_positions: int = 0


class Halted(_Answer):
    """The runners the kill switch stopped with flatten, and those it could not stop cleanly."""

    message: str = ""
    halted: list[str] = []
    failed: dict[str, str] = {}
    flattened_positions: int = 0


class Entitlement(_Answer):
    is_entitled: bool
    tier: str
    max_workers: int
    current_workers: int
    expires_at: str | None = None


class Upgraded(_Answer):
    user_id: str
    tier: str
    max_workers: int
    expires_at: str


class Host(_Answer):
    host_id: str
    hostname: str | None = None
    capacity: int | None = None
    online_at: int | None = None
    last_seen: int | None = None
    lost: bool = False
    isolated: bool = False  # its workers run under uids of their own
    isolation: str = ""


class Event(BaseModel):
    """One event of the stream: its log `position` (resume after it) and its envelope."""

    model_config = ConfigDict(frozen=True)

    position: int
    type: str
    envelope: dict[str, Any]

    @property
    def payload(self) -> dict[str, Any]:
        return self.envelope.get("payload") or {}

    @property
    def user_id(self) -> str | None:
        return self.envelope.get("user_id")

    @property
    def worker_id(self) -> str | None:
        return self.payload.get("worker_id")

    @property
    def occurred_at(self) -> datetime:
        moment = datetime.fromisoformat(self.envelope["occurred_at"])
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
