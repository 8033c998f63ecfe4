"""The bus as an AsyncAPI 3 document, generated from the message catalogue (`events`) and the
topology (`services.topology`): `runner topology asyncapi` writes it (docs/asyncapi.json, kept
in step by a test).

Channels are the exchanges (what a publisher sends to, by routing key) and the queues (what a
consumer reads, with the messages its bindings let through). A command or event travels as its
envelope (JSON, the message's payload inside); telemetry travels bare, its type in the AMQP
`type` property; the RPC queues take JSON requests named by their `type` on `runner.rpc` and
answer on `runner.replies`.
"""

from __future__ import annotations

import inspect
from typing import Any

from pydantic.json_schema import models_json_schema

from events import REGISTRY, Envelope, Message
from events.queries import QUERIES
from events.routing import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    REPLIES_EXCHANGE,
    RPC_EXCHANGE,
    exchange_for,
    routing_key_for,
)
from services.topology import (
    EXCHANGES,
    GATEWAY_WAITS,
    RPC_QUERIES,
    STATIC_QUEUES,
    QueueSpec,
    host_inbox,
)

AMQP = "0.3.0"  # the AMQP bindings' version
REF = "#/components/schemas/{model}"
HOST_PARAMETER = "{hostId}"
def _topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is one word, `#` zero or more."""
    def match(words: list[str], parts: list[str]) -> bool:
        if not words:
            return not parts
        if words[0] == "#":
            return any(match(words[1:], parts[i:]) for i in range(len(parts) + 1))
        return bool(parts) and words[0] in ("*", parts[0]) and match(words[1:], parts[1:])

    return match(pattern.split("."), key.split("."))


def _summary(model: type[Message]) -> str:
    doc = inspect.getdoc(model) or ""
    inherited = inspect.getdoc(model.__mro__[1]) if len(model.__mro__) > 1 else None
    return "" if not doc or doc == inherited else doc.split("\n\n")[0].replace("\n", " ")


def _messages_through(bindings: tuple[tuple[str, str], ...],
                      models: list[type[Message]]) -> list[str]:
    """The types a queue bound so receives, for a message naming any host or none."""
    return [m.type_name() for m in models
            if any(exchange == exchange_for(m) and _topic_matches(key, routing_key_for(m, host))
                   for exchange, key in bindings for host in (None, HOST_PARAMETER))]


def _queue_channel(spec: QueueSpec, address: str, models: list[type[Message]],
                   description: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    names = _messages_through(spec.bindings, models)
    channel: dict[str, Any] = {
        "address": address,
        "description": description,
        "messages": {n: {"$ref": f"#/components/messages/{n}"} for n in names},
        "bindings": {"amqp": {"is": "queue", "bindingVersion": AMQP, "queue": {
            "name": address, "durable": spec.durable, "exclusive": False,
            "autoDelete": spec.auto_delete, "vhost": "/"}}},
    }
    if parameters:
        channel["parameters"] = parameters
    return channel


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of the bus."""
    models = sorted(REGISTRY.values(), key=lambda m: m.type_name())
    queries = sorted(QUERIES.values(), key=lambda q: q.type_name())
    _, top = models_json_schema([(m, "validation") for m in (*models, *queries, Envelope)],
                                ref_template=REF)
    schemas: dict[str, Any] = top["$defs"]
    messages: dict[str, Any] = {}
    for model in models:
        name = model.type_name()
        if model.kind == "telemetry":
            payload: dict[str, Any] = {"$ref": REF.format(model=name)}
        else:
            payload = {"allOf": [{"$ref": REF.format(model="Envelope")}, {
                "type": "object",
                "properties": {"type": {"const": name}, "version": {"const": model.version},
                               "payload": {"$ref": REF.format(model=name)}}}]}
        messages[name] = {
            "name": name,
            "title": f"{name} ({model.kind}, v{model.version})",
            "summary": _summary(model) or f"The {model.kind} {name}.",
            "contentType": "application/json",
            "payload": payload,
            "bindings": {"amqp": {"messageType": name, "bindingVersion": AMQP}},
        }

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for exchange in EXCHANGES:
        if exchange.name in (RPC_EXCHANGE, REPLIES_EXCHANGE):
            continue  # the RPC channels below
        routed = ([m.type_name() for m in models if exchange_for(m) == exchange.name]
                  if exchange.name != DEAD_LETTER_EXCHANGE else
                  [m.type_name() for m in models
                   if exchange_for(m) in (COMMANDS_EXCHANGE, EVENTS_EXCHANGE)])
        channel_id = f"exchange.{exchange.name}"
        channels[channel_id] = {
            "address": exchange.name,
            "description": ("Poison messages, routed by the queue they came from "
                            "(headers x-poison-reason, x-poison-service)"
                            if exchange.name == DEAD_LETTER_EXCHANGE else
                            f"The {exchange.type} exchange {exchange.name}: routing key "
                            "`<category>.<Type>`, then `.<host_id>` for a message naming a "
                            "host"),
            "messages": {n: {"$ref": f"#/components/messages/{n}"} for n in routed},
            "bindings": {"amqp": {"is": "routingKey", "bindingVersion": AMQP, "exchange": {
                "name": exchange.name, "type": exchange.type, "durable": exchange.durable,
                "autoDelete": False, "vhost": "/"}}},
        }
        operations[f"publish.{exchange.name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"Publish to {exchange.name} (persistent, with publisher confirms)"
                       if exchange.durable else f"Publish telemetry to {exchange.name}",
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{n}"} for n in routed],
            "bindings": {"amqp": {"deliveryMode": 2 if exchange.durable else 1,
                                  "mandatory": exchange.durable, "bindingVersion": AMQP}},
        }

    queues = [(spec, spec.name, f"Queue {spec.name} ({spec.kind})", None)
              for spec in STATIC_QUEUES if not spec.name.endswith(".rpc")]
    inbox = host_inbox(HOST_PARAMETER)
    queues.append((inbox, inbox.name, "Each worker-host's own inbox: only the messages that "
                   "name it, routed by its id",
                   {"hostId": {"description": "the host's id (RUNNER_HOST_ID)"}}))
    queues.append((QueueSpec("gateway.waits.{id}", bindings=GATEWAY_WAITS, kind="transient",
                             auto_delete=True),
                   "gateway.waits.{id}", "A gateway's own queue of the events that answer its "
                   "requests", {"id": {"description": "random, per gateway process"}}))
    for spec, address, description, parameters in queues:
        channel_id = "queue." + address.replace("{", "").replace("}", "")
        channels[channel_id] = _queue_channel(spec, address, models, description, parameters)
        operations[f"consume.{channel_id.removeprefix('queue.')}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"Consume {address} (acked after the handler's commit)"
                       if spec.durable else f"Consume {address}",
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{n}"}
                         for n in channels[channel_id]["messages"]],
        }

    for spec in STATIC_QUEUES:
        served = RPC_QUERIES.get(spec.name)
        if not served:
            continue
        channel_id = f"rpc.{spec.name}"
        channels[channel_id] = {
            "address": spec.name,
            "description": f"Request/reply: requests are published to the direct exchange "
                           f"{RPC_EXCHANGE} with this queue's name as routing key, replies to "
                           f"the direct exchange {REPLIES_EXCHANGE} with the caller's own reply "
                           "queue (`<service>.replies.<id>`, its `reply_to`) as routing key; "
                           "the AMQP `type` property names the query, a refusal comes back with "
                           "the header `refused` (invalid, not_found, conflict, internal)",
            "messages": {q.type_name(): {"$ref": f"#/components/messages/{q.type_name()}"}
                         for q in served},
            "bindings": {"amqp": {"is": "queue", "bindingVersion": AMQP, "queue": {
                "name": spec.name, "durable": False, "exclusive": False, "autoDelete": False,
                "vhost": "/"}}},
        }
        operations[f"request.{spec.name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"Call {spec.name} with one of its queries",
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{q.type_name()}"}
                         for q in served],
        }
        for query in served:
            messages[query.type_name()] = {
                "name": query.type_name(),
                "summary": (query.__doc__ or "").strip().splitlines()[0],
                "contentType": "application/json",
                "payload": {"$ref": f"#/components/schemas/{query.type_name()}"},
            }

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Runner Orchestrator bus",
            "version": "0.1.0",
            "description": "The RabbitMQ topology and message catalogue of Runner Orchestrator: "
                           "commands and events as versioned envelopes on topic exchanges, "
                           "telemetry on a transient exchange, dead letters, and the RPC "
                           "queues. Generated by `runner topology asyncapi`.",
        },
        "defaultContentType": "application/json",
        "servers": {"rabbitmq": {"host": "localhost:5672", "protocol": "amqp",
                                 "protocolVersion": "0.9.1",
                                 "description": "RUNNER_AMQP_URL; each deployment its vhost"}},
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }
