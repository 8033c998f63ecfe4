"""The RabbitMQ topology as data: exchanges, each service's queues and bindings, dead letters.

One source for two consumers: services declare what they use from here at start-up
(idempotently), and `rabbitmq/definitions.json` (for a broker container) is generated from it by
`runner topology export`; a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from events import (
    EntitlementDowngraded,
    EntitlementExpired,
    EntitlementUpgraded,
    FlattenFailed,
    HeartbeatMissed,
    HostLost,
    HostOnline,
    JobAccepted,
    JobDispatched,
    JobRejected,
    JobRequested,
    PositionsFlattened,
    RestartsExhausted,
    StartRunner,
    StopRequested,
    StopRunner,
    UpgradeEntitlement,
    WorkerCrashed,
    WorkerRestarted,
    WorkerRestartScheduled,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerStopped,
)
from events.routing import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    TELEMETRY_EXCHANGE,
    binding_for,
)

BROKER_DELIVERY_LIMIT = 20  # broker-side backstop; the bus dead-letters earlier, with a reason


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str = "topic"
    durable: bool = True


@dataclass(frozen=True)
class QueueSpec:
    """A queue, what it is bound to, and how it behaves.

    `quorum` queues hold commands and events (replicated, delivery-limited, dead-lettered);
    `transient` queues hold telemetry and RPC requests that are worthless after a restart.
    """

    name: str
    bindings: tuple[tuple[str, str], ...] = ()
    kind: Literal["quorum", "transient"] = "quorum"
    message_ttl_ms: int | None = None
    max_length: int | None = None
    auto_delete: bool = False

    @property
    def durable(self) -> bool:
        return self.kind == "quorum"

    @property
    def arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.kind == "quorum":
            args |= {
                "x-queue-type": "quorum",
                "x-delivery-limit": BROKER_DELIVERY_LIMIT,
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                "x-dead-letter-routing-key": self.name,
            }
        if self.message_ttl_ms is not None:
            args["x-message-ttl"] = self.message_ttl_ms
        if self.max_length is not None:
            args |= {"x-max-length": self.max_length, "x-overflow": "drop-head"}
        return args


EXCHANGES = (
    ExchangeSpec(COMMANDS_EXCHANGE),
    ExchangeSpec(EVENTS_EXCHANGE),
    ExchangeSpec(TELEMETRY_EXCHANGE, durable=False),
    ExchangeSpec(DEAD_LETTER_EXCHANGE),
)


def _bind(*types: type) -> tuple[tuple[str, str], ...]:
    return tuple(binding_for(*types))


def dead_letter_queue(service: str) -> QueueSpec:
    """Where poison messages of `service`'s queues wait for an operator, with their reason."""
    return QueueSpec(f"dlq.{service}", bindings=((DEAD_LETTER_EXCHANGE, f"{service}.#"),))


def rpc_queue(service: str) -> QueueSpec:
    return QueueSpec(f"{service}.rpc", kind="transient", message_ttl_ms=30_000)


# Job ends that free an entitlement slot or end a placement.
JOB_ENDINGS = (WorkerStopped, RestartsExhausted, JobRejected)

MONITOR_LOG = QueueSpec("monitor.log", bindings=((COMMANDS_EXCHANGE, "#"), (EVENTS_EXCHANGE, "#")))
MONITOR_TELEMETRY = QueueSpec(
    "monitor.telemetry",
    bindings=((TELEMETRY_EXCHANGE, "#"),),
    kind="transient",
    message_ttl_ms=60_000,
    max_length=100_000,
)
ENTITLEMENT_INBOX = QueueSpec(
    "entitlement.inbox",
    bindings=_bind(UpgradeEntitlement, JobRequested, *JOB_ENDINGS),
)
SCHEDULER_INBOX = QueueSpec(
    "scheduler.inbox",
    bindings=_bind(
        StartRunner,
        StopRunner,
        JobAccepted,
        JobRejected,
        WorkerSpawned,
        WorkerRestarted,
        WorkerSpawnFailed,
        WorkerCrashed,
        WorkerStopped,
        HostOnline,
        HostLost,
        EntitlementUpgraded,
        EntitlementExpired,
        EntitlementDowngraded,
    ),
)
HOST_BINDINGS = _bind(
    JobDispatched,
    StopRequested,
    HeartbeatMissed,
    HostLost,
    WorkerCrashed,
    WorkerRestartScheduled,
    RestartsExhausted,
)


def host_inbox(host_id: str) -> QueueSpec:
    """Each worker-host's own inbox (hosts come and go, so it is declared by the host)."""
    return QueueSpec(f"worker-host.{host_id}", bindings=HOST_BINDINGS)


# Events a gateway waits on to answer an HTTP request.
GATEWAY_WAITS = _bind(
    JobAccepted, JobRejected, WorkerStopped, PositionsFlattened, FlattenFailed, EntitlementUpgraded
)

SERVICES = ("gateway", "entitlement", "scheduler", "worker-host", "monitor")

STATIC_QUEUES: tuple[QueueSpec, ...] = (
    MONITOR_LOG,
    MONITOR_TELEMETRY,
    rpc_queue("monitor"),
    ENTITLEMENT_INBOX,
    rpc_queue("entitlement"),
    SCHEDULER_INBOX,
    *(dead_letter_queue(s) for s in SERVICES),
)


def definitions(vhost: str = "/") -> dict[str, Any]:
    """Broker definitions (exchanges, static queues, bindings) for `import_definitions`."""
    return {
        "exchanges": [
            {
                "name": e.name,
                "vhost": vhost,
                "type": e.type,
                "durable": e.durable,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for e in EXCHANGES
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": q.durable,
                "auto_delete": False,
                "arguments": q.arguments,
            }
            for q in STATIC_QUEUES
        ],
        "bindings": [
            {
                "source": exchange,
                "vhost": vhost,
                "destination": q.name,
                "destination_type": "queue",
                "routing_key": key,
                "arguments": {},
            }
            for q in STATIC_QUEUES
            for exchange, key in q.bindings
        ],
    }
