"""The RabbitMQ topology as data: exchanges, each service's queues and bindings, dead letters.

The one source for services declaring what they use, `runner bus setup`, and
`rabbitmq/definitions.json` (`runner topology export`); the broker users' least permissions
(`permissions`, `topic_permissions`, `broker_users`) and who may emit what (`EMITTERS`,
`forged`) are derived here too.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
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
    Message,
    PositionsFlattened,
    RestartsExhausted,
    StartRunner,
    StopRequested,
    StopRunner,
    UpgradeEntitlement,
    WorkerCrashed,
    WorkerRestarted,
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
    REPLIES_EXCHANGE,
    RPC_EXCHANGE,
    TELEMETRY_EXCHANGE,
    binding_for,
    host_binding_for,
    host_named,
    names_host,
)
from events.values import ID_PATTERN

BROKER_DELIVERY_LIMIT = 20  # broker-side backstop; the bus dead-letters earlier, with a reason


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str = "topic"
    durable: bool = True


@dataclass(frozen=True)
class QueueSpec:
    """A queue, what it is bound to, and how it behaves: `quorum` for commands and events,
    `classic` durable for dead letters, `transient` for telemetry and RPC requests. A
    `single_active` queue delivers to one consumer at a time, so replicas of a service never
    handle its messages at once."""

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
    ExchangeSpec(RPC_EXCHANGE, type="direct"),
    ExchangeSpec(REPLIES_EXCHANGE, type="direct"),
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
    """Where `service` takes its queries: requests are published to `RPC_EXCHANGE` with the
    queue's name as routing key (no one needs to write to the default exchange)."""
    name = f"{service}.rpc"
    return QueueSpec(name, bindings=((RPC_EXCHANGE, name),), kind="transient",
                     message_ttl_ms=30_000)


def reply_queue(service: str, instance: str) -> QueueSpec:
    """A caller's own queue for the replies to its requests (exclusive to its connection, gone
    with it), bound to `REPLIES_EXCHANGE` under its own name, which the caller sends as
    `reply_to`."""
    name = f"{service}.replies.{instance}"
    return QueueSpec(name, bindings=((REPLIES_EXCHANGE, name),), kind="transient",
                     auto_delete=True)


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
# What a worker-host is sent: only the messages that name it (routed by its id); it needs no
# broadcast.
HOST_EVENTS = (JobDispatched, StopRequested, HeartbeatMissed, HostLost)
HOST_INBOX_PREFIX = "worker-host."


def host_inbox(host_id: str) -> QueueSpec:
    """Each worker-host's own inbox, bound to the messages that name it (hosts come and go, so
    it is declared by the host)."""
    return QueueSpec(f"{HOST_INBOX_PREFIX}{host_id}",
                     bindings=tuple(host_binding_for(host_id, *HOST_EVENTS)))


# Events a gateway waits on to answer an HTTP request.
GATEWAY_WAITS = _bind(WorkerStopped, PositionsFlattened, FlattenFailed, EntitlementUpgraded)

