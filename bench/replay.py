"""Replay: the event log → projections, the way `runner replay` and a monitor restart do it.

Builds a log of 1,000,000 events (quick: 100,000) with a realistic mix (hundreds of users,
thousands of workers, their lifecycle, mostly trading: OrderFilled / PositionChanged /
TradeClosed) through `EventLog.append` in large batches (the rate of a build of its first
200,000 events goes beside SQLAlchemy Core `executemany` of the same rows and beside the peer's,
on the same events), then replays it with `services.monitor.replay`
(the code of `runner replay`: a log this long, the quick run's too, is folded in partitions,
one process per core)
and checks the result equals folding the generated envelopes.
Then a monitor start from a snapshot made 1 % before the end (the snapshot, then the tail).

Peer, same number of events, same run: the `eventsourcing` library's SQLite application, events
recorded with batched saves, replayed through its notification log reader + mapper + a fold.

    .venv/bin/python -m bench.replay [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing
import random
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from bench.report import Figure, at_least, at_most, table
from events import (
    CrashReason,
    EntitlementUpgraded,
    Envelope,
    HostOnline,
    JobAccepted,
    JobDispatched,
    JobQueued,
    JobRequested,
    Message,
    OrderFilled,
    PositionChanged,
    PositionsFlattened,
    StopRequested,
    StrategyConfig,
    TradeClosed,
    WorkerCrashed,
    WorkerRestarted,
    WorkerRestartScheduled,
    WorkerSpawned,
    WorkerStopped,
)
from projections import fold
from services.monitor.log import EventLog, event_log
from services.monitor.replay import PARTITION_FROM, PARTITIONS, replay
from services.monitor.snapshot import Snapshots

T = TypeVar("T")
APPEND_BATCH = 10_000
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CONFIG = StrategyConfig(name="Scalper", type="scalping", parameters={"window": 20})
INSTRUMENTS = ("BTC-PERPETUAL", "ETH-PERPETUAL", "SOL-PERPETUAL")


def history(n: int, seed: int = 7, step: timedelta = timedelta(milliseconds=1)) -> list[Envelope]:
    """`n` envelopes of a busy system: workers start, trade, crash and restart, stop; `step`
    apart."""
    rnd = random.Random(seed)
    out: list[Envelope] = []
    users = [f"user-{i}" for i in range(max(10, n // 2000))]
    running: list[tuple[str, str, str, dict[str, str]]] = []

    def add(message: Message, stream: str, user: str | None = None, job: str | None = None
            ) -> None:
        out.append(Envelope.wrap(message, stream=stream, user_id=user, correlation_id=job,
                                 occurred_at=T0 + step * len(out)))

    for h in range(4):
        add(HostOnline(host_id=f"h-{h}", capacity=500, hostname=f"box-{h}", pid=100 + h),
            f"host-h-{h}")
    for user in users:
        add(EntitlementUpgraded(tier="pro", max_workers=10, expires_at=T0 + timedelta(days=30)),
            f"user-{user}", user)
    while len(out) < n:
        dice = rnd.random()
        if dice < 0.03 or not running:
            k = len(out)
            user, job, worker = rnd.choice(users), f"job-{k}", f"w-{k}"
            ids = {"job_id": job, "worker_id": worker}
            spec = {"strategy_id": f"s-{k % 5}", "broker_id": "paper",
                    "credentials_sealed": "gAAAAB" + "x" * 80, "config": CONFIG}
            host = f"h-{k % 4}"
            for message in (JobRequested(**ids, **spec),
                            JobAccepted(**ids, tier="pro", max_workers=10, in_use=1),
                            JobQueued(**ids), JobDispatched(**ids, **spec, host_id=host),
                            WorkerSpawned(**ids, host_id=host, pid=1000 + k % 30000)):
                add(message, f"job-{job}", user, job)
            running.append((user, job, worker, {}))
        elif dice < 0.035:
            user, job, worker, held = running.pop(rnd.randrange(len(running)))
            ids = {"job_id": job, "worker_id": worker}
            for message in (StopRequested(**ids, host_id="h-0", flatten=True, reason="by user"),
                            PositionsFlattened(**ids, count=len(held), realized_pnl=1.5),
                            WorkerStopped(**ids, reason="stopped by user", exit_code=0)):
                add(message, f"job-{job}", user, job)
        elif dice < 0.04:
            user, job, worker, _ = rnd.choice(running)
            ids = {"job_id": job, "worker_id": worker}
            for message in (WorkerCrashed(**ids, host_id="h-1", reason=CrashReason.EXITED,
                                          exit_code=1),
                            WorkerRestartScheduled(**ids, attempt=1, delay=1.0, due_at=T0),
                            WorkerRestarted(**ids, host_id="h-1", pid=99, attempt=1)):
                add(message, f"job-{job}", user, job)
        else:
            user, job, worker, held = rnd.choice(running)
            ids = {"job_id": job, "worker_id": worker}
            instrument = rnd.choice(INSTRUMENTS)
            amount, price = round(rnd.uniform(0.01, 5), 4), round(rnd.uniform(10, 60000), 2)
            order = {"order_id": uuid.uuid4().hex[:12], "instrument": instrument,
                     "amount": amount, "price": price}
            if instrument in held:
                side = held.pop(instrument)
                messages: tuple[Message, ...] = (
                    OrderFilled(**ids, **order, side="sell" if side == "long" else "buy"),
                    PositionChanged(**ids, instrument=instrument, side=side, amount=0.0,
                                    entry_price=price),
                    TradeClosed(**ids, instrument=instrument, side=side, amount=amount,
                                entry_price=price, exit_price=round(price * 1.01, 2),
                                realized_pnl=round(rnd.uniform(-50, 50), 2)))
            else:
                side = held[instrument] = rnd.choice(("long", "short"))
                messages = (
                    OrderFilled(**ids, **order, side="buy" if side == "long" else "sell"),
                    PositionChanged(**ids, instrument=instrument, side=side, amount=amount,
                                    entry_price=price))
            for message in messages:
                add(message, f"job-{job}", user, job)
    return out[:n]


async def build_log(path: Path, envelopes: list[Envelope]) -> float:
    """Events/s appending `envelopes` through `EventLog.append`, `APPEND_BATCH` per call."""
    target = EventLog.at(f"sqlite:///{path}")
    await target.open()
    start = time.perf_counter()
    for first in range(0, len(envelopes), APPEND_BATCH):
        await target.append(envelopes[first : first + APPEND_BATCH])
    rate = len(envelopes) / (time.perf_counter() - start)
    await target.close()
    return rate


async def core_reference(path: Path, envelopes: list[Envelope]) -> float:
    """Rows/s of SQLAlchemy Core `executemany` of the log's rows (no hashing, no dedup)."""
    from bench.ingest import log_rows

    rows = log_rows(envelopes)
    target = EventLog.at(f"sqlite:///{path}")
    await target.open()
    start = time.perf_counter()
    for first in range(0, len(rows), APPEND_BATCH):
        async with target.engine.begin() as conn:
            await conn.execute(event_log.insert(), rows[first : first + APPEND_BATCH])
    rate = len(rows) / (time.perf_counter() - start)
    await target.close()
    return rate


