"""Worker-host service: runs worker processes for the jobs dispatched to it.

Guarantees:
- A JobDispatched for this host starts exactly one process per (worker, attempt); the intent is
  committed first, so a host that dies before spawning reports it at its next start.
- Every process end is reported once, the moment the process is gone (`exits.exit_event`):
  WorkerStopped after a requested stop, WorkerCrashed otherwise.
- Each run of the host is an incarnation (announced in HostOnline): a dispatch meant for an
  earlier run is refused (WorkerCrashed, `host_lost`), never started.
- Fencing: when its lease lapses (`lease.HostLease`) or it is told it was declared lost, the
  host kills its workers, so a rescheduled strategy never runs twice; a fence also voids every
  dispatch received before it.
- Heartbeats (its own and its workers') go out as transient telemetry, its workers' in batches
  (`BeatRelay`); trading reports go through the outbox, so none is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import uuid
from collections import deque
from typing import Any

from pydantic import ValidationError

from events import (
    CrashReason,
    Envelope,
    HeartbeatMissed,
    HostHeartbeat,
    HostLost,
    HostOnline,
    JobDispatched,
    Message,
    StopRequested,
    WorkerCrashed,
    WorkerHeartbeat,
    WorkerRestarted,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerStopped,
    model_for,
)
from events.routing import host_stream, job_stream
from events.values import StrategyConfig
from services.bus import BusUnavailable
from services.secrets import Sealer, SealError
from services.service import Service
from services.store import UnitOfWork
from services.topology import HOST_SERVICE, host_inbox
from services.worker import protocol
from services.worker_host import rows
from services.worker_host.beats import BeatRelay
from services.worker_host.exits import Ended, Ending, exit_event
from services.worker_host.feed_relay import FeedRelay
from services.worker_host.isolation import Isolation
from services.worker_host.lease import HostLease, Renewal
from services.worker_host.rows import LocalWorker
from services.worker_host.spawner import (
    SpawnError,
    SpawnRequest,
    WorkerProcess,
    raise_open_files_limit,
    worker_environment,
)
from services.worker_host.spawners import make_spawner

log = logging.getLogger(__name__)

BEAT_RELAY_WINDOW = 0.1  # seconds a worker's heartbeat may wait to be relayed with others
REPORTS_IN_FLIGHT = 100  # a worker's reports queued for commit before its lines wait for them


class WorkerHostService(Service):
    name = HOST_SERVICE
    tables = rows.TABLES

    def __init__(self, settings: Any, **wiring: Any) -> None:
        self.host_id = settings.host_id or socket.gethostname()
        super().__init__(settings, **wiring)
        self.capacity = settings.host_capacity
        self.sealer = Sealer.for_settings(settings)
        self.live: dict[str, WorkerProcess] = {}
        self.supervisors: dict[str, asyncio.Task[Any]] = {}
        self.launching: set[str] = set()  # workers whose spawn is under way
        self.beats = BeatRelay(self.host_id, self._send_telemetry, BEAT_RELAY_WINDOW)
        self.lease = HostLease(settings.host_lease)
        self._epoch = 0  # bumped by every fence; a dispatch from an older epoch never runs
        self.incarnation = uuid.uuid4().hex[:12]  # this run of the host
        self.workers_dir = settings.data_dir / f"worker-host-{self.host_id}"
        self.spawner = make_spawner(settings.spawn_mode, self.workers_dir,
                                    Isolation.from_settings(settings), settings, self.host_id)
        self.feed = FeedRelay(settings.broker_urls, self.workers_dir / "feed.log")

    @property
    def store_name(self) -> str:
        return f"worker-host-{self.host_id}"

    @property
    def busy(self) -> bool:
        return super().busy or bool(self.launching)

    async def setup(self) -> None:
        raise_open_files_limit()
        await self.spawner.start()
        await self._recover()  # before consuming: a fresh dispatch is not a leftover
        self.handle(host_inbox(self.host_id), {
            JobDispatched: self.on_dispatched,
            StopRequested: self.on_stop_requested,
            HeartbeatMissed: self.on_heartbeat_missed,
            HostLost: self.on_host_lost,
        })

    async def started(self) -> None:
        async with self.store.transaction() as uow:
            uow.emit(self._online(), stream=host_stream(self.host_id))
        self.lease.start()
        self.background(self._heartbeat_loop(), "host-heartbeat")
        self.background(self.beats.run(), "worker-heartbeats")
        self.background(self._lease_loop(), "host-lease")

    async def drain(self) -> None:
        """Graceful shutdown: stop every worker (no flatten), each reported as crashed with
        reason host_lost so the scheduler moves it to another host; then HostLost for us."""
        for worker in list(self.live.values()):
            worker.end_reason = Ending.DRAIN
            worker.send(protocol.Stop(flatten=False))
        await self._until_all_reported(self.settings.stop_grace)
        await self.feed.close()
        await self.spawner.close()
        async with self.store.transaction() as uow:
            uow.emit(HostLost(host_id=self.host_id, silent_for=0.0),
                     stream=host_stream(self.host_id))

    # ------------------------------------------------------------------ handlers

    async def on_dispatched(self, uow: UnitOfWork, env: Envelope, event: JobDispatched) -> None:
        """Commits the intent to run (worker, attempt), then launches it after the commit; an
        older or repeated attempt changes nothing, and one for an earlier run is refused."""
        if event.host_id != self.host_id:
            return
        if event.host_incarnation not in ("", self.incarnation):
            uow.emit(WorkerCrashed(job_id=event.job_id, worker_id=event.worker_id,
                                   host_id=self.host_id, attempt=event.attempt,
                                   reason=CrashReason.HOST_LOST,
                                   detail=f"dispatched to an earlier run of host {self.host_id}; "
                                          "not started"),
                     stream=env.stream, user_id=env.user_id, correlation_id=event.job_id)
            return
        latest = await rows.latest_attempt(uow, event.worker_id)
        if latest is not None and latest >= event.attempt:
            return
        flatten_only = event.mode == "flatten"  # a stop's flatten: it ends once it has closed
        intent = LocalWorker(
            worker_id=event.worker_id, job_id=event.job_id, user_id=env.user_id or "",
            attempt=event.attempt, dispatched_at=self.clock(), strategy_id=event.strategy_id,
            broker_id=event.broker_id, credentials_sealed=event.credentials_sealed,
            config=event.config.model_dump_json(by_alias=True), stopping=flatten_only,
            flatten=flatten_only, stop_reason="stopped by user (a flatten-only run)"
            if flatten_only else None)
        await rows.record_intent(uow, intent, replacing=latest is not None)
        epoch = self._epoch
        uow.after_commit.append(
            lambda: self.background(self._launch(intent, epoch), f"launch-{event.worker_id}"))

    async def on_stop_requested(self, uow: UnitOfWork, env: Envelope, event: StopRequested) -> None:
        """Graceful stop: Stop over the control channel (flatten when asked), SIGTERM after the
        grace period, SIGKILL after another. The exit is reported as WorkerStopped."""
        if event.host_id != self.host_id:
            return
        if not await rows.mark_stopping(uow, event.worker_id, event.flatten, event.reason):
            uow.emit(WorkerStopped(job_id=event.job_id, worker_id=event.worker_id,
                                   reason=f"{event.reason} (not running on host {self.host_id})"),
                     stream=env.stream, user_id=env.user_id)
            return
        worker = self.live.get(event.worker_id)
        if worker is not None:
            uow.after_commit.append(lambda: self.background(
                self._stop(worker, event.flatten), f"stop-{event.worker_id}"))

    async def on_heartbeat_missed(self, uow: UnitOfWork, env: Envelope,
                                  event: HeartbeatMissed) -> None:
        """A hung worker is killed; its exit is reported as WorkerCrashed(heartbeat_timeout)."""
        worker = self.live.get(event.worker_id)
        if event.host_id != self.host_id or worker is None:
            return
        if asyncio.get_running_loop().time() - worker.started < self.settings.heartbeat_timeout:
            return  # about an earlier incarnation
        worker.end_reason = worker.end_reason or Ending.HEARTBEAT
        worker.signal(signal.SIGKILL)
        worker.signal(signal.SIGCONT)  # a stopped (SIGSTOP) process only dies once continued

    async def on_host_lost(self, uow: UnitOfWork, env: Envelope, event: HostLost) -> None:
        """Declared lost while alive: our workers are being rescheduled, so kill them (fence),
        then announce ourselves again."""
        if event.host_id != self.host_id or event.silent_for == 0.0:
            return
        log.warning("declared lost (silent %.1fs): fencing %d workers", event.silent_for,
                    len(self.live))
        self._fence("declared lost by the monitor")
        uow.emit(self._online(), stream=host_stream(self.host_id))

    # ------------------------------------------------------------------ worker lifecycle

    async def _launch(self, row: LocalWorker, epoch: int) -> None:
        """Spawn the committed intent `row`, received in fence epoch `epoch`."""
        worker_id = row.worker_id
        if worker_id in self.live:
            return
        self.launching.add(worker_id)
        try:
            await self._spawn(row, epoch)
        finally:
            self.launching.discard(worker_id)

    async def _spawn(self, row: LocalWorker, epoch: int) -> None:
        worker_id = row.worker_id
        try:
            if len(self.live) >= self.capacity:
                raise SpawnError(f"host {self.host_id} is full ({self.capacity} workers)")
            if self.lease.expired() or epoch != self._epoch:
                raise SpawnError(f"host {self.host_id} was fenced since this dispatch")
            worker = await self.spawner.spawn(SpawnRequest(
                worker_id=worker_id, job_id=row.job_id, user_id=row.user_id,
                attempt=row.attempt,
                env=worker_environment(
                    worker_id=worker_id, job_id=row.job_id, user_id=row.user_id,
                    strategy_id=row.strategy_id, broker_id=row.broker_id,
                    config_json=row.config, heartbeat_interval=self.settings.heartbeat_interval,
                    lease_until=self.lease.until(),
                    broker_urls=json.dumps(self.settings.broker_urls)
                    if self.settings.broker_urls else None,
                    flatten_timeout=self.settings.flatten_timeout,
                    mode="flatten" if row.stopping and row.flatten else None),
                directory=self.workers_dir / worker_id,
                hello_timeout=max(10.0, self.settings.heartbeat_timeout),
                credentials=self.sealer.open(row.credentials_sealed, user_id=row.user_id,
                                             worker_id=worker_id),
                image=StrategyConfig.model_validate_json(row.config).image))
        except (SpawnError, SealError, OSError) as exc:
            async with self.store.transaction() as uow:
                await rows.forget(uow, worker_id)
                uow.emit(WorkerSpawnFailed(job_id=row.job_id, worker_id=worker_id,
                                           host_id=self.host_id, attempt=row.attempt,
                                           error=str(exc),
                                           permanent=isinstance(exc, SpawnError)
                                           and exc.permanent),
                         stream=job_stream(row.job_id), user_id=row.user_id,
                         correlation_id=row.job_id)
            return
        self.live[worker_id] = worker
        # the lease it was given was the one of when its spawn began (which can be slow): the
        # lease as it is now, until the next heartbeat's confirm renews it for every worker
        worker.send(protocol.Lease(until=self.lease.until()))
        if epoch != self._epoch:  # fenced while it was spawning: it must not run
            worker.end_reason = Ending.FENCED
            worker.signal(signal.SIGKILL)

        async def record_start(uow: UnitOfWork) -> Any:
            current = await rows.record_pid(uow, worker_id, worker.pid)
            started = (WorkerRestarted if row.attempt > 0 else WorkerSpawned)(
                job_id=row.job_id, worker_id=worker_id, host_id=self.host_id, pid=worker.pid,
                attempt=row.attempt)
            uow.emit(started, stream=job_stream(row.job_id), user_id=row.user_id,
                     correlation_id=row.job_id)
            return current

        # Its lines (its first heartbeat) are relayed while the start commits; its reports and
        # its exit, queued later, commit with the start or after it.
        recording = self.store.queue_grouped(record_start)
        self.supervisors[worker_id] = self.background(self._supervise(worker),
                                                      f"supervise-{worker_id}")
        current = await recording
        if current is not None and current.stopping:
            self.background(self._stop(worker, current.flatten), f"stop-{worker_id}")

    async def _stop(self, worker: WorkerProcess, flatten: bool) -> None:
        worker.end_reason = worker.end_reason or Ending.STOP
        worker.send(protocol.Stop(flatten=flatten))
        try:
            await asyncio.wait_for(worker.wait(), timeout=self.settings.stop_grace)
        except TimeoutError:
            await worker.terminate(grace=self.settings.stop_grace)

    async def _supervise(self, worker: WorkerProcess) -> None:
        """Relay the worker's lines until its channel closes, then report how it ended. Its
        reports are queued for commit in order as they are read, so the lines that came together
        commit together (group commit); at most `REPORTS_IN_FLIGHT` wait."""
        committing: deque[tuple[Message, asyncio.Future[None]]] = deque()
        try:
            try:
                while line := await worker.next_line():
                    if (report := self._relay(worker, line)) is not None:
                        committing.append(report)
                    while committing and (committing[0][1].done()
                                          or len(committing) > REPORTS_IN_FLIGHT):
                        await _committed(worker, *committing.popleft())
            except protocol.ProtocolViolation as violation:
                log.warning("worker %s broke the control protocol (%s): killed",
                            worker.worker_id, violation)
                worker.violated(violation)
            except (ConnectionError, OSError):
                pass
            for report in committing:
                await _committed(worker, *report)
            code = await worker.wait()
            worker.writer.close()
            self.live.pop(worker.worker_id, None)
            self.feed.forget(worker.worker_id)
            await self._report_exit(worker, code)
        finally:
            self.supervisors.pop(worker.worker_id, None)

    def _relay(self, worker: WorkerProcess,
               raw: bytes) -> tuple[Message, asyncio.Future[None]] | None:
        """Relays one line of the worker's; a report is returned with its commit, queued.
        Raises ProtocolViolation for a line a worker may not send."""
        line = protocol.decode(raw)
        if isinstance(line, protocol.Beat):
            self.beats.add(WorkerHeartbeat(job_id=worker.job_id, worker_id=worker.worker_id,
                                           host_id=self.host_id, pid=worker.pid, at=line.at,
                                           positions=line.positions),
                           first=not worker.beating)
            worker.beating = True
        elif isinstance(line, protocol.Report):
            payload = line.payload | {"job_id": worker.job_id, "worker_id": worker.worker_id}
            try:
                event = model_for(line.event).model_validate(payload)
            except ValidationError:
                raise protocol.ProtocolViolation(f"an invalid {line.event} report") from None

            async def record_report(uow: UnitOfWork) -> None:
                uow.emit(event, stream=job_stream(worker.job_id), user_id=worker.user_id,
                         correlation_id=worker.job_id)

            return event, self.store.queue_grouped(record_report)
        elif isinstance(line, protocol.Subscribe):
            self.feed.subscribe(worker, line.keys)
        else:
            raise protocol.ProtocolViolation(
                f"a {line.type} line where only heartbeats, reports and subscriptions may come")
        return None

    async def _report_exit(self, worker: WorkerProcess, code: int | None) -> None:
        async def record_exit(uow: UnitOfWork) -> None:
            row = await rows.local(uow, worker.worker_id)
            if row is None or row.attempt != worker.attempt:
                return
            await rows.forget(uow, worker.worker_id)
            ended = Ended(row.job_id, row.worker_id, row.attempt, row.stopping, row.stop_reason)
            event = exit_event(ended, host_id=self.host_id, code=code,
                               ending=Ending(worker.end_reason) if worker.end_reason else None,
                               heartbeat_timeout=self.settings.heartbeat_timeout,
                               violation=worker.end_detail, cause=worker.process.cause)
            uow.emit(event, stream=job_stream(worker.job_id), user_id=worker.user_id,
                     correlation_id=worker.job_id)

        await self.store.grouped(record_exit)

    # ------------------------------------------------------------------ host liveness

    async def _recover(self) -> None:
        """After a restart: workers of the previous run are gone (they exit when their host's
        channel closes); report them. A dispatch committed but never started is reported as a
        failed spawn rather than started now: the scheduler may have moved it meanwhile."""
        async with self.store.transaction() as uow:
            for row in await rows.every_worker(uow):
                await rows.forget(uow, row.worker_id)
                where = {"stream": job_stream(row.job_id), "user_id": row.user_id,
                         "correlation_id": row.job_id}
                if row.pid is None:
                    uow.emit(WorkerSpawnFailed(job_id=row.job_id, worker_id=row.worker_id,
                                               host_id=self.host_id, attempt=row.attempt,
                                               error=f"worker-host {self.host_id} restarted "
                                                     "before starting it"), **where)
                    continue
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(row.pid, signal.SIGKILL)
                ended = Ended(row.job_id, row.worker_id, row.attempt, row.stopping,
                              row.stop_reason)
                uow.emit(exit_event(ended, host_id=self.host_id, ending=Ending.HOST_RESTARTED,
                                    code=None, heartbeat_timeout=self.settings.heartbeat_timeout),
                         **where)

    async def _heartbeat_loop(self) -> None:
        """Our heartbeat every interval while the bus is up, and at once when it is back after
        an outage (the lease ran on meanwhile). Beats do not wait for each other's confirms: a
        slow broker delays lease renewals but does not thin them out."""
        in_flight: set[asyncio.Task[None]] = set()
        back = asyncio.Event()
        self.bus.on_reconnected(back.set)
        try:
            while True:
                back.clear()
                if self.bus.connected():
                    task = asyncio.create_task(self._beat())
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(back.wait(), self.settings.host_heartbeat_interval)
        finally:
            for task in in_flight:
                task.cancel()

    async def _beat(self) -> None:
        """One heartbeat, published with a confirm, which renews our lease (and our workers')
        from the moment it was sent. A lease that lapsed before the confirm came fences first:
        the monitor may have declared us lost meanwhile."""
        beat = HostHeartbeat(host_id=self.host_id, capacity=self.capacity,
                             workers=tuple(self.live), at=self.clock())
        sent = self.lease.clock()
        try:
            await asyncio.wait_for(self.bus.send_telemetry(beat), timeout=self.settings.host_lease)
        except BusUnavailable:  # the bus has said so; the next beat goes once it is back
            return
        except Exception as exc:
            log.warning("host heartbeat not confirmed (%s)", type(exc).__name__)
            return
        if (took := self.lease.clock() - sent) > 1.0:
            log.warning("host heartbeat confirmed after %.1fs", took)
        renewal = self.lease.confirmed(sent)
        if renewal == Renewal.STALE:
            return
        if renewal == Renewal.LAPSED:
            self._fence("the lease lapsed before this heartbeat was confirmed")
        lease = protocol.Lease(until=self.lease.until())
        for worker in self.live.values():
            worker.send(lease)

    async def _send_telemetry(self, message: Any) -> None:
        try:
            await self.bus.send_telemetry(message)
        except Exception as exc:  # telemetry is best effort; the lease loop fences if it lasts
            log.debug("telemetry not sent: %s", exc)

    async def _lease_loop(self) -> None:
        """Fence when the broker has confirmed none of our heartbeats for longer than the lease:
        a dropped connection and a silent network cut alike."""
        while True:
            await asyncio.sleep(self.settings.lease_check_interval)
            if self.lease.expired() and self.live:
                log.warning("broker unreachable for %.1fs: fencing %d workers",
                            self.lease.silent_for(), len(self.live))
                self._fence("broker unreachable past the lease")

    def _online(self) -> HostOnline:
        isolation = self.spawner.isolation
        return HostOnline(host_id=self.host_id, capacity=self.capacity,
                          hostname=socket.gethostname(), pid=os.getpid(),
                          incarnation=self.incarnation, isolated=isolation.switches_ids,
                          isolation=self.spawner.describe())

    def _fence(self, why: str) -> None:
        self._epoch += 1
        for worker in list(self.live.values()):
            worker.end_reason = Ending.FENCED
            worker.signal(signal.SIGKILL)
            worker.signal(signal.SIGCONT)
        log.info("fenced: %s", why)

    async def _until_all_reported(self, timeout: float) -> None:
        """Wait for every worker to exit and its end to be recorded; kill what outlives
        `timeout`."""
        supervisors = set(self.supervisors.values())
        if not supervisors:
            return
        _, pending = await asyncio.wait(supervisors, timeout=timeout)
        if pending:
            for worker in list(self.live.values()):
                worker.signal(signal.SIGKILL)
            await asyncio.wait(pending, timeout=2.0)


async def _committed(worker: WorkerProcess, report: Message,
                     commit: asyncio.Future[None]) -> None:
    """Waits for a report's commit. One that failed for good (the store retries a transient
    failure) is logged with the report, and the worker's supervision goes on: its exit must
    still be reported, or its job would hold its slot and never restart."""
    try:
        await commit
    except Exception as exc:
        log.error("worker %s: its %s could not be committed and is lost (%r): %s",
                  worker.worker_id, report.type_name(), exc, report.model_dump_json())
