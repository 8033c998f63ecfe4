"""Worker-host service: runs worker processes for the jobs dispatched to it.

Guarantees:
- A JobDispatched for this host starts exactly one process per (worker, attempt); the intent is
  committed first, so a host that dies before spawning spawns at its next start.
- Every process end is reported once: WorkerStopped after a requested stop, WorkerCrashed
  otherwise (`exited` with the code or signal, `heartbeat_timeout` after a HeartbeatMissed kill,
  `host_lost` when fenced), the moment the process is gone.
- Each run of the host is an incarnation (announced in HostOnline): a dispatch meant for an
  earlier run, still queued when that run ended, is refused and reported (WorkerCrashed,
  `host_lost`), never started: the scheduler may have placed that attempt elsewhere since.
- Fencing: cut off from the broker for longer than `host_lease`, or told it was declared lost,
  the host kills its workers, so a rescheduled strategy never runs twice. A fence also voids
  every dispatch received before it: a spawn still in flight is refused, or killed the moment
  it returns.
- Workers are forked from a pre-imported fork-server (`RUNNER_SPAWN_MODE=fork`, the default) or
  exec'd one by one (`exec`); the code here does not depend on which.
- Heartbeats (its own and its workers') go out as transient telemetry, its workers' in batches
  (`BeatRelay`); trading reports go through the outbox, so none is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections import deque
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Column, Text, bindparam, delete, insert, update
from sqlmodel import Field, SQLModel, select

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
from services.secrets import Sealer, SealError
from services.service import Service, now
from services.store import UnitOfWork, UtcDateTime
from services.topology import host_inbox
from services.worker import protocol
from services.worker_host.beats import BeatRelay
from services.worker_host.isolation import Isolation
from services.worker_host.spawner import (
    SpawnError,
    SpawnRequest,
    WorkerProcess,
    make_spawner,
    raise_open_files_limit,
    worker_environment,
)

log = logging.getLogger(__name__)

BEAT_RELAY_WINDOW = 0.1  # seconds a worker's heartbeat may wait to be relayed with others
REPORTS_IN_FLIGHT = 100  # a worker's reports queued for commit before its lines wait for them


class LocalWorker(SQLModel, table=True):
    """A worker this host is responsible for, from dispatch until its end is reported."""

    __tablename__ = "local_workers"
    worker_id: str = Field(primary_key=True, max_length=100)
    job_id: str = Field(max_length=100)
    user_id: str = Field(max_length=100)
    attempt: int = 0
    strategy_id: str = Field(max_length=100)
    broker_id: str = Field(max_length=50)
    credentials_sealed: str = Field(sa_column=Column(Text, nullable=False))
    config: str = Field(sa_column=Column(Text, nullable=False))
    pid: int | None = None
    stopping: bool = False
    flatten: bool = False
    stop_reason: str | None = None
    dispatched_at: datetime = Field(sa_type=UtcDateTime)


LOCAL_WORKERS = LocalWorker.__table__  # type: ignore[attr-defined]

# The start path's statements, built once and run as Core (the ORM's reads and flushes were a
# third of the host's samples in a profile of a burst of starts). Every ORM read of a worker
# refreshes it (`_local`), so it sees what these changed in the same transaction.
LATEST_ATTEMPT = select(LOCAL_WORKERS.c.attempt).where(
    LOCAL_WORKERS.c.worker_id == bindparam("dispatched_worker"))
DROP_EARLIER_ATTEMPT = delete(LOCAL_WORKERS).where(
    LOCAL_WORKERS.c.worker_id == bindparam("dispatched_worker"))
RECORD_INTENT = insert(LOCAL_WORKERS)
RECORD_PID = (update(LOCAL_WORKERS)
              .where(LOCAL_WORKERS.c.worker_id == bindparam("started_worker"))
              .values(pid=bindparam("started_pid"))
              .returning(LOCAL_WORKERS.c.stopping, LOCAL_WORKERS.c.flatten))


def job_stream(job_id: str) -> str:
    return f"job-{job_id}"


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


async def _local(uow: UnitOfWork, worker_id: str) -> LocalWorker | None:
    """The worker's row as an ORM object, read afresh: the start path's Core statements may
    have changed it in this transaction since it was loaded."""
    return await uow.session.get(LocalWorker, worker_id, populate_existing=True)


class WorkerHostService(Service):
    name = "worker-host"
    tables = (LocalWorker.__table__,)  # type: ignore[attr-defined]

    def __init__(self, settings: Any) -> None:
        self.host_id = settings.host_id or socket.gethostname()
        super().__init__(settings)
        self.capacity = settings.host_capacity
        self.sealer = Sealer.for_settings(settings)
        self.live: dict[str, WorkerProcess] = {}
        self.beats = BeatRelay(self.host_id, self._send_telemetry, BEAT_RELAY_WINDOW)
        self._lease_renewed: float | None = None  # time.monotonic() the last confirmed beat left
        self._epoch = 0  # bumped by every fence; a dispatch from an older epoch never runs
        self.incarnation = uuid.uuid4().hex[:12]  # this run of the host
        self.workers_dir = settings.data_dir / f"worker-host-{self.host_id}"
        self.spawner = make_spawner(settings.spawn_mode, self.workers_dir,
                                    Isolation.from_settings(settings))

    @property
    def store_name(self) -> str:
        return f"worker-host-{self.host_id}"

    async def setup(self) -> None:
        raise_open_files_limit()
        await self.spawner.start()
        await self._recover()  # before consuming: a fresh dispatch is not a leftover
        self.handle(
            host_inbox(self.host_id),
            {
                JobDispatched: self.on_dispatched,
                StopRequested: self.on_stop_requested,
                HeartbeatMissed: self.on_heartbeat_missed,
                HostLost: self.on_host_lost,
            },
        )

    async def started(self) -> None:
        async with self.store.transaction() as uow:
            uow.emit(
                self._online(),
                stream=f"host-{self.host_id}",
            )
        self._lease_renewed = time.monotonic()
        self.background(self._heartbeat_loop(), "host-heartbeat")
        self.background(self.beats.run(), "worker-heartbeats")
        self.background(self._lease_loop(), "host-lease")

    async def drain(self) -> None:
        """Graceful shutdown: stop every worker (no flatten); each is reported as crashed with
        reason host_lost so the scheduler moves it to another host; then HostLost for us."""
        for worker in list(self.live.values()):
            worker.end_reason = "drain"
            worker.send(protocol.Stop(flatten=False))
        await self._wait_all_exited(self.settings.stop_grace)
        await self.spawner.close()
        async with self.store.transaction() as uow:
            uow.emit(HostLost(host_id=self.host_id, silent_for=0.0), stream=f"host-{self.host_id}")

    # ------------------------------------------------------------------ handlers

    async def on_dispatched(self, uow: UnitOfWork, env: Envelope, event: JobDispatched) -> None:
        """Commits the intent to run (worker, attempt), then launches it after the commit."""
        if event.host_id != self.host_id:
            return
        if event.host_incarnation not in ("", self.incarnation):
            uow.emit(
                WorkerCrashed(job_id=event.job_id, worker_id=event.worker_id,
                              host_id=self.host_id, attempt=event.attempt,
                              reason=CrashReason.HOST_LOST,
                              detail=f"dispatched to an earlier run of host {self.host_id}; "
                                     "not started"),
                stream=env.stream, user_id=env.user_id, correlation_id=event.job_id,
            )
            return
        connection = await uow.connection()
        key = {"dispatched_worker": event.worker_id}
        latest = (await connection.execute(LATEST_ATTEMPT, key)).scalar()
        if latest is not None and latest >= event.attempt:
            return  # duplicate dispatch
        if latest is not None:
            await connection.execute(DROP_EARLIER_ATTEMPT, key)
        intent = LocalWorker(
            worker_id=event.worker_id,
            job_id=event.job_id,
            user_id=env.user_id or "",
            attempt=event.attempt,
            dispatched_at=now(),
            strategy_id=event.strategy_id,
            broker_id=event.broker_id,
            credentials_sealed=event.credentials_sealed,
            config=event.config.model_dump_json(by_alias=True),
        )
        await connection.execute(RECORD_INTENT, intent.model_dump())
        epoch = self._epoch
        uow.after_commit.append(
            lambda: self.background(self._launch(intent, epoch), f"launch-{event.worker_id}")
        )

    async def on_stop_requested(self, uow: UnitOfWork, env: Envelope, event: StopRequested) -> None:
        """Graceful stop: Stop over the control channel (flatten when asked), SIGTERM after the
        grace period, SIGKILL after another. The exit is reported as WorkerStopped."""
        if event.host_id != self.host_id:
            return
        row = await _local(uow, event.worker_id)
        if row is None:
            uow.emit(
                WorkerStopped(
                    job_id=event.job_id,
                    worker_id=event.worker_id,
                    reason=f"{event.reason} (not running on host {self.host_id})",
                ),
                stream=env.stream,
                user_id=env.user_id,
            )
            return
        row.stopping, row.flatten, row.stop_reason = True, event.flatten, event.reason
        uow.session.add(row)
        worker = self.live.get(event.worker_id)
        if worker is not None:
            uow.after_commit.append(
                lambda: self.background(
                    self._stop(worker, event.flatten), f"stop-{event.worker_id}"
                )
            )

    async def on_heartbeat_missed(
        self, uow: UnitOfWork, env: Envelope, event: HeartbeatMissed
    ) -> None:
        """A hung worker is killed; its exit is reported as WorkerCrashed(heartbeat_timeout)."""
        worker = self.live.get(event.worker_id)
        if event.host_id != self.host_id or worker is None:
            return
        age = asyncio.get_running_loop().time() - worker.started
        if age < self.settings.heartbeat_timeout:
            return  # about an earlier incarnation
        worker.end_reason = worker.end_reason or "heartbeat"
        worker.signal(signal.SIGKILL)
        worker.signal(signal.SIGCONT)  # a stopped (SIGSTOP) process only dies once continued

    async def on_host_lost(self, uow: UnitOfWork, env: Envelope, event: HostLost) -> None:
        """Declared lost while alive: our workers are being rescheduled, so kill them (fence),
        then announce ourselves again."""
        if event.host_id != self.host_id or event.silent_for == 0.0:
            return
        log.warning(
            "declared lost (silent %.1fs): fencing %d workers", event.silent_for, len(self.live)
        )
        self._fence("declared lost by the monitor")
        uow.emit(
            self._online(),
            stream=f"host-{self.host_id}",
        )

    # ------------------------------------------------------------------ worker lifecycle

    async def _launch(self, row: LocalWorker, epoch: int) -> None:
        """Spawn the committed intent `row`, received in fence epoch `epoch`."""
        worker_id = row.worker_id
        if worker_id in self.live:
            return
        try:
            if len(self.live) >= self.capacity:
                raise SpawnError(f"host {self.host_id} is full ({self.capacity} workers)")
            if self._lease_expired() or epoch != self._epoch:
                raise SpawnError(f"host {self.host_id} was fenced since this dispatch")
            credentials = self.sealer.open(row.credentials_sealed, user_id=row.user_id,
                                           worker_id=worker_id)
            env = worker_environment(
                worker_id=worker_id,
                job_id=row.job_id,
                user_id=row.user_id,
                strategy_id=row.strategy_id,
                broker_id=row.broker_id,
                config_json=row.config,
                heartbeat_interval=self.settings.heartbeat_interval,
                lease_until=self._lease_until(),
            )
            worker = await self.spawner.spawn(
                SpawnRequest(
                    worker_id=worker_id,
                    job_id=row.job_id,
                    user_id=row.user_id,
                    attempt=row.attempt,
                    env=env,
                    directory=self.workers_dir / worker_id,
                    hello_timeout=max(10.0, self.settings.heartbeat_timeout),
                    credentials=credentials,
                )
            )
        except (SpawnError, SealError, OSError) as exc:
            async with self.store.transaction() as uow:
                current = await _local(uow, worker_id)
                if current is not None:
                    await uow.session.delete(current)
                uow.emit(
                    WorkerSpawnFailed(
                        job_id=row.job_id,
                        worker_id=worker_id,
                        host_id=self.host_id,
                        attempt=row.attempt,
                        error=str(exc),
                    ),
                    stream=job_stream(row.job_id),
                    user_id=row.user_id,
                    correlation_id=row.job_id,
                )
            return
        self.live[worker_id] = worker
        if epoch != self._epoch:  # fenced while it was spawning: it must not run
            worker.end_reason = "fenced"
            worker.signal(signal.SIGKILL)

        async def record_start(uow: UnitOfWork) -> Any:
            current = (await (await uow.connection()).execute(RECORD_PID, {
                "started_worker": worker_id, "started_pid": worker.pid})).first()
            started = (WorkerRestarted if row.attempt > 0 else WorkerSpawned)(
                job_id=row.job_id,
                worker_id=worker_id,
                host_id=self.host_id,
                pid=worker.pid,
                attempt=row.attempt,
            )
            uow.emit(
                started,
                stream=job_stream(row.job_id),
                user_id=row.user_id,
                correlation_id=row.job_id,
            )
            return current

        # Its lines (its first heartbeat) are relayed while the start commits; its reports and
        # its exit, queued later, commit with the start or after it.
        recording = self.store.queue_grouped(record_start)
        self.background(self._supervise(worker), f"supervise-{worker_id}")
        current = await recording
        if current is not None and current.stopping:
            self.background(self._stop(worker, current.flatten), f"stop-{worker_id}")

    async def _stop(self, worker: WorkerProcess, flatten: bool) -> None:
        worker.end_reason = worker.end_reason or "stop"
        worker.send(protocol.Stop(flatten=flatten))
        try:
            await asyncio.wait_for(worker.wait(), timeout=self.settings.stop_grace)
        except TimeoutError:
            await worker.terminate(grace=self.settings.stop_grace)

    async def _supervise(self, worker: WorkerProcess) -> None:
        """Relay the worker's lines until its channel closes, then report how it ended. Its
        reports are queued for commit in order as they are read, not each awaited before the
        next line is read, so the lines that came together commit together (group commit); at
        most `REPORTS_IN_FLIGHT` wait."""
        committing: deque[tuple[Message, asyncio.Future[None]]] = deque()
        try:
            while line := await worker.next_line():
                if (report := self._relay(worker, line)) is not None:
                    committing.append(report)
                while committing and (committing[0][1].done()
                                      or len(committing) > REPORTS_IN_FLIGHT):
                    await _committed(worker, *committing.popleft())
        except protocol.ProtocolViolation as violation:
            log.warning("worker %s broke the control protocol (%s): killed", worker.worker_id,
                        violation)
            worker.violated(violation)
        except (ConnectionError, OSError):
            pass
        for report in committing:
            await _committed(worker, *report)
        code = await worker.wait()
        worker.writer.close()
        self.live.pop(worker.worker_id, None)
        await self._report_exit(worker, code)

    def _relay(
        self, worker: WorkerProcess, raw: bytes
    ) -> tuple[Message, asyncio.Future[None]] | None:
        """Relays one line of the worker's; a report is returned with its commit, queued.
        Raises ProtocolViolation for a line a worker may not send."""
        line = protocol.decode(raw)
        if isinstance(line, protocol.Beat):
            self.beats.add(
                WorkerHeartbeat(
                    job_id=worker.job_id,
                    worker_id=worker.worker_id,
                    host_id=self.host_id,
                    pid=worker.pid,
                    at=line.at,
                    positions=line.positions,
                ),
                first=not worker.beating,
            )
            worker.beating = True
        elif isinstance(line, protocol.Report):
            payload = line.payload | {"job_id": worker.job_id, "worker_id": worker.worker_id}
            try:
                event = model_for(line.event).model_validate(payload)
            except ValidationError:
                raise protocol.ProtocolViolation(f"an invalid {line.event} report") from None

            async def record_report(uow: UnitOfWork) -> None:
                uow.emit(
                    event,
                    stream=job_stream(worker.job_id),
                    user_id=worker.user_id,
                    correlation_id=worker.job_id,
                )

            return event, self.store.queue_grouped(record_report)
        else:
            raise protocol.ProtocolViolation(
                f"a {line.type} line where only heartbeats and reports may come")
        return None

    async def _report_exit(self, worker: WorkerProcess, code: int | None) -> None:
        if code == protocol.EXIT_LEASE_LAPSED:  # it fenced itself: our lease ran out
            worker.end_reason = "fenced"
        if code is None:  # an orphan of a lost fork-server: gone, but nobody could reap it
            how = "exited (code unknown)"
        elif code >= 0:
            how = f"exited with code {code}"
        else:
            how = f"killed by {signal.Signals(-code).name}"

        async def record_exit(uow: UnitOfWork) -> None:
            row = await _local(uow, worker.worker_id)
            if row is None or row.attempt != worker.attempt:
                return
            await uow.session.delete(row)
            ids = dict(job_id=worker.job_id, worker_id=worker.worker_id)
            where = dict(
                stream=job_stream(worker.job_id),
                user_id=worker.user_id,
                correlation_id=worker.job_id,
            )
            if row.stopping:
                uow.emit(
                    WorkerStopped(**ids, reason=row.stop_reason or "stopped", exit_code=code),
                    **where,
                )
                return
            reason, detail = {
                "heartbeat": (
                    CrashReason.HEARTBEAT_TIMEOUT,
                    f"no heartbeat for {self.settings.heartbeat_timeout:g}s; killed",
                ),
                "fenced": (CrashReason.HOST_LOST, f"fenced on host {self.host_id}; {how}"),
                "drain": (CrashReason.HOST_LOST, f"host {self.host_id} shut down; {how}"),
                "protocol": (CrashReason.EXITED,
                             f"broke the control protocol ({worker.end_detail}); {how}"),
            }.get(
                worker.end_reason or "",
                (CrashReason.EXITED, "" if code is not None and code >= 0 else how),
            )
            uow.emit(
                WorkerCrashed(
                    **ids,
                    host_id=self.host_id,
                    attempt=worker.attempt,
                    reason=reason,
                    exit_code=code,
                    detail=detail,
                ),
                **where,
            )

        await self.store.grouped(record_exit)

    # ------------------------------------------------------------------ host liveness

    async def _recover(self) -> None:
        """After a restart: workers of the previous run are gone (they exit when their host's
        channel closes); report them. A dispatch committed but never started is reported as a
        failed spawn rather than started now: while we were down the scheduler may have moved
        it elsewhere, and it decides (a stale report is ignored there)."""
        async with self.store.transaction() as uow:
            rows = (await uow.session.exec(select(LocalWorker))).all()
            for row in rows:
                if row.pid is None:
                    await uow.session.delete(row)
                    uow.emit(
                        WorkerSpawnFailed(job_id=row.job_id, worker_id=row.worker_id,
                                          host_id=self.host_id, attempt=row.attempt,
                                          error=f"worker-host {self.host_id} restarted before "
                                                "starting it"),
                        stream=job_stream(row.job_id), user_id=row.user_id,
                        correlation_id=row.job_id,
                    )
                    continue
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(row.pid, signal.SIGKILL)
                await uow.session.delete(row)
                ids = dict(job_id=row.job_id, worker_id=row.worker_id)
                where = dict(
                    stream=job_stream(row.job_id), user_id=row.user_id, correlation_id=row.job_id
                )
                if row.stopping:
                    uow.emit(
                        WorkerStopped(**ids, reason=f"{row.stop_reason} (host restarted)"), **where
                    )
                else:
                    uow.emit(
                        WorkerCrashed(
                            **ids,
                            host_id=self.host_id,
                            attempt=row.attempt,
                            reason=CrashReason.EXITED,
                            detail=f"worker-host {self.host_id} restarted",
                        ),
                        **where,
                    )

    async def _heartbeat_loop(self) -> None:
        """Our heartbeat every interval. Beats do not wait for each other's confirms: a slow
        broker delays lease renewals but does not thin them out."""
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                task = asyncio.create_task(self._beat())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                await asyncio.sleep(self.settings.host_heartbeat_interval)
        finally:
            for task in in_flight:
                task.cancel()

    async def _beat(self) -> None:
        """One heartbeat, published with a confirm, which renews our lease from the moment the
        beat was sent (and our workers' with it). A lease that lapsed before the confirm came
        fences first: the monitor may have declared us lost meanwhile."""
        beat = HostHeartbeat(host_id=self.host_id, capacity=self.capacity,
                             workers=tuple(self.live), at=now())
        sent = time.monotonic()
        try:
            await asyncio.wait_for(self.bus.send_telemetry(beat), timeout=self.settings.host_lease)
        except Exception as exc:
            log.warning("host heartbeat not confirmed (%s)", type(exc).__name__)
            return
        if (took := time.monotonic() - sent) > 1.0:
            log.warning("host heartbeat confirmed after %.1fs", took)
        if self._lease_renewed is not None and sent <= self._lease_renewed:
            return  # a later beat was confirmed first
        if self._lease_expired():
            self._fence("the lease lapsed before this heartbeat was confirmed")
        self._lease_renewed = sent
        lease = protocol.Lease(until=self._lease_until())
        for worker in self.live.values():
            worker.send(lease)

    async def _send_telemetry(self, message: Any) -> None:
        try:
            await self.bus.send_telemetry(message)
        except Exception as exc:  # telemetry is best effort; the lease loop fences if it lasts
            log.debug("telemetry not sent: %s", exc)

    async def _lease_loop(self) -> None:
        """Fence when the broker has confirmed none of our heartbeats for longer than the lease:
        a dropped connection and a silent network cut alike (the AMQP connection may take far
        longer to notice the latter)."""
        while True:
            await asyncio.sleep(self.settings.lease_check_interval)
            if self._lease_expired() and self.live:
                silent = time.monotonic() - (self._lease_renewed or 0.0)
                log.warning("broker unreachable for %.1fs: fencing %d workers", silent,
                            len(self.live))
                self._fence("broker unreachable past the lease")

    def _online(self) -> HostOnline:
        return HostOnline(host_id=self.host_id, capacity=self.capacity,
                          hostname=socket.gethostname(), pid=os.getpid(),
                          incarnation=self.incarnation)

    def _lease_expired(self) -> bool:
        if self._lease_renewed is None:  # not started yet: nothing to fence
            return False
        return time.monotonic() - self._lease_renewed > self.settings.host_lease

    def _lease_until(self) -> float:
        """When our lease runs out (`time.monotonic()`), as our workers are told; a full lease
        from now while we are still starting (connected, no heartbeat sent yet)."""
        return (self._lease_renewed or time.monotonic()) + self.settings.host_lease

    def _fence(self, why: str) -> None:
        self._epoch += 1
        for worker in list(self.live.values()):
            worker.end_reason = "fenced"
            worker.signal(signal.SIGKILL)
            worker.signal(signal.SIGCONT)
        log.info("fenced: %s", why)

    async def _wait_all_exited(self, timeout: float) -> None:
        processes = [w.wait() for w in self.live.values()]
        if not processes:
            return
        _, pending = await asyncio.wait(
            [asyncio.ensure_future(p) for p in processes], timeout=timeout
        )
        if pending:
            for worker in list(self.live.values()):
                worker.signal(signal.SIGKILL)
            await asyncio.wait(pending, timeout=2.0)
        await asyncio.sleep(0.1)  # let the supervisors record the exits