async def restart_from_snapshot(path: Path, tail: int) -> tuple[float, float, int, Any]:
    """(seconds to save, seconds to start, snapshot bytes, folded state): a snapshot `tail`
    events before the end of the log, then a monitor start from it (`latest` + the tail)."""
    source = EventLog.at(f"sqlite:///{path}", must_exist=True)
    snapshots = Snapshots(source.engine, source)
    try:
        await snapshots.open()
        head = (await source.head()).position
        folded = await replay(source, until_position=head - tail)
        start = time.perf_counter()
        size = await snapshots.save(folded)
        saved = time.perf_counter() - start
        del folded
        gc.collect()
        start = time.perf_counter()
        resumed = await replay(source, start=await snapshots.latest())
        return saved, time.perf_counter() - start, size, resumed
    finally:
        await source.close()


async def our_replay(path: Path) -> tuple[float, Any]:
    """(seconds, folded state) replaying the whole log as `runner replay` does, in partitions;
    a fallback to one process (it warns) fails the benchmark."""
    source = EventLog.at(f"sqlite:///{path}", must_exist=True)
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append  # type: ignore[method-assign]
    logging.getLogger(replay.__module__).addHandler(handler)
    try:
        start = time.perf_counter()
        folded = await replay(source)
        seconds = time.perf_counter() - start
    finally:
        logging.getLogger(replay.__module__).removeHandler(handler)
        await source.close()
    assert not warnings, f"the replay fell back to one process: {warnings[0].getMessage()}"
    return seconds, folded


