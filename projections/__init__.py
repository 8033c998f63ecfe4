"""Pure folds over the event log: `apply(state, envelope) -> state`. No I/O, no clock, no ids.

The same code builds the monitor's live state and every replay, so replaying the log gives
exactly the live state (heartbeat telemetry aside: it never enters the log and is overlaid by the
monitor at query time).
"""

from projections.state import (
    EMPTY,
    ENDED,
    ENDED_KEPT_HOURS,
    EntitlementView,
    PositionView,
    Projections,
    QueueStats,
    TradingStats,
    WorkerView,
    apply,
    counted,
    fold,
    folds,
    forget_ended,
    kept_from,
    queue_stats,
)

__all__ = [
    "EMPTY",
    "ENDED",
    "ENDED_KEPT_HOURS",
    "EntitlementView",
    "PositionView",
    "Projections",
    "QueueStats",
    "TradingStats",
    "WorkerView",
    "apply",
    "counted",
    "fold",
    "folds",
    "forget_ended",
    "kept_from",
    "queue_stats",
]
