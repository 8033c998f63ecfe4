"""Who is alive: known hosts (a fold over the log) and the heartbeat overlay (telemetry).

The watchdog decisions (`silent_workers`, `silent_hosts`) are pure functions of that overlay,
the projections and `now`. A worker or host is reported silent once per silence episode (until a
new sign of life), and a report already in the log counts as made, so a restarted monitor does
not report the same episode again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

import immutables

from events import Envelope, HostHeartbeat, JobStatus, PositionMark, WorkerHeartbeat
from events.envelope import as_utc
from projections import WorkerView


@dataclass(frozen=True, slots=True)
class HostView:
    host_id: str
    hostname: str
    capacity: int
    online_at: datetime
    lost: bool = False
    isolated: bool = False
    isolation: str = ""


Hosts = immutables.Map[str, HostView]
NO_HOSTS: Hosts = immutables.Map()


HOST_TYPES = frozenset({"HostOnline", "HostLost"})  # the only envelopes `apply_host` reads


def apply_host(hosts: Hosts, envelope: Envelope) -> Hosts:
    """Fold host membership: HostOnline adds (or brings back) a host, HostLost marks it lost."""
    if envelope.type == "HostOnline":
        payload = envelope.payload
        return hosts.set(payload["host_id"], HostView(
            host_id=payload["host_id"],
            hostname=payload.get("hostname", ""),
            capacity=int(payload.get("capacity", 0)),
            online_at=as_utc(envelope.occurred_at),
            isolated=bool(payload.get("isolated", False)),
            isolation=str(payload.get("isolation", "")),
        ))
    if envelope.type == "HostLost":
        host = hosts.get(envelope.payload["host_id"])
        if host is not None:
            return hosts.set(host.host_id, replace(host, lost=True))
    return hosts


SILENCE_TYPES = frozenset({"HeartbeatMissed", "WorkerSpawned", "WorkerRestarted"})


def silenced(workers: set[str], envelope: Envelope) -> None:
    """Fold the workers reported silent in the log: a HeartbeatMissed reports one, its next
    start (WorkerSpawned, WorkerRestarted) ends that silence episode."""
    if envelope.type == "HeartbeatMissed":
        workers.add(envelope.payload["worker_id"])
    elif envelope.type in SILENCE_TYPES:
        workers.discard(envelope.payload["worker_id"])


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    """A worker's last heartbeat: its own timestamp, when we got it, its position marks."""

    at: datetime
    received_at: datetime
    marks: immutables.Map[str, PositionMark] = field(default_factory=immutables.Map)


@dataclass
class Liveness:
    """The telemetry overlay and the silence reports made (mutable, monitor-local)."""

    since: datetime  # the monitor's start: nobody is judged on silence from before it watched
    beats: dict[str, WorkerBeat] = field(default_factory=dict)
    worker_seen: dict[str, datetime] = field(default_factory=dict)
    host_seen: dict[str, datetime] = field(default_factory=dict)
    reported_workers: set[str] = field(default_factory=set)
    reported_hosts: set[str] = field(default_factory=set)

    def worker_heartbeat(self, beat: WorkerHeartbeat, now: datetime) -> None:
        marks = immutables.Map({mark.instrument: mark for mark in beat.positions})
        self.beats[beat.worker_id] = WorkerBeat(at=as_utc(beat.at), received_at=now, marks=marks)
        self.worker_seen[beat.worker_id] = now
        self.reported_workers.discard(beat.worker_id)

    def host_heartbeat(self, beat: HostHeartbeat, now: datetime) -> None:
        self.host_seen[beat.host_id] = now

    def observe(self, envelope: Envelope, now: datetime) -> None:
        """A recorded event, recorded `now` (a start is a sign of life). A restart does not
        observe the log again: it starts from the replay's silenced workers and lost hosts."""
        kind, payload = envelope.type, envelope.payload
        silenced(self.reported_workers, envelope)
        if kind in ("WorkerSpawned", "WorkerRestarted"):
            self.worker_seen[payload["worker_id"]] = now
        elif kind == "HostOnline":
            self.reported_hosts.discard(payload["host_id"])
            self.host_seen[payload["host_id"]] = now
        elif kind == "HostLost":
            self.reported_hosts.add(payload["host_id"])

    def silent_workers(self, workers: Iterable[WorkerView], now: datetime,
                       timeout: float) -> list[tuple[WorkerView, float]]:
        """Running workers silent for longer than `timeout` and not yet reported, with how long."""
        silent = []
        for worker in workers:
            if worker.status != JobStatus.RUNNING or worker.worker_id in self.reported_workers:
                continue
            signs = [self.since]
            if worker.started_at is not None:
                signs.append(as_utc(worker.started_at))
            if (seen := self.worker_seen.get(worker.worker_id)) is not None:
                signs.append(seen)
            silent_for = (now - max(signs)).total_seconds()
            if silent_for > timeout:
                silent.append((worker, silent_for))
        return silent

    def silent_hosts(self, hosts: Hosts, now: datetime,
                     timeout: float) -> list[tuple[HostView, float]]:
        """Hosts silent for longer than `timeout`, not lost already, with how long."""
        silent = []
        for host in hosts.values():
            if host.lost or host.host_id in self.reported_hosts:
                continue
            signs = [self.since, host.online_at]
            if (seen := self.host_seen.get(host.host_id)) is not None:
                signs.append(seen)
            silent_for = (now - max(signs)).total_seconds()
            if silent_for > timeout:
                silent.append((host, silent_for))
        return silent
