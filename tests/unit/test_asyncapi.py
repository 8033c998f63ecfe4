"""The AsyncAPI document of the bus (docs/asyncapi.json): generated from the catalogue and the
topology, committed as generated, valid AsyncAPI 3.0.0 (the specification's own JSON schema,
tests/schemas/asyncapi-3.0.0.json from the npm package @asyncapi/specs 6.11.1, Apache-2.0), with
every catalogue message and every reference resolving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

from events import REGISTRY
from services.asyncapi import _topic_matches, document

ROOT = Path(__file__).parents[2]
COMMITTED = ROOT / "docs" / "asyncapi.json"
SCHEMA = Path(__file__).parents[1] / "schemas" / "asyncapi-3.0.0.json"


def test_the_committed_document_is_the_generated_one() -> None:
    assert json.loads(COMMITTED.read_text()) == json.loads(json.dumps(document())), (
        "docs/asyncapi.json is stale: run `runner topology asyncapi`")


def test_it_is_valid_asyncapi_3() -> None:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    errors = [f"{list(e.path)}: {e.message[:200]}" for e in validator.iter_errors(document())]
    assert not errors, errors[:5]


def test_every_catalogue_message_is_there_and_travels_somewhere() -> None:
    doc = document()
    assert set(REGISTRY) <= set(doc["components"]["messages"])
    carried = {name for channel in doc["channels"].values() for name in channel["messages"]}
    assert set(REGISTRY) <= carried


def test_every_reference_resolves() -> None:
    doc = document()

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return ([node["$ref"]] if "$ref" in node else []) + [
                r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in set(refs(doc)):
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]  # KeyError: a dangling reference


def test_queues_carry_what_their_bindings_let_through() -> None:
    channels = document()["channels"]
    scheduler = set(channels["queue.scheduler.inbox"]["messages"])
    assert {"JobRequested", "WorkerCrashed", "StopRunner"} <= scheduler
    assert "OrderFilled" not in scheduler
    assert set(channels["queue.monitor.log"]["messages"]) >= {"StartRunner", "OrderFilled"}
    assert "WorkerHeartbeats" in channels["queue.monitor.telemetry"]["messages"]


def test_topic_matching() -> None:
    assert _topic_matches("#", "job.JobRequested")
    assert _topic_matches("job.*", "job.JobRequested")
    assert _topic_matches("job.#", "job")
    assert not _topic_matches("job.*", "job.a.b")
    assert not _topic_matches("command.StartRunner", "command.StopRunner")
