"""The RabbitMQ topology as data: exchanges, each service's queues and bindings, dead letters.

One source for two consumers: services declare what they use from here at start-up
(idempotently), and `rabbitmq/definitions.json` (for a broker container) is generated from it by
`runner topology export`; a test keeps the two equal. A deployment's broker users and their
least permissions are derived here too (`permissions`, `broker_users`), rendered with the
passwords of that deployment by `rabbitmq/render_definitions.py`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from events import (
    CircuitClosed,
    CircuitOpened,
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
from events.queries import (
    CheckEntitlement,
    DecideStart,
    HeadQuery,
    HostsQuery,
    LogQuery,
    Query,
    StatusQuery,
    WorkerQuery,
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
    `classic` durable queues hold dead letters; `transient` queues hold telemetry and RPC
    requests that are worthless after a restart. A `single_active` queue delivers to one
    consumer at a time (the others wait, in order, to take over): the inbox of a service that
    runs as replicas, so that two of them never handle its messages at once.
    """

    name: str
    bindings: tuple[tuple[str, str], ...] = ()
    kind: Literal["quorum", "classic", "transient"] = "quorum"
    message_ttl_ms: int | None = None
    max_length: int | None = None
    auto_delete: bool = False
    single_active: bool = False

    @property
    def durable(self) -> bool:
        return self.kind != "transient"

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
        if self.single_active:
            args["x-single-active-consumer"] = True
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
    # A classic durable queue: no delivery limit and no dead-lettering of its own, so an
    # operator may look at a dead letter (get + requeue) any number of times without losing it.
    return QueueSpec(f"dlq.{service}", bindings=((DEAD_LETTER_EXCHANGE, f"{service}.#"),),
                     kind="classic")


def rpc_queue(service: str) -> QueueSpec:
    return QueueSpec(f"{service}.rpc", kind="transient", message_ttl_ms=30_000)


# Job ends that free an entitlement slot.
JOB_ENDINGS = (WorkerStopped, RestartsExhausted)