SERVICES = ("gateway", "entitlement", "scheduler", "worker-host", "monitor")
HOST_SERVICE = "worker-host"  # the one service run once per host, each with its own login

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
            "topic_permissions": [
                {"user": u.name, "vhost": vhost, **t.as_dict()} for u in users for t in u.topics
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
# deleted instead of keeping what was last sent to it. A host that comes back declares it
# afresh; nothing it missed is still relevant (its jobs went elsewhere at HostLost).
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



@dataclass(frozen=True)
class Permissions:
    """RabbitMQ permission regexes over exchange and queue names in one vhost."""

    configure: str
    write: str
    read: str

    def as_dict(self) -> dict[str, str]:
        return {"configure": self.configure, "write": self.write, "read": self.read}


@dataclass(frozen=True)
class TopicPermissions:
    """RabbitMQ topic permission regexes over the routing keys of one topic exchange: `write`
    for publishing, `read` for binding a queue to it."""

    exchange: str
    write: str
    read: str

    def as_dict(self) -> dict[str, str]:
        return {"exchange": self.exchange, "write": self.write, "read": self.read}


@dataclass(frozen=True)
class ServiceAccess:
    """What a service does on the broker; its permissions follow from it (`permissions`)."""

    publishes: tuple[str, ...]  # exchanges
    consumes: tuple[str, ...] = ()  # static queue names
    own_queues: tuple[str, ...] = ()  # regexes of queues it declares and consumes itself
    binds: tuple[tuple[str, str], ...] = ()  # (exchange, key) its own queues are bound to


SERVICE_ACCESS: dict[str, ServiceAccess] = {
    "gateway": ServiceAccess(
        publishes=(COMMANDS_EXCHANGE, DEAD_LETTER_EXCHANGE, RPC_EXCHANGE),
        own_queues=(r"gateway\.waits\..+", r"gateway\.replies\..+"),
        binds=(*GATEWAY_WAITS, (REPLIES_EXCHANGE, "gateway.replies.<id>")),
    ),
    "entitlement": ServiceAccess(
        publishes=(EVENTS_EXCHANGE, COMMANDS_EXCHANGE, DEAD_LETTER_EXCHANGE, REPLIES_EXCHANGE),
        consumes=(ENTITLEMENT_INBOX.name, ENTITLEMENT_RPC.name),
    ),
    "scheduler": ServiceAccess(
        publishes=(EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE),
        consumes=(SCHEDULER_INBOX.name,),
    ),
    # and each host its own inbox, bound to what names it (`host_access`)
    "worker-host": ServiceAccess(
        publishes=(EVENTS_EXCHANGE, TELEMETRY_EXCHANGE, DEAD_LETTER_EXCHANGE),
    ),
    "monitor": ServiceAccess(
        publishes=(EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE, REPLIES_EXCHANGE),
        consumes=(MONITOR_LOG.name, MONITOR_TELEMETRY.name, MONITOR_RPC.name),
    ),
}


def host_access(host_id: str) -> ServiceAccess:
    """One worker-host's access: the worker-host's, with its own inbox."""
    inbox = host_inbox(host_id)
    return ServiceAccess(publishes=SERVICE_ACCESS[HOST_SERVICE].publishes,
                         own_queues=(re.escape(inbox.name),), binds=inbox.bindings)


def _names(*names: str) -> list[str]:
    return [re.escape(n) for n in names]


def _any_of(patterns: Sequence[str]) -> str:
    return "^(" + "|".join(patterns) + ")$" if patterns else "^$"


def _access(service: str, host_id: str | None) -> ServiceAccess:
    if service == HOST_SERVICE:
        if host_id is None:
            raise ValueError("a worker-host's login is its own: give its host id")
        return host_access(host_id)
    return SERVICE_ACCESS[service]


def declared_by(service: str) -> tuple[tuple[str, ...], tuple[QueueSpec, ...]]:
    """The exchanges and static queues a service declares itself even with its own login: the
    transient queues it consumes and the transient exchanges they are bound to, which do not
    outlive a broker restart, so their consumer must be able to make them again."""
    consumed = SERVICE_ACCESS[service].consumes if service in SERVICE_ACCESS else ()
    queues = tuple(q for q in STATIC_QUEUES if q.name in consumed and not q.durable)
    transient = {e.name for e in EXCHANGES if not e.durable}
    exchanges = tuple(dict.fromkeys(
        exchange for q in queues for exchange, _ in q.bindings if exchange in transient))
    return exchanges, queues


def permissions(service: str, host_id: str | None = None) -> Permissions:
    """The least a service's login needs (a worker-host's: one host's, `host_id`). It declares
    none of the shared topology (the setup step does: `runner bus setup`), only its own queues
    and the transient ones it consumes (`declared_by`); it may publish only to the exchanges it
    uses, consume only its own queues, and read (bind to) only the exchanges its queues are
    bound to."""
    access = _access(service, host_id)
    exchanges, queues = declared_by(service)
    bound = dict.fromkeys([*(exchange for exchange, _ in access.binds),
                           *(exchange for q in queues for exchange, _ in q.bindings)])
    declared = [*access.own_queues, *_names(*(q.name for q in queues))]
    return Permissions(
        configure=_any_of([*declared, *_names(*exchanges)]),
        write=_any_of([*declared, *_names(*access.publishes)]),
        read=_any_of([*_names(*access.consumes), *access.own_queues, *_names(*bound)]),
    )


def topic_permissions(service: str, host_id: str | None = None) -> tuple[TopicPermissions, ...]:
    """Limits on routing keys: a login may bind its own queues only with the keys they need,
    and a worker-host may publish only keys that name no host or its own (so it cannot put a
    message into another host's inbox)."""
    access = _access(service, host_id)
    topic = {e.name for e in EXCHANGES if e.type == "topic"}
    keys: dict[str, list[str]] = {}
    for exchange, key in access.binds:
        if exchange in topic:
            keys.setdefault(exchange, []).append(re.escape(key))
    if host_id is None:
        return tuple(TopicPermissions(exchange, ".*", _any_of(bound))
                     for exchange, bound in keys.items())
    own_or_none = rf"^[a-z]+\.[A-Za-z]+(\.{re.escape(host_id)})?$"
    return (
        TopicPermissions(EVENTS_EXCHANGE, own_or_none, _any_of(keys.get(EVENTS_EXCHANGE, []))),
        TopicPermissions(TELEMETRY_EXCHANGE, own_or_none, "^$"),
        TopicPermissions(DEAD_LETTER_EXCHANGE, _any_of([re.escape(host_inbox(host_id).name)]),
                         "^$"),
    )


@dataclass(frozen=True)
class BrokerUser:
    name: str
    password_hash: str
    permissions: Permissions
    tags: tuple[str, ...] = ()
    topics: tuple[TopicPermissions, ...] = ()


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password)) with a
    4-byte random salt, so definitions carry no password in clear."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def service_user(service: str, namespace: str | None = None) -> str:
    """A service's login, `runner-<service>`; with a `namespace`, `runner-<service>@<namespace>`
    (broker users are global to a broker: systems sharing one, such as tests, each have
    theirs)."""
    return f"{SERVICE_USER_PREFIX}{service}" + (f"@{namespace}" if namespace else "")


