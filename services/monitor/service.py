"""The monitor: records the event log, keeps the live projections, watches heartbeats, answers
status queries.

Storage: the log lives in the monitor's own database, the same file as its Store (outbox,
processed ids), on the Store's engine. On SQLite every write transaction there is
`BEGIN IMMEDIATE` under a 30 s busy timeout, so the recorder's batch commits, the Store's
rare watchdog emits and the snapshots serialise on the file's single write lock without further
coordination.

Guarantees: every command and event is recorded once, in one global order, before it is acked
(see `recorder`); the live state is the fold of exactly the recorded envelopes, and a restart
rebuilds it before consuming again: from the latest usable snapshot and the log after it (see
`snapshot`), or from the whole log. HeartbeatMissed and HostLost go out
through the Store's outbox, once per silence episode (see `liveness`).
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
from projections import ENDED, Projections, folds
from services import metrics
from services.bus import RawJson
from services.monitor import views
from services.monitor.liveness import Hosts, Liveness
from services.monitor.log import EventLog
from services.monitor.recorder import Recorded, Recorder
from services.monitor.replay import Folded, replay
from services.monitor.snapshot import Snapshots
from services.service import Service, now
from services.settings import Settings
from services.topology import MONITOR_LOG, MONITOR_TELEMETRY, rpc_queue

log = logging.getLogger(__name__)

LOG_BATCH = 1000  # envelopes per log transaction
LOG_LINGER = 0.005  # seconds a batch may wait to fill while the recorder is behind
LOG_PAGE_MAX = 1000


class MonitorService(Service):
    name = "monitor"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.log = EventLog(self.store.engine)
        self.folded = Folded()
        self.liveness = Liveness(since=now())
        self.recorder = Recorder(self.log, self._on_recorded)
        self.snapshots = Snapshots(self.store.engine, self.log)
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
        # silence is judged from when we start watching again; reports in the log count as made
        self.liveness = Liveness(since=now(), reported_workers=set(self.folded.silenced),
                                 reported_hosts={h.host_id for h in self.hosts.values() if h.lost})
        log.info("monitor: replayed %d events%s", self.folded.position - self._snapshot_at,
                 f" after the snapshot at {self._snapshot_at}" if snapshot else "")
        self.bus.consume_batches(MONITOR_LOG, self.recorder.record, max_batch=LOG_BATCH,
                                 linger=LOG_LINGER)
        self.bus.subscribe_telemetry(MONITOR_TELEMETRY, self._on_telemetry)
        self.bus.serve(rpc_queue("monitor"), self._on_request)
        views.watch_metrics(lambda: self.folded)

    async def started(self) -> None:
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
        moment = now()
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
            moment = now()
            beats = message.beats if isinstance(message, WorkerHeartbeats) else (message,)
            for beat in beats:
                self.liveness.worker_heartbeat(beat, moment)
                self._entries.pop(beat.worker_id, None)
        elif isinstance(message, HostHeartbeat):
            self.liveness.host_heartbeat(message, now())

    # ------------------------------------------------------------------ watchdog

    async def _watch(self) -> None:
        period = max(self.settings.heartbeat_interval / 2, 0.05)
        while True:
            await asyncio.sleep(period)
            try:
                await self.check_liveness(now())
            except Exception:  # a failed emit is retried on the next tick (nothing marked)
                log.exception("watchdog tick failed")

    async def check_liveness(self, moment: datetime) -> None:
        """Emit HeartbeatMissed for silent running workers and HostLost for silent hosts."""
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

    async def _worker(self, body: dict[str, Any]) -> Any:
        """One worker's status entry. With `wait` (seconds, ≤ 5) and `until` ("known" or
        "ended"), answers as soon as the log shows that much (read-your-writes for the gateway:
        a start or stop it has just seen confirmed), or with what it has when the wait is over."""
        worker_id = body.get("worker_id")
        if not isinstance(worker_id, str):
            raise ValueError("'worker_id' must be a string")
        until = body.get("until", "known")

        def settled() -> bool:
            worker = self.state.workers.get(worker_id)
            return worker is not None and (until != "ended" or worker.status in ENDED)

        await self._until(settled, body.get("wait"))
        worker = self.state.workers.get(worker_id)
        if worker is None:
            raise LookupError(f"unknown worker {worker_id!r}")
        return views.worker_entry(self.state, worker, self.liveness.beats.get(worker_id))

    async def _until(self, settled: Callable[[], bool], wait: Any) -> None:
        """Return once `settled()` holds for what is recorded, or `wait` seconds (≤ 5) on."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(float(wait or 0), 0.0), 5.0)
        while not settled() and (remaining := deadline - loop.time()) > 0:
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=remaining)

    async def _on_request(self, body: Any) -> Any:
        """Status RPC: ops `status`, `worker`, `log`, `head`, `hosts` (read-only, answered from
        memory except `log`, which pages the log, waiting for rows with a `wait`). A `status`
        with `known` worker ids and a `wait` answers once the log shows them all, or when the
        wait is over (read-your-writes for the gateway, which answered their starts)."""
        if not isinstance(body, dict):
            raise ValueError("request must be a JSON object with an 'op'")
        op = body.get("op")
        if op == "status":
            offset, limit = body.get("offset") or 0, body.get("limit")
            if not isinstance(offset, int) or offset < 0 or not (
                limit is None or (isinstance(limit, int) and limit > 0)
            ):
                raise ValueError("'offset' must be an integer ≥ 0 and 'limit' one ≥ 1")
            known = body.get("known") or []
            if not isinstance(known, list) or not all(isinstance(w, str) for w in known):
                raise ValueError("'known' must be a list of worker ids")
            await self._until(lambda: all(w in self.state.workers for w in known),
                              body.get("wait"))
            return RawJson(views.status_json(self.state, body.get("user_id"),
                                             self.liveness.beats, self._entries, offset, limit))
        if op == "worker":
            return await self._worker(body)
        if op == "log":
            try:
                after = max(int(body.get("after") or 0), 0)
                limit = min(max(int(body.get("limit") or LOG_PAGE_MAX), 1), LOG_PAGE_MAX)
            except (TypeError, ValueError):
                raise ValueError("'after' and 'limit' must be integers") from None
            # a long poll (`wait` seconds, ≤ 5): answers once the log has rows after `after`
            await self._until(lambda: self.folded.position > after, body.get("wait"))
            rows = await self.log.page(after, limit)
            return [{"position": p, "envelope": json.loads(body_)} for p, body_ in rows]
        if op == "hosts":
            return views.hosts(self.hosts, self.liveness)
        if op == "head":
            return {"position": self.folded.position}
        raise ValueError(f"unknown op {op!r} (expected status, worker, log, head or hosts)")
