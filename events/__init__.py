"""The message catalogue: every command, event and telemetry message, and their envelope."""

from events.base import (
    REGISTRY,
    Command,
    Event,
    Message,
    Telemetry,
    UnknownMessageType,
    model_for,
    upcast,
    upcaster,
)
from events.commands import StartRunner, StopRunner, UpgradeEntitlement
from events.entitlements import EntitlementDowngraded, EntitlementExpired, EntitlementUpgraded
from events.envelope import Envelope, utcnow
from events.hosts import (
    CircuitClosed,
    CircuitOpened,
    HostLost,
    HostOnline,
    QueuePaused,
    QueueResumed,
)
from events.jobs import (
    FlattenFailed,
    HeartbeatMissed,
    JobAccepted,
    JobDispatched,
    JobQueued,
    JobRejected,
    JobRequested,
    PositionsFlattened,
    RestartsExhausted,
    StopRequested,
    WorkerCrashed,
    WorkerRestarted,
    WorkerRestartScheduled,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerStopped,
)
from events.telemetry import HostHeartbeat, WorkerHeartbeat, WorkerHeartbeats
from events.trading import (
    OrderFilled,
    OrderRejected,
    PositionChanged,
    RiskLimitHit,
    TradeClosed,
)
from events.values import (
    CrashReason,
    Fill,
    JobStatus,
    Position,
    PositionMark,
    RejectReason,
    RiskManagement,
    StrategyConfig,
    Tier,
)

__all__ = [name for name in dir() if not name.startswith("_")]