def broker_users(admin: tuple[str, str], passwords: Mapping[str, str],
                 hosts: Mapping[str, str] = MappingProxyType({})) -> list[BrokerUser]:
    """The operators' administrator (management UI, full rights in the vhost), one user per
    service in `passwords` (service name -> password; not the worker-host) and one per
    worker-host in `hosts` (host id -> password)."""
    everything = Permissions(".*", ".*", ".*")
    users = [BrokerUser(admin[0], password_hash(admin[1]), everything, ("administrator",))]
    for service, password in passwords.items():
        users.append(BrokerUser(service_user(service), password_hash(password),
                                permissions(service), topics=topic_permissions(service)))
    for host_id, password in hosts.items():
        users.append(BrokerUser(host_user(host_id), password_hash(password),
                                permissions(HOST_SERVICE, host_id),
                                topics=topic_permissions(HOST_SERVICE, host_id)))
    return users


# ---------------------------------------------------------------- who may emit what

# Which services may publish each message type of the catalogue (`events.REGISTRY`). A
# consumer refuses a message whose broker-verified publisher (the AMQP `user_id`, a service's
# login `runner-<service>`) is not listed for its type (`forged`). A worker's own messages
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


@dataclass(frozen=True)
class Publisher:
    """Who a service's login is: the service, and for a worker-host's own login, which host."""

    service: str
    host_id: str | None = None


def host_user(host_id: str, namespace: str | None = None) -> str:
    """A worker-host's own login, `runner-worker-host.<host_id>` (and `@<namespace>`, as
    `service_user`)."""
    return service_user(f"{HOST_SERVICE}.{host_id}", namespace)


@functools.lru_cache(maxsize=256)  # asked for every message consumed; a system has few logins
def publisher(user_id: str | None) -> Publisher | None:
    """The service (and host) whose login `user_id` is, or None for no user or another login
    (the shared login of a development system, an operator)."""
    if not user_id or not user_id.startswith(SERVICE_USER_PREFIX):
        return None
    name = user_id.removeprefix(SERVICE_USER_PREFIX).partition("@")[0]
    service, dot, host_id = name.partition(".")
    if service not in SERVICES or (dot and (service != HOST_SERVICE
                                            or not re.fullmatch(ID_PATTERN, host_id))):
        return None
    return Publisher(service, host_id or None)


def forged(user_id: str | None, message: Message) -> str | None:
    """Why `message` published by the login `user_id` must be refused, or None when it may be
    handled: a service's login may publish only what `EMITTERS` lists for it, and a host's own
    login only messages that name that host, where its type names one; any other login (or
    none) is not checked, as per-service logins are what make it mean anything."""
    who = publisher(user_id)
    if who is None:
        return None
    name = message.type_name()
    if who.service not in EMITTERS.get(name, frozenset()):
        return f"published by {user_id}, which may not emit {name}"
    if who.host_id is not None and names_host(type(message)):
        named = host_named(type(message), message)
        if named != who.host_id:
            return f"published by {user_id}, which may not emit a {name} of " + (
                f"host {named}" if named else "no host")
    return None


def permission_table() -> str:
    """The bus's permission table for docs/SECURITY.md, in Markdown: each service's login (one
    per worker-host), what it may publish to, read and declare, the keys it may bind its own
    queues with, and the message types it may emit."""
    rows = ["| login | publishes to | consumes | declares its own | binds it with | may emit |",
            "| --- | --- | --- | --- | --- | --- |"]
    for service in SERVICES:
        if service == HOST_SERVICE:
            user, access = host_user("<host_id>"), host_access("<host_id>")
            own = [host_inbox("<host_id>").name]
        else:
            user, access = service_user(service), SERVICE_ACCESS[service]
            own = list(access.own_queues)
        emits = sorted(t for t, services in EMITTERS.items() if service in services)
        rows.append(" | ".join((
            f"| `{user}`",
            ", ".join(f"`{e}`" for e in access.publishes),
            ", ".join(f"`{q}`" for q in access.consumes) or "—",
            ", ".join(f"`{q}`" for q in own) or "—",
            ", ".join(f"`{key}`" for _, key in access.binds) or "—",
            ", ".join(emits) + " |",
        )))
    return "\n".join(rows)
