"""INTERFACE SKELETON — to be implemented (see projections/__init__.py)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import immutables

from events import Envelope, JobStatus


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    job_id: str
    user_id: str
    strategy_id: str
    broker_id: str
    status: JobStatus
    created_at: datetime
    flatten_on_stop: bool = True
    pid: int | None = None
    host_id: str | None = None
    started_at: datetime | None = None
    restart_count: int = 0
    stop_requested: bool = False
    ended_at: datetime | None = None
    reason: str | None = None  # last crash / stop / failure reason, human-readable


@dataclass(frozen=True, slots=True)
class PositionView:
    instrument: str
    side: str
    amount: float
    entry_price: float


@dataclass(frozen=True, slots=True)
class TradingStats:
    total_trades: int = 0
    winning_trades: int = 0
    losing_trades: int = 0
    total_pnl: float = 0.0

    @property
    def win_rate(self) -> float:
        """Percent of closed trades that made money (0 when none closed)."""
        return 100.0 * self.winning_trades / self.total_trades if self.total_trades else 0.0


@dataclass(frozen=True, slots=True)
class EntitlementView:
    user_id: str
    tier: str
    max_workers: int
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class QueueStats:
    queued_jobs: int = 0
    running_workers: int = 0
    total_workers: int = 0
    failed_jobs: int = 0


@dataclass(frozen=True, slots=True)
class Projections:
    workers: immutables.Map[str, WorkerView] = field(default_factory=immutables.Map)
    positions: immutables.Map[str, immutables.Map[str, PositionView]] = field(default_factory=immutables.Map)
    stats: immutables.Map[str, TradingStats] = field(default_factory=immutables.Map)
    entitlements: immutables.Map[str, EntitlementView] = field(default_factory=immutables.Map)
    rejected_jobs: int = 0
    events_applied: int = 0


EMPTY = Projections()


def apply(state: Projections, envelope: Envelope) -> Projections:
    raise NotImplementedError


def fold(envelopes: Iterable[Envelope], state: Projections = EMPTY) -> Projections:
    for envelope in envelopes:
        state = apply(state, envelope)
    return state


def queue_stats(state: Projections, user_id: str | None = None) -> QueueStats:
    raise NotImplementedError
