"""The broker definitions file is generated from the topology and must not drift from it; who
receives what."""

from __future__ import annotations

import json
import re
from pathlib import Path

from events import (
    REGISTRY,
    HostLost,
    JobDispatched,
    Message,
    RestartsExhausted,
    StopRequested,
    StrategyConfig,
    WorkerSpawned,
)
from events.routing import exchange_for, names_host, routing_key, routing_key_for
from services.memory_bus import topic_matches
from services.topology import (
    EMITTERS,
    STATIC_QUEUES,
    definitions,
    host_inbox,
    topic_permissions,
)

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


def receivers(message: Message) -> set[str]:
    """The queues (static ones and the inboxes of hosts h1 and h2) a message reaches."""
    model = type(message)
    key = routing_key(model, message.model_dump(mode="json"))
    queues = (*STATIC_QUEUES, host_inbox("h1"), host_inbox("h2"))
    return {q.name for q in queues for exchange, binding in q.bindings
            if exchange == exchange_for(model) and topic_matches(binding, key)}


CONFIG = StrategyConfig(name="s", type="s")


def test_a_dispatch_reaches_its_own_host_only() -> None:
    dispatched = JobDispatched(job_id="j", worker_id="w", host_id="h1", strategy_id="s",
                               broker_id="paper", credentials_sealed="x", config=CONFIG)
    assert routing_key(JobDispatched, dispatched.model_dump()) == "job.JobDispatched.h1"
    assert receivers(dispatched) == {"monitor.log", "worker-host.h1"}


def test_what_names_a_host_goes_to_that_host_and_to_every_other_consumer_of_it() -> None:
    assert receivers(HostLost(host_id="h2", silent_for=9.0)) == {
        "monitor.log", "scheduler.inbox", "worker-host.h2"}
    assert receivers(StopRequested(job_id="j", worker_id="w", host_id="h1", flatten=True,
                                   reason="r")) == {"monitor.log", "worker-host.h1"}
    assert receivers(WorkerSpawned(job_id="j", worker_id="w", host_id="h1", pid=1)) == {
        "monitor.log", "scheduler.inbox"}


def test_a_host_is_sent_nothing_that_does_not_name_it() -> None:
    assert receivers(StopRequested(job_id="j", worker_id="w", host_id=None, flatten=True,
                                   reason="r")) == {"monitor.log"}
    assert receivers(RestartsExhausted(job_id="j", worker_id="w", attempts=3)) == {
        "monitor.log", "entitlement.inbox"}
    assert all(key.endswith(".h1") for _, key in host_inbox("h1").bindings)


def test_a_hosts_topic_permissions_let_through_every_key_it_publishes_or_binds() -> None:
    """RabbitMQ matches these regexes against whole routing keys: a host may publish each type
    it emits under its own id (or none) but not another host's, and bind its inbox's keys."""
    topics = {t.exchange: t for t in topic_permissions("worker-host", "h-1.a")}
    for name, services in EMITTERS.items():
        if "worker-host" not in services:
            continue
        model = REGISTRY[name]
        write = topics[exchange_for(model)].write
        key = routing_key_for(model, "h-1.a" if names_host(model) else None)
        assert re.search(write, key), key
        assert not re.search(write, routing_key_for(model, "h-2")), name
    read = topics["runner.events"].read
    assert all(re.search(read, key) for _, key in host_inbox("h-1.a").bindings)
    assert not re.search(read, "#") and not re.search(read, "job.JobDispatched.h-2")