MONITOR_LOG = QueueSpec(
    "monitor.log",
    bindings=((COMMANDS_EXCHANGE, "#"), (EVENTS_EXCHANGE, "#")),
    single_active=True,
)
MONITOR_TELEMETRY = QueueSpec(
    "monitor.telemetry",
    bindings=((TELEMETRY_EXCHANGE, "#"),),
    kind="transient",
    message_ttl_ms=60_000,
    max_length=100_000,
)
ENTITLEMENT_INBOX = QueueSpec(
    "entitlement.inbox",
    bindings=_bind(StartRunner, UpgradeEntitlement, CircuitOpened, CircuitClosed, *JOB_ENDINGS),
    single_active=True,
)
SCHEDULER_INBOX = QueueSpec(
    "scheduler.inbox",
    bindings=_bind(
        JobRequested,
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
    single_active=True,
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
GATEWAY_WAITS = _bind(WorkerStopped, PositionsFlattened, FlattenFailed, EntitlementUpgraded)

SERVICES = ("gateway", "entitlement", "scheduler", "worker-host", "monitor")

ENTITLEMENT_RPC = rpc_queue("entitlement")
MONITOR_RPC = rpc_queue("monitor")
# The queries each RPC queue answers (its service serves exactly these).
RPC_QUERIES: dict[str, tuple[type[Query], ...]] = {
    ENTITLEMENT_RPC.name: (DecideStart, CheckEntitlement),
    MONITOR_RPC.name: (StatusQuery, WorkerQuery, LogQuery, HeadQuery, HostsQuery),
}

STATIC_QUEUES: tuple[QueueSpec, ...] = (
    MONITOR_LOG,
    MONITOR_TELEMETRY,
    MONITOR_RPC,
    ENTITLEMENT_INBOX,
    ENTITLEMENT_RPC,
    SCHEDULER_INBOX,
    *(dead_letter_queue(s) for s in SERVICES),
)


def definitions(vhost: str = "/", users: Sequence[BrokerUser] = ()) -> dict[str, Any]:
    """Broker definitions (exchanges, static queues, bindings, policies) for
    `import_definitions` or boot-time `load_definitions`; with `users`, also the vhost, the
    users (password hashes) and their permissions (see `broker_users`)."""
    access: dict[str, Any] = {}
    if users:
        access = {
            "vhosts": [{"name": vhost}],
            "users": [
                {
                    "name": u.name,
                    "password_hash": u.password_hash,
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": list(u.tags),
                    "limits": {},
                }
                for u in users
            ],
            "permissions": [
                {"user": u.name, "vhost": vhost, **u.permissions.as_dict()} for u in users
            ],
        }
    return access | {
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
        "policies": [{"vhost": vhost, **policy} for policy in POLICIES],
    }


# ---------------------------------------------------------------- policies

# Queue TTL for worker-host inboxes: the inbox of a host retired (or renamed) for a week is
# deleted instead of collecting every host's broadcast events forever. A host that comes back
# declares it afresh; nothing it missed is still relevant (its jobs went elsewhere at HostLost).
HOST_INBOX_EXPIRES_MS = 7 * 24 * 3600 * 1000
POLICIES: tuple[dict[str, Any], ...] = (
    {
        "name": "worker-host-inbox-expiry",
        "pattern": r"^worker-host\.",
        "apply-to": "queues",
        "definition": {"expires": HOST_INBOX_EXPIRES_MS},
        "priority": 0,
    },
)

# ---------------------------------------------------------------- broker users (deployments)

DEFAULT_EXCHANGE = "amq.default"  # the nameless exchange, in permissions: RPC requests, replies


@dataclass(frozen=True)
class Permissions:
    """RabbitMQ permission regexes over exchange and queue names in one vhost."""

    configure: str
    write: str
    read: str

    def as_dict(self) -> dict[str, str]:
        return {"configure": self.configure, "write": self.write, "read": self.read}


@dataclass(frozen=True)
class ServiceAccess:
    """What a service does on the broker; its permissions follow from it (`permissions`)."""

    publishes: tuple[str, ...]  # exchanges
    consumes: tuple[str, ...] = ()  # static queue names
    own_queues: tuple[str, ...] = ()  # regexes of queues it declares and consumes itself


SERVICE_ACCESS: dict[str, ServiceAccess] = {
    "gateway": ServiceAccess(
        publishes=(COMMANDS_EXCHANGE, DEAD_LETTER_EXCHANGE, DEFAULT_EXCHANGE),
        own_queues=(r"gateway\.waits\..+",),
    ),
    "entitlement": ServiceAccess(
        publishes=(EVENTS_EXCHANGE, COMMANDS_EXCHANGE, DEAD_LETTER_EXCHANGE, DEFAULT_EXCHANGE),
        consumes=(ENTITLEMENT_INBOX.name, ENTITLEMENT_RPC.name),
    ),
    "scheduler": ServiceAccess(
        publishes=(EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE),
        consumes=(SCHEDULER_INBOX.name,),
    ),
    "worker-host": ServiceAccess(
        publishes=(EVENTS_EXCHANGE, TELEMETRY_EXCHANGE, DEAD_LETTER_EXCHANGE),
        own_queues=(r"worker-host\..+",),
    ),
    "monitor": ServiceAccess(
        publishes=(EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE, DEFAULT_EXCHANGE),
        consumes=(MONITOR_LOG.name, MONITOR_TELEMETRY.name, MONITOR_RPC.name),
    ),
}


def _names(*names: str) -> list[str]:
    return [re.escape(n) for n in names]


def _any_of(patterns: Sequence[str]) -> str:
    return "^(" + "|".join(patterns) + ")$"


def permissions(service: str) -> Permissions:
    """The least a service's user needs. Every service declares all exchanges and the whole
    static topology at start (configure; write on the queues and read on the exchanges, to bind
    them), so no message waits for its consumer's first start; beyond that each may publish
    only to the exchanges it uses and consume only its own queues."""
    access = SERVICE_ACCESS[service]
    exchanges = _names(*(e.name for e in EXCHANGES))
    queues = _names(*(q.name for q in STATIC_QUEUES))
    return Permissions(
        configure=_any_of([*exchanges, *queues, *access.own_queues]),
        write=_any_of([*queues, *access.own_queues, *_names(*access.publishes)]),
        read=_any_of([*exchanges, *_names(*access.consumes), *access.own_queues]),
    )


@dataclass(frozen=True)
class BrokerUser:
    name: str
    password_hash: str
    permissions: Permissions
    tags: tuple[str, ...] = ()


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password)) with a
    4-byte random salt, so definitions carry no password in clear."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def service_user(service: str) -> str:
    return f"runner-{service}"


def broker_users(admin: tuple[str, str], passwords: dict[str, str]) -> list[BrokerUser]:
    """The operators' administrator (management UI, full rights in the vhost) and one user per
    service in `passwords` (service name -> password)."""
    everything = Permissions(".*", ".*", ".*")
    users = [BrokerUser(admin[0], password_hash(admin[1]), everything, ("administrator",))]
    for service, password in passwords.items():
        users.append(
            BrokerUser(service_user(service), password_hash(password), permissions(service))
        )
    return users


