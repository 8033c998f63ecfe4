"""The broker definitions file is generated from the topology and must not drift from it."""

from __future__ import annotations

import json
from pathlib import Path

from services.topology import STATIC_QUEUES, definitions

DEFINITIONS = Path(__file__).parents[2] / "rabbitmq" / "definitions.json"


def test_definitions_file_matches_the_topology() -> None:
    assert json.loads(DEFINITIONS.read_text()) == definitions(), (
        "rabbitmq/definitions.json is stale: run `make topology`")


def test_command_and_event_queues_are_quorum_with_dead_letters() -> None:
    for queue in STATIC_QUEUES:
        if queue.kind == "quorum":
            assert queue.arguments["x-queue-type"] == "quorum"
            assert queue.arguments["x-dead-letter-exchange"] == "runner.dlx"
            assert queue.arguments["x-delivery-limit"] > 0


def test_the_inboxes_of_replicated_services_have_one_active_consumer() -> None:
    single = {q.name for q in STATIC_QUEUES if q.arguments.get("x-single-active-consumer")}
    assert single == {"entitlement.inbox", "scheduler.inbox", "monitor.log"}
