"""Prometheus metrics of every service: one registry per process, and the functions the bus, the
outbox, the monitor and the gateway call as things happen (each a few counter increments).

Every series carries the service's name (`service`), so that several services in one process
keep theirs apart; `RUNNER_METRICS=false` turns the instruments into no-ops. Gauges of a
service's state are computed at scrape time (`watch`), so the hot path does not keep them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()
CONTENT_TYPE = CONTENT_TYPE_LATEST
ENABLED = os.environ.get("RUNNER_METRICS", "true").strip().lower() not in ("0", "false", "no")

# handler and RPC latencies: 0.5 ms .. 10 s
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)

handled = Counter("runner_messages_handled", "Messages a consumer settled as handled",
                  ["service", "queue"], registry=REGISTRY)
failed = Counter("runner_messages_failed",
                 "Deliveries whose handler failed (retried, or dead-lettered in the end)",
                 ["service", "queue"], registry=REGISTRY)
dead_lettered = Counter("runner_messages_dead_lettered",
                        "Messages sent to a dead-letter queue (poison or failing too often)",
                        ["service", "queue"], registry=REGISTRY)
handler_seconds = Histogram("runner_handler_seconds",
                            "Time to handle and commit one batch of deliveries",
                            ["service", "queue"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
batch_size = Histogram("runner_batch_size", "Deliveries handled together in one transaction",
                       ["service", "queue"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
                       registry=REGISTRY)
rpc_seconds = Histogram("runner_rpc_seconds", "Request/reply calls, from send to answer",
                        ["service", "queue", "op", "outcome"], buckets=LATENCY_BUCKETS,
                        registry=REGISTRY)
outbox_lag = Histogram("runner_outbox_lag_seconds",
                       "From a message's emission (occurred_at) to its confirmed publish",
                       ["service"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
outbox_published = Counter("runner_outbox_published", "Messages published from the outbox",
                           ["service"], registry=REGISTRY)
recorded = Counter("runner_log_recorded", "Commands and events recorded in the log, by type",
                   ["type"], registry=REGISTRY)
lifecycle = Counter("runner_workers_lifecycle",
                    "Worker lifecycle events recorded in the log: started (JobAccepted), "
                    "stopped, crashed, restarted, failed (restarts exhausted)",
                    ["event"], registry=REGISTRY)
projection_lag = Histogram("runner_projection_lag_seconds",
                           "From an event's occurrence to its fold into the monitor's "
                           "projections (what status shows)", buckets=LATENCY_BUCKETS,
                           registry=REGISTRY)
stream_dropped = Counter("runner_event_streams_dropped",
                         "Event streams cut for reading too slowly", registry=REGISTRY)

LIFECYCLE = {"JobAccepted": "started", "WorkerStopped": "stopped", "WorkerCrashed": "crashed",
             "WorkerRestarted": "restarted", "RestartsExhausted": "failed"}


def batch_settled(service: str, queue: str, size: int, failures: int, dead: int,
                  seconds: float) -> None:
    """A consumer's batch: `size` deliveries, `failures` of them failed, `dead` dead-lettered."""
    if not ENABLED:
        return
    handled.labels(service, queue).inc(size - failures)
    if failures:
        failed.labels(service, queue).inc(failures)
    if dead:
        dead_lettered.labels(service, queue).inc(dead)
    handler_seconds.labels(service, queue).observe(seconds)
    batch_size.labels(service, queue).observe(size)


def rpc_called(service: str, queue: str, query: str, seconds: float, outcome: str) -> None:
    """A request/reply call's latency, by its query type; `outcome`: ok, error or timeout."""
    if not ENABLED:
        return
    rpc_seconds.labels(service, queue, query, outcome).observe(seconds)


def outbox_confirmed(service: str, occurred: Sequence[datetime]) -> None:
    """A batch of outbox rows confirmed by the broker (their envelopes' occurred_at)."""
    if not ENABLED or not occurred:
        return
    now = datetime.now(UTC)
    outbox_published.labels(service).inc(len(occurred))
    for moment in occurred:
        outbox_lag.labels(service).observe(max((now - moment).total_seconds(), 0.0))


def log_recorded(entries: Iterable[tuple[int, Any]]) -> None:
    """Envelopes the monitor just recorded (and folded), with their positions."""
    if not ENABLED:
        return
    now = datetime.now(UTC)
    for _, envelope in entries:
        recorded.labels(envelope.type).inc()
        if (event := LIFECYCLE.get(envelope.type)) is not None:
            lifecycle.labels(event).inc()
        occurred = envelope.occurred_at
        if occurred.tzinfo is None:
            occurred = occurred.replace(tzinfo=UTC)
        projection_lag.observe(max((now - occurred).total_seconds(), 0.0))


class _Watched(Collector):
    """Gauges read from a service's state at scrape time."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str],
                 read: Callable[[], Iterable[tuple[Sequence[str], float]]]) -> None:
        self.name, self.documentation, self.labels, self.read = name, documentation, labels, read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for values, value in self.read():
            family.add_metric(list(values), value)
        yield family


_watched: dict[str, _Watched] = {}


def watch(name: str, documentation: str, labels: Sequence[str],
          read: Callable[[], Iterable[tuple[Sequence[str], float]]]) -> None:
    """A gauge computed by `read()` at each scrape; registered again under the same name, it
    reads the latest service's state (the tests start several of a kind in one process)."""
    if (old := _watched.pop(name, None)) is not None:
        REGISTRY.unregister(old)
    collector = _watched[name] = _Watched(name, documentation, labels, read)
    REGISTRY.register(collector)


def exposition() -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(REGISTRY)