# ---------------------------------------------------------------- who may emit what

# Which services may publish each message type of the catalogue (`events.REGISTRY`). A
# consumer refuses a message whose broker-verified publisher (the AMQP `user_id`, a service's
# login `runner-<service>`) is not listed for its type (`may_emit`). A worker's own messages
# (trading events, flatten results) travel on its host's connection, so they are the
# worker-host's. The operators' `runner publish` uses an operator login, which is not checked.
EMITTERS: dict[str, frozenset[str]] = {
    name: frozenset(services)
    for name, services in {
        # commands
        "StartRunner": ("gateway",),
        "StopRunner": ("gateway", "entitlement"),  # entitlement: a downgrade stops runners
        "UpgradeEntitlement": ("gateway",),
        # entitlements
        "EntitlementUpgraded": ("entitlement",),
        "EntitlementExpired": ("entitlement",),
        "EntitlementDowngraded": ("entitlement",),
        # hosts and load
        "HostOnline": ("worker-host",),
        "HostLost": ("worker-host", "monitor"),  # a host shutting down; the monitor's verdict
        "QueuePaused": ("scheduler",),
        "QueueResumed": ("scheduler",),
        "CircuitOpened": ("scheduler",),
        "CircuitClosed": ("scheduler",),
        # jobs
        "JobRequested": ("entitlement",),
        "JobAccepted": ("entitlement",),
        "JobRejected": ("entitlement",),
        "JobQueued": ("scheduler",),
        "JobDispatched": ("scheduler",),
        "StopRequested": ("scheduler",),
        "WorkerRestartScheduled": ("scheduler",),
        "RestartsExhausted": ("scheduler",),
        "HeartbeatMissed": ("monitor",),
        "WorkerSpawned": ("worker-host",),
        "WorkerRestarted": ("worker-host",),
        "WorkerSpawnFailed": ("worker-host",),
        "PositionsFlattened": ("worker-host",),
        # the scheduler ends a job itself when its host is lost or it never ran
        "WorkerCrashed": ("worker-host", "scheduler"),
        "WorkerStopped": ("worker-host", "scheduler"),
        "FlattenFailed": ("worker-host", "scheduler"),
        # a worker's trading events and telemetry, relayed by its host
        "OrderFilled": ("worker-host",),
        "PositionChanged": ("worker-host",),
        "TradeClosed": ("worker-host",),
        "OrderRejected": ("worker-host",),
        "RiskLimitHit": ("worker-host",),
        "WorkerHeartbeat": ("worker-host",),
        "WorkerHeartbeats": ("worker-host",),
        "HostHeartbeat": ("worker-host",),
    }.items()
}

SERVICE_USER_PREFIX = "runner-"


def publisher_service(user_id: str | None) -> str | None:
    """The service whose login `user_id` is, or None for no user or another login (the shared
    login of a development system, an operator)."""
    if not user_id or not user_id.startswith(SERVICE_USER_PREFIX):
        return None
    service = user_id.removeprefix(SERVICE_USER_PREFIX)
    return service if service in SERVICES else None


def forged(user_id: str | None, message_type: str) -> str | None:
    """Why a message of `message_type` published by the login `user_id` must be refused, or
    None when it may be handled: a service's login may publish only what `EMITTERS` lists for
    it; any other login (or none) is not checked, as per-service logins are what make it mean
    anything."""
    service = publisher_service(user_id)
    if service is None or service in EMITTERS.get(message_type, frozenset()):
        return None
    return f"published by {user_id}, which may not emit {message_type}"


def permission_table() -> str:
    """The bus's permission table for docs/SECURITY.md, in Markdown: each service's login, what
    it may publish to, read and declare, and the message types it may emit."""
    rows = ["| login | publishes to | consumes | declares its own | may emit |",
            "| --- | --- | --- | --- | --- |"]
    for service in SERVICES:
        access = SERVICE_ACCESS[service]
        emits = sorted(t for t, services in EMITTERS.items() if service in services)
        rows.append(" | ".join((
            f"| `{service_user(service)}`",
            ", ".join(f"`{e}`" for e in access.publishes),
            ", ".join(f"`{q}`" for q in access.consumes) or "—",
            ", ".join(f"`{q}`" for q in access.own_queues) or "—",
            ", ".join(emits) + " |",
        )))
    return "\n".join(rows)
