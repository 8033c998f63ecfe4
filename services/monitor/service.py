"""The monitor: records the event log, keeps the live projections, watches heartbeats, answers
status queries.

Every command and event is recorded once, in one global order, before it is acked (`recorder`);
the live state is the fold of exactly the recorded envelopes, rebuilt at a restart from the latest
usable snapshot and the log after it (`snapshot`) before consuming again. HeartbeatMissed and
HostLost go out through the Store's outbox, once per silence episode (`liveness`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from events import (
    HeartbeatMissed,
    HostHeartbeat,
    HostLost,
    Message,
    WorkerHeartbeat,
    WorkerHeartbeats,
)
from events.queries import (
    HeadQuery,
    HostsQuery,
    LogQuery,
    NotFound,
    StatusQuery,
    WorkerQuery,
)
from projections import ENDED, Projections, folds
from services import metrics
from services.bus import RawJson
from services.monitor import views
from services.monitor.liveness import Hosts, Liveness
from services.monitor.log import EventLog
from services.monitor.recorder import Recorded, Recorder
from services.monitor.replay import Folded, replay
from services.monitor.snapshot import Snapshots
from services.service import Service
from services.settings import Settings
from services.topology import MONITOR_LOG, MONITOR_RPC, MONITOR_TELEMETRY

log = logging.getLogger(__name__)

LOG_BATCH = 1000  # envelopes per log transaction
LOG_LINGER = 0.005  # seconds a batch may wait to fill while the recorder is behind


class MonitorService(Service):
    name = "monitor"
    single_active = True

    def __init__(self, settings: Settings, **wiring: Any) -> None:
        super().__init__(settings, **wiring)
        self.log = EventLog(self.store.db)
        self.folded = Folded()
        self.liveness = Liveness(since=self.clock())
        self.recorder = Recorder(self.log, self._on_recorded)
        self.snapshots = Snapshots(self.store.db, self.log)
        self._snapshot_at = 0  # the position of the latest snapshot
        self._snapshotting: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._entries: dict[str, bytes] = {}  # status entries as JSON, dropped when they change

    @property
    def state(self) -> Projections:
        return self.folded.state

    @property
    def hosts(self) -> Hosts:
        return self.folded.hosts

    async def setup(self) -> None:
        await self.log.open()
        await self.snapshots.open()
        snapshot = await self.snapshots.latest() if self.settings.snapshot_every else None
        self._snapshot_at = snapshot.position if snapshot else 0
        # through a reader of its own: its driver fetches the next page while this one folds
        reader = EventLog.at(self.store.url, must_exist=True)
        try:
            self.folded = await replay(reader, start=snapshot)
        finally:
            await reader.close()
        self.recorder.position = self.folded.position
        # silence is judged from when we start watching again; reports in the log count as made
        self.liveness = Liveness(since=self.clock(), reported_workers=set(self.folded.silenced),
                                 reported_hosts={h.host_id for h in self.hosts.values() if h.lost})
        log.info("monitor: replayed %d events%s", self.folded.position - self._snapshot_at,
                 f" after the snapshot at {self._snapshot_at}" if snapshot else "")
        self.bus.consume_batches(MONITOR_LOG, self.recorder.record, max_batch=LOG_BATCH,
                                 linger=LOG_LINGER)
        self.bus.subscribe_telemetry(MONITOR_TELEMETRY, self._on_telemetry)
        self.bus.serve(MONITOR_RPC, {StatusQuery: self.status, WorkerQuery: self.worker,
                                     LogQuery: self.page, HeadQuery: self.head,
                                     HostsQuery: self.host_list})
        views.watch_metrics(lambda: self.folded)

    async def started(self) -> None:
        self.bus.on_reconnected(self._hearing_again)
        self.background(self._watch(), "monitor-watchdog")
        self._snapshot_when_due()  # a long replay at start is not folded twice

    async def drain(self) -> None:
        """A last snapshot (consumers have stopped), so the next start folds only what comes
        after it."""
        if self._snapshotting is not None:
            await asyncio.wait({self._snapshotting})
        if self.settings.snapshot_every and self.folded.position > self._snapshot_at:
            await self._snapshot()

    def _snapshot_when_due(self) -> None:
        every = self.settings.snapshot_every
        if (every and self.folded.position - self._snapshot_at >= every
                and (self._snapshotting is None or self._snapshotting.done())):
            self._snapshotting = asyncio.create_task(self._snapshot(), name="monitor-snapshot")

    async def _snapshot(self) -> None:
        """Save the folded state as it is now (the state and host maps are immutable; the set
        of silenced workers is copied), off the event loop but for the database write."""
        folded = self.folded
        now_folded = Folded(state=folded.state, hosts=folded.hosts, position=folded.position,
                            silenced=set(folded.silenced))
        self._snapshot_at = now_folded.position  # a failure is not retried before the next
        try:
            size = await self.snapshots.save(now_folded)
        except Exception:
            log.exception("snapshot at %d failed (a restart replays from the one before)",
                          now_folded.position)
            return
        log.info("snapshot at %d (%d KiB)", now_folded.position, size // 1024)

    # ------------------------------------------------------------------ inputs

    def _on_recorded(self, recorded: Recorded) -> None:
        if not recorded:
            return
        if self.folded.fold([envelope for _, envelope in recorded], recorded[-1][0]):
            self._forget_workers_gone()
        metrics.log_recorded(recorded)
        self._snapshot_when_due()
        moment = self.clock()
        for _, envelope in recorded:
            self.liveness.observe(envelope, moment)
            if (worker_id := envelope.payload.get("worker_id")) is not None:
                self._entries.pop(worker_id, None)
            elif folds(envelope.type):
                self._entries.clear()
        self._changed.set()  # wake status queries waiting for what was just recorded
        self._changed = asyncio.Event()

    def _forget_workers_gone(self) -> None:
        """Drop what the monitor keeps about workers its state has forgotten (their last beats,
        their status entries): an hourly sweep at most, as the log's clock moves."""
        known = self.state.workers
        for kept in (self.liveness.beats, self.liveness.worker_seen, self._entries):
            for worker_id in [w for w in kept if w not in known]:
                del kept[worker_id]
        self.liveness.reported_workers.intersection_update(known.keys())

    def _on_telemetry(self, message: Message) -> None:
        if isinstance(message, WorkerHeartbeats | WorkerHeartbeat):  # single: an older host
            moment = self.clock()
            beats = message.beats if isinstance(message, WorkerHeartbeats) else (message,)
            for beat in beats:
                self.liveness.worker_heartbeat(beat, moment)
                self._entries.pop(beat.worker_id, None)
        elif isinstance(message, HostHeartbeat):
            self.liveness.host_heartbeat(message, self.clock())

    # ------------------------------------------------------------------ watchdog

    async def _watch(self) -> None:
        period = max(self.settings.heartbeat_interval / 2, 0.05)
        while True:
            await asyncio.sleep(period)
            try:
                await self.check_liveness(self.clock())
            except Exception:  # a failed emit is retried on the next tick (nothing marked)
                log.exception("watchdog tick failed")

    def _hearing_again(self) -> None:
        """Back from a broker outage: silence is judged from now on, as after a start; what
        could not be heard meanwhile was not silence."""
        self.liveness.since = self.clock()

    async def check_liveness(self, moment: datetime) -> None:
        """Emit HeartbeatMissed for silent running workers and HostLost for silent hosts; none
        while the bus is down (deaf, the monitor judges no one)."""
        if not self.bus.connected():
            return
        workers = self.liveness.silent_workers(
            self.state.workers.values(), moment, self.settings.heartbeat_timeout)
        hosts = self.liveness.silent_hosts(self.hosts, moment, self.settings.host_timeout)
        if not workers and not hosts:
            return
        async with self.store.transaction() as uow:
            for worker, silent_for in workers:
                log.warning("worker %s silent for %.1fs", worker.worker_id, silent_for)
                uow.emit(
                    HeartbeatMissed(job_id=worker.job_id, worker_id=worker.worker_id,
                                    host_id=worker.host_id or "", silent_for=round(silent_for, 3)),
                    stream=f"job-{worker.job_id}", user_id=worker.user_id,
                    correlation_id=worker.job_id,
                )
            for host, silent_for in hosts:
                log.warning("host %s silent for %.1fs", host.host_id, silent_for)
                uow.emit(HostLost(host_id=host.host_id, silent_for=round(silent_for, 3)),
                         stream=f"host-{host.host_id}")
        self.liveness.reported_workers.update(w.worker_id for w, _ in workers)
        self.liveness.reported_hosts.update(h.host_id for h, _ in hosts)

    # ------------------------------------------------------------------ queries

    async def worker(self, query: WorkerQuery) -> Any:
        """One worker's status entry, as soon as the log shows it (`until` "known") or shows it
        ended ("ended"), or with what there is when the `wait` is over (read-your-writes for the
        gateway, which has just seen a start or stop confirmed)."""
        def settled() -> bool:
            worker = self.state.workers.get(query.worker_id)
            return worker is not None and (query.until != "ended" or worker.status in ENDED)

        await self._until(settled, query.wait)
        worker = self.state.workers.get(query.worker_id)
        if worker is None:
            raise NotFound(f"unknown worker {query.worker_id!r}")
        return views.worker_entry(self.state, worker, self.liveness.beats.get(query.worker_id))

    async def _until(self, settled: Callable[[], bool], wait: float) -> None:
        """Return once `settled()` holds for what is recorded, or `wait` seconds on."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not settled() and (remaining := deadline - loop.time()) > 0:
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=remaining)

    async def status(self, query: StatusQuery) -> RawJson:
        """The status document (every worker of the user, or all; or one page), once the log
        shows the `known` workers or the `wait` is over (read-your-writes for the gateway)."""
        await self._until(lambda: all(w in self.state.workers for w in query.known), query.wait)
        return RawJson(views.status_json(self.state, query.user_id, self.liveness.beats,
                                         self._entries, query.offset, query.limit))

    async def page(self, query: LogQuery) -> list[dict[str, Any]]:
        """A page of the log; with a `wait`, once it has rows after `after` (a long poll)."""
        await self._until(lambda: self.folded.position > query.after, query.wait)
        rows = await self.log.page(query.after, query.limit)
        return [{"position": p, "envelope": json.loads(body)} for p, body in rows]

    async def head(self, query: HeadQuery) -> dict[str, int]:
        return {"position": self.folded.position}

    async def host_list(self, query: HostsQuery) -> Any:
        return views.hosts(self.hosts, self.liveness)
