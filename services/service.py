"""The shell every service shares: bus + own store + outbox relay + durable timers + shutdown.

Each handler runs as `handler(uow, envelope, message)` inside `Store.processing_many`: at most
once per message in effect, its state change and emitted messages committed together, the ack
after the commit. A `single_active` service (entitlement, scheduler, monitor) may run as replicas
on PostgreSQL: only the holder of its lease (`services.standby`) runs, the others stand by.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from events import Envelope, Message
from services import logs
from services.bus import AmqpBus, Bus, Delivery, poison_reason
from services.settings import Settings
from services.standby import Lease, lease_for
from services.store import Backfill, OutboxRelay, Store, UnitOfWork
from services.topology import QueueSpec

log = logging.getLogger(__name__)

MessageHandler = Callable[[UnitOfWork, Envelope, Any], Awaitable[Any]]  # the result is ignored
TimerHandler = Callable[[UnitOfWork, str, dict[str, Any]], Awaitable[None]]

INBOX_BATCH = 100  # deliveries handled in one transaction at most
LEASE_LOST_EXIT = 75  # exit status of a replica that lost its lease (EX_TEMPFAIL: restart it)


def now() -> datetime:
    return datetime.now(UTC)


class Service:
    """Base of the stateful services (entitlement, scheduler, worker-host, monitor)."""

    name = "service"
    tables: tuple[Any, ...] = ()
    backfills: tuple[Backfill, ...] = ()  # run at every start, after the schema upgrade
    single_active = False  # one replica active at a time, the others standing by (module doc)

    def __init__(self, settings: Settings, *, bus: Bus | None = None,
                 store: Store | None = None,
                 clock: Callable[[], datetime] = now,
                 single_active: bool | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.bus: Bus = bus or AmqpBus(settings, self.name)
        self.store = store or Store(settings.database_for(self.store_name), self.tables,
                                    self.backfills)
        self.outbox = OutboxRelay(self.store, self.bus)
        one = self.single_active if single_active is None else single_active
        self.replica_lease: Lease | None = lease_for(self.store.url, self.name) if one else None
        self.active = False  # holds the lease, or needs none
        self.on_lease_lost: Callable[[], None] = lambda: os._exit(LEASE_LOST_EXIT)
        self.timer_handlers: dict[str, TimerHandler] = {}
        self._timer_wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()  # running background tasks
        self._keeps_ledger = False  # whether it handles an inbox (`handle`)
        self.ready = False  # started and consuming, until it begins to stop (readiness)
        self.store.on_commit.append(
            lambda uow: self._timer_wake.set() if uow.timers_changed else None
        )

    @property
    def store_name(self) -> str:
        return self.name

    @property
    def busy(self) -> bool:
        """Whether committed work waits to be published or grouped work to be committed."""
        return self.outbox.lag > 0 or self.store.busy

    def handle(
        self,
        spec: QueueSpec,
        handlers: Mapping[type[Message], MessageHandler],
        *,
        then: Callable[[UnitOfWork], Awaitable[None]] | None = None,
        then_skip: Collection[type[Message]] = (),
    ) -> None:
        """Consume `spec`, dispatching by message type (other types are acked and ignored):
        what has arrived (up to `INBOX_BATCH`) is handled in order in one transaction, with
        `then(uow)` last unless every message is of a `then_skip` type, and acked once it
        commits. If a handler raises, the batch is handled again one message per transaction,
        so only the failing message is retried (and dead-lettered in the end)."""

        async def on_batch(deliveries: list[Delivery]) -> dict[int, str]:
            mine = {i: d for i, d in enumerate(deliveries) if type(d.message) in handlers}
            if not mine:
                return {}
            try:
                await self._handle_together(spec.name, handlers, list(mine.values()), then,
                                            then_skip)
                return {}
            except Exception as exc:
                if len(mine) == 1:
                    return dict.fromkeys(mine, poison_reason(exc))
                log.warning("%s: a batch of %d failed (%s); handling them one by one",
                            spec.name, len(mine), poison_reason(exc))
            failed: dict[int, str] = {}
            for index, delivery in mine.items():
                try:
                    await self._handle_together(spec.name, handlers, [delivery], then, then_skip)
                except Exception as exc:
                    failed[index] = poison_reason(exc)
            return failed

        self.bus.consume_batches(spec, on_batch, max_batch=INBOX_BATCH)
        self._keeps_ledger = True

    async def _handle_together(
        self,
        consumer: str,
        handlers: Mapping[type[Message], MessageHandler],
        deliveries: list[Delivery],
        then: Callable[[UnitOfWork], Awaitable[None]] | None,
        then_skip: Collection[type[Message]] = (),
    ) -> None:
        """Run each delivery's handler, in order, in one transaction (skipping those already
        processed), then `then`; raises if any of them does, and then nothing is committed."""
        async with self.store.processing_many(
            [d.envelope for d in deliveries], consumer
        ) as (uow, fresh):
            for position in fresh:
                envelope, message = deliveries[position].envelope, deliveries[position].message
                uow.cause = envelope
                logs.correlation.set(envelope.correlation_id)  # on this handler's log lines
                await handlers[type(message)](uow, envelope, message)
            logs.correlation.set(None)
            if then is not None and any(
                    type(deliveries[position].message) not in then_skip for position in fresh):
                uow.cause = None
                await then(uow)

    def background(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` until it ends (a failure is logged) or the service stops. The task is held
        only while it runs: a host starts two or three per worker, over a life of many workers."""
        task = asyncio.create_task(_logged(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # `_logged` logged it: asyncio need not again ("never retrieved")

    async def setup(self) -> None:
        """Subclasses register handlers here (called before the bus starts)."""

    async def started(self) -> None:
        """Subclasses start their own loops here (called once consuming)."""

    async def stand_by(self) -> None:
        """Return once this replica is the active one: at once without a lease or when no other
        replica holds it; otherwise when the active one is gone."""
        if self.active or self.replica_lease is None:
            self.active = True
            return
        await self.store.db.ensure_exists()
        loop = asyncio.get_running_loop()
        since, said = loop.time(), ""
        while True:
            try:
                if await self.replica_lease.acquire():
                    break
                if said != "standing":  # one line per change, not one per attempt
                    log.info("%s: standing by (another replica is active)", self.name)
                    said = "standing"
            except Exception as exc:
                if said != "unreachable":
                    log.warning("%s: cannot take the lease (%s: %s); trying again", self.name,
                                type(exc).__name__, exc)
                    said = "unreachable"
            await asyncio.sleep(self.settings.lease_poll)
        self.active = True
        log.info("%s: active (lease taken after %.2fs)", self.name, loop.time() - since)

    async def _keep_lease(self) -> None:
        """Check the lease every `lease_poll` seconds; if its connection broke, take it again
        within `lease_grace` seconds or exit (`on_lease_lost`): a standby may be active."""
        assert self.replica_lease is not None
        while True:
            await asyncio.sleep(self.settings.lease_poll)
            if await self.replica_lease.held():
                continue
            log.warning("%s: the lease's database connection broke; taking the lease again",
                        self.name)
            why = await self._take_lease_again()
            if why is None:
                log.info("%s: lease taken again", self.name)
                continue
            self.active = False
            log.error("%s: lost the lease (%s); exiting so that a standby takes over",
                      self.name, why)
            self.on_lease_lost()
            return

    async def _take_lease_again(self) -> str | None:
        """None once the lease is ours again (within `lease_grace`), else why it is not."""
        assert self.replica_lease is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.lease_grace
        while True:
            try:
                if await self.replica_lease.acquire():
                    return None
                return "another replica holds it"
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
            if loop.time() >= deadline:
                return why
            await asyncio.sleep(self.settings.lease_poll)

    async def start(self) -> None:
        await self.stand_by()
        await self.store.open()
        await self.setup()
        await self.bus.start()
        self.outbox.start()
        if self.timer_handlers:
            self.background(self._run_timers(), f"{self.name}-timers")
        if self.replica_lease is not None:
            self.background(self._keep_lease(), f"{self.name}-lease")
        if self._keeps_ledger:  # not the monitor (its log is its ledger) nor the gateway
            self.background(self._forget_old_processed(), f"{self.name}-ledger-retention")
        await self.started()
        self.ready = True
        log.info("%s started", self.name)

    async def drain(self) -> None:
        """Subclasses wind down their own work here (consumers stopped, bus still up)."""

    async def stop(self) -> None:
        """Graceful: stop consuming and finish in-flight handlers, drain, publish the committed
        outbox, then disconnect."""
        self.ready = False
        await self.bus.stop_consuming()
        await self.drain()
        while self._tasks:  # a task may start another as it ends
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._tasks.difference_update(tasks)  # an ended task's `_forget` may not have run
        await self.outbox.stop()
        await self.bus.close()
        await self.store.close()
        if self.replica_lease is not None:  # last: a standby starts once all is published
            await self.replica_lease.release()
            self.active = False
        log.info("%s stopped", self.name)

    async def run(self) -> None:
        """Run until SIGINT/SIGTERM, then shut down gracefully."""
        if self.settings.nice:
            os.nice(self.settings.nice)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if not await self._until_active(stop):
            return
        await self.start()
        _freeze_startup_heap()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def _until_active(self, stop: asyncio.Event) -> bool:
        """`stand_by`, unless `stop` is set first (then False, and no lease is kept)."""
        standing = asyncio.create_task(self.stand_by(), name=f"{self.name}-standby")
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({standing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if standing.done():
            standing.result()  # its failure, if any, is the start's
            return True
        standing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await standing
        if self.replica_lease is not None:
            await self.replica_lease.release()
        await self.store.close()
        log.info("%s stopped (was standing by)", self.name)
        return False

    async def _forget_old_processed(self) -> None:
        """Every `ledger_prune_every` seconds, the first time one interval after the start (after
        the redeliveries a restart brings), forget the processed ids older than the retention,
        and what `forget_ended` forgets: the store holds what one retention brings in, not every
        message ever handled."""
        while True:
            await asyncio.sleep(self.settings.ledger_prune_every)
            before = time.time() - self.settings.ledger_retention
            try:
                forgotten = await self.store.forget_processed(before)
                ended = await self.forget_ended(before)
            except Exception:
                log.exception("forgetting old processed ids or ended rows failed; trying again "
                              "later")
                continue
            if forgotten or ended:
                log.info("forgot %d processed ids and %d ended rows older than %gs", forgotten,
                         ended, self.settings.ledger_retention)

    async def forget_ended(self, before: float) -> int:
        """Subclasses delete what ended before `before` (Unix seconds) and is kept only to
        recognise a late message about it, as the ledger does; returns how many."""
        return 0

    async def _run_timers(self) -> None:
        while True:
            row = await self.store.next_timer()
            delay = 3600.0 if row is None else (row.due_at - self.clock()).total_seconds()
            if delay > 0:
                self._timer_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._timer_wake.wait(), timeout=min(delay, 3600.0))
                continue
            assert row is not None
            try:
                await self._fire(row.key)
            except Exception:
                log.exception("timer %s failed; retrying shortly", row.key)
                await asyncio.sleep(1.0)

    async def _fire(self, key: str) -> None:
        """Run a due timer's handler and delete the timer, in one transaction."""
        async with self.store.transaction() as uow:
            current = await self.store.take_timer(uow, key, self.clock())
            if current is None:
                return
            handler = self.timer_handlers.get(current.kind)
            if handler is None:
                log.error("no handler for timer kind %r (dropped %s)", current.kind, key)
                return
            await handler(uow, key, json.loads(current.data))


def _freeze_startup_heap() -> None:
    """Keep what the imports and the start made (living as long as the process) out of the
    cyclic collector's sight, so a full collection walks only what came after."""
    gc.collect()
    gc.freeze()


async def _logged(coro: Awaitable[Any], name: str) -> Any:
    try:
        return await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("background task %s failed", name)
        raise
