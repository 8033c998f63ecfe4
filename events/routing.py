"""Where each kind of message travels: exchanges and routing keys."""

from __future__ import annotations

from events.base import Message

COMMANDS_EXCHANGE = "runner.commands"
EVENTS_EXCHANGE = "runner.events"
TELEMETRY_EXCHANGE = "runner.telemetry"
DEAD_LETTER_EXCHANGE = "runner.dlx"

_EXCHANGE_BY_KIND = {
    "command": COMMANDS_EXCHANGE,
    "event": EVENTS_EXCHANGE,
    "telemetry": TELEMETRY_EXCHANGE,
}


def exchange_for(message_type: type[Message]) -> str:
    return _EXCHANGE_BY_KIND[message_type.kind]


def routing_key_for(message_type: type[Message]) -> str:
    """`<category>.<Type>`, e.g. `job.JobRequested`, `command.StartRunner`."""
    return f"{message_type.category}.{message_type.type_name()}"


def binding_for(*message_types: type[Message]) -> list[tuple[str, str]]:
    """(exchange, routing key) pairs a queue binds to receive exactly these types."""
    return [(exchange_for(t), routing_key_for(t)) for t in message_types]


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
