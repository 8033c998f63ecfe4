"""Where each kind of message travels: exchanges and routing keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from events.base import Message

COMMANDS_EXCHANGE = "runner.commands"
EVENTS_EXCHANGE = "runner.events"
TELEMETRY_EXCHANGE = "runner.telemetry"
DEAD_LETTER_EXCHANGE = "runner.dlx"
RPC_EXCHANGE = "runner.rpc"  # requests, routed by the name of the queue that answers them
REPLIES_EXCHANGE = "runner.replies"  # replies, routed by the name of the caller's reply queue

_EXCHANGE_BY_KIND = {
    "command": COMMANDS_EXCHANGE,
    "event": EVENTS_EXCHANGE,
    "telemetry": TELEMETRY_EXCHANGE,
}


def exchange_for(message_type: type[Message]) -> str:
    return _EXCHANGE_BY_KIND[message_type.kind]


HOST_FIELD = "host_id"


def names_host(message_type: type[Message]) -> bool:
    """Whether messages of this type may name a worker-host (and are routed by it)."""
    return HOST_FIELD in message_type.model_fields


def host_named(message_type: type[Message], fields: Mapping[str, Any] | Message) -> str | None:
    """The host a message names (its `host_id`), or None; `fields` is the message or its
    payload as sent."""
    if not names_host(message_type):
        return None
    host = fields.get(HOST_FIELD) if isinstance(fields, Mapping) else getattr(fields, HOST_FIELD)
    return host if isinstance(host, str) and host else None


def routing_key_for(message_type: type[Message], host_id: str | None = None) -> str:
    """`<category>.<Type>`, e.g. `job.JobRequested`, `command.StartRunner`; a message that
    names a host is routed by it too, `<category>.<Type>.<host_id>` (`job.JobDispatched.h1`),
    so that a host's inbox binds only what is meant for it."""
    base = f"{message_type.category}.{message_type.type_name()}"
    return f"{base}.{host_id}" if host_id else base


def routing_key(message_type: type[Message], fields: Mapping[str, Any] | Message) -> str:
    """The routing key of one message (the message or its payload): see `routing_key_for`."""
    return routing_key_for(message_type, host_named(message_type, fields))


def binding_for(*message_types: type[Message]) -> list[tuple[str, str]]:
    """(exchange, binding key) pairs a queue binds to receive exactly these types, whichever
    host they name."""
    return [(exchange_for(t), routing_key_for(t) + (".#" if names_host(t) else ""))
            for t in message_types]


def host_binding_for(host_id: str, *message_types: type[Message]) -> list[tuple[str, str]]:
    """(exchange, binding key) pairs a host's inbox binds to receive these types when they name
    `host_id` (a host id is a safe id: no `*` or `#`)."""
    return [(exchange_for(t), routing_key_for(t, host_id)) for t in message_types]


def job_stream(job_id: str) -> str:
    """A job's and its worker's events."""
    return f"job-{job_id}"


def user_stream(user_id: str) -> str:
    """A user's entitlement changes."""
    return f"user-{user_id}"


def host_stream(host_id: str) -> str:
    """A worker-host's membership events."""
    return f"host-{host_id}"


def circuit_key(user_id: str, strategy_id: str) -> str:
    """One user's strategy, as the circuit breaker counts its failures."""
    return f"{user_id}|{strategy_id}"


def circuit_stream(user_id: str, strategy_id: str) -> str:
    return f"circuit-{circuit_key(user_id, strategy_id)}"


QUEUE_STREAM = "queue"  # the queue's pause and resume