async def in_fresh_process(measure: Callable[..., T | Awaitable[T]], *args: Any) -> T:
    """`measure(*args)` (run to its end if a coroutine) in a new Python process, as `runner
    replay` and a monitor start run. Not in this one: it holds the generated history, over four
    million live objects, and allocating among them made the same fold two to three times as
    slow (bench/RESULTS.md). The peer is measured the same way."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return await asyncio.wrap_future(pool.submit(_run, measure, *args))


def _run(measure: Callable[..., T | Awaitable[T]], *args: Any) -> T:
    result = measure(*args)
    return asyncio.run(result) if asyncio.iscoroutine(result) else result  # type: ignore[return-value]


# ------------------------------------------------------------------------------ the peer


def eventsourcing_peer(path: Path, envelopes: list[Envelope]) -> tuple[float, float]:
    """(record events/s, replay events/s) with the `eventsourcing` library's SQLite app."""
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event
    from eventsourcing.system import NotificationLogReader

    class Worker(Aggregate):
        @event("Registered")
        def __init__(self, name: str) -> None:
            self.name = name

        @event("Recorded")
        def record(self, type_name: str, payload: dict[str, Any]) -> None:
            """One of our envelopes, as this worker's event."""

    app = Application(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite",
                           "SQLITE_DBNAME": str(path), "IS_SNAPSHOTTING_ENABLED": "n"})
    workers: dict[str, Worker] = {}
    start = time.perf_counter()
    recorded = 0
    for first in range(0, len(envelopes), 1000):
        touched: dict[str, Worker] = {}
        for envelope in envelopes[first : first + 1000]:
            key = envelope.stream
            worker = workers.get(key)
            if worker is None:
                worker = workers[key] = Worker(name=key)
                recorded -= 1  # the creation event is the library's, not one of ours
            worker.record(type_name=envelope.type, payload=envelope.payload)
            touched[key] = worker
        app.save(*touched.values())
    recorded += len(envelopes) + len(workers)
    record_rate = len(envelopes) / (time.perf_counter() - start)

    # A fold as light as it gets: per-type counts and open positions per worker.
    reader = NotificationLogReader(app.notification_log, section_size=1000)
    app.notification_log.section_size = 1000
    start = time.perf_counter()
    counts: dict[str, int] = {}
    positions: dict[tuple[str, str], float] = {}
    folded = 0
    for notifications in reader.select(start=1):
        for notification in notifications:
            domain_event = app.mapper.to_domain_event(notification)
            type_name = getattr(domain_event, "type_name", "Registered")
            counts[type_name] = counts.get(type_name, 0) + 1
            if type_name == "PositionChanged":
                payload = domain_event.payload
                positions[(payload["worker_id"], payload["instrument"])] = payload["amount"]
            folded += 1
    replay_rate = folded / (time.perf_counter() - start)
    app.close()
    return record_rate, replay_rate


# ------------------------------------------------------------------------------ the benchmark


async def run(quick: bool) -> list[Figure]:
    n = 100_000 if quick else 1_000_000
    assert n >= PARTITION_FROM, "the quick run too folds in partitions, so that CI runs that path"
    envelopes = history(n)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reference_rows = envelopes[: min(n, 200_000)]  # the references' and the peer's events
        core_rate = await core_reference(work / "core.db", reference_rows)
        same_rate = await build_log(work / "same.db", reference_rows)
        append_rate = await build_log(work / "monitor.db", envelopes)
        seconds, folded = await in_fresh_process(our_replay, work / "monitor.db")
        replay_rate = n / seconds
        assert folded.state == fold(envelopes), "replay differs from folding the envelopes"
        del folded
        tail = n // 100
        saved, restart, size, resumed = await in_fresh_process(
            restart_from_snapshot, work / "monitor.db", tail)
        assert resumed.state == fold(envelopes), "snapshot + tail differs from the full fold"
        peer_events = envelopes[: min(n, 200_000)]
        peer_record, peer_replay = await in_fresh_process(
            eventsourcing_peer, work / "peer.db", peer_events)
    budget = 5.0 * n / 1_000_000
    return [
        Figure("log build: EventLog.append ×10,000 (hash chain, dedup)", same_rate,
               "events/s", core_rate, "SQLAlchemy Core executemany ×10,000, same rows",
               note=f"{len(reference_rows):,} events"),
        Figure("log build vs peer", same_rate, "events/s", peer_record,
               "eventsourcing SQLite app, batched saves ×1000", "≥ the peer",
               at_least(same_rate, peer_record), note=f"both on {len(peer_events):,} events"),
        Figure(f"log build of all {n:,} events", append_rate, "events/s",
               note="a log growing to its full size: its unique event_id index grows with it"),
        Figure("replay (log → projections), events/s", replay_rate, "events/s",
               peer_replay, "eventsourcing notification log reader + fold",
               "≥ 300,000 events/s", at_least(replay_rate, 300_000),
               note=f"{n:,} events, folded by {PARTITIONS} process{'es' * (PARTITIONS > 1)}"),
        Figure(f"replay of {n:,} events, total", seconds, "s", target=(
            "< 5 s for 1,000,000" if n == 1_000_000
            else f"< {budget:g} s (5 s per 1,000,000)"),
            met=at_most(seconds, budget), higher_is_better=False),
        Figure(f"monitor start: snapshot at {n - tail:,} + {tail:,} events", restart, "s",
               seconds, "replay of the whole log", higher_is_better=False,
               note=f"snapshot {size / 2**20:.1f} MiB, saved in {saved * 1000:.0f} ms"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 events instead of 1M")
    args = parser.parse_args()
    figures = asyncio.run(run(args.quick))
    Console(width=200).print(table(figures, "event log replay"))


if __name__ == "__main__":
    main()
