"""Event-log ingest: publish with confirms → recorded in the monitor's log, beside the raw limits.

Every reference is measured in this run, on a fresh vhost of the local broker (deleted after):

- raw aio-pika: persistent publishes with pipelined confirms (batches of 1,000) into a quorum
  queue bound like `monitor.log`, drained by one consumer process acking each message; and one
  awaited confirm at a time (latency p50);
- raw SQLite appends of the log's own rows, 1,000 per transaction: aiosqlite `executemany`,
  SQLAlchemy Core `insert().executemany`, SQLModel ORM add/commit.

Ours: N envelopes (trading events, as a busy system mostly logs) published with
`Bus.publish_many` in batches of 1,000 while a real monitor (`runner service monitor`, its own
process, like the raw consumer) records them; the rate runs from the first publish until its log
holds N rows. Our single `Bus.publish` confirm latency and `EventLog.append` rate go beside their
references.

    .venv/bin/python -m bench.ingest [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from rich.console import Console
from yarl import URL

from bench.report import Figure, at_least, table
from events import Envelope, OrderFilled, PositionChanged, TradeClosed
from events.queries import HostsQuery
from services.bus import AmqpBus
from services.cli.local import rabbitmqctl
from services.monitor.log import EventLog, event_log
from services.settings import Settings
from services.topology import MONITOR_RPC

BATCH = 1000
RAW_EXCHANGE = "bench.raw"
RAW_QUEUE = "bench.raw"


# ------------------------------------------------------------------------------ workload


def trading_envelopes(n: int, seed: int = 1) -> list[Envelope]:
    """`n` fills, position changes and closed trades of many workers (what a busy log holds)."""
    rnd = random.Random(seed)
    out: list[Envelope] = []
    while len(out) < n:
        k = rnd.randrange(2000)
        ids = {"job_id": f"job-{k}", "worker_id": f"w-{k}"}
        instrument = rnd.choice(("BTC-PERPETUAL", "ETH-PERPETUAL", "SOL-PERPETUAL"))
        amount, price = round(rnd.uniform(0.01, 5), 4), round(rnd.uniform(10, 60000), 2)
        messages = [
            OrderFilled(**ids, order_id=uuid.uuid4().hex[:12], instrument=instrument,
                        side="buy", amount=amount, price=price),
            PositionChanged(**ids, instrument=instrument, side="long", amount=amount,
                            entry_price=price),
        ]
        if rnd.random() < 0.5:
            messages.append(TradeClosed(**ids, instrument=instrument, side="long", amount=amount,
                                        entry_price=price, exit_price=price * 1.01,
                                        realized_pnl=round(rnd.uniform(-50, 50), 2)))
        out += [Envelope.wrap(m, stream=f"job-{ids['job_id']}", user_id=f"user-{k % 300}",
                              correlation_id=ids["job_id"]) for m in messages]
    return out[:n]


# ------------------------------------------------------------------------------ broker helpers


@contextlib.contextmanager
def fresh_vhost(base_url: str) -> Any:
    """A new vhost on the local broker for one measurement; yields its AMQP URL."""
    name = f"bench-{uuid.uuid4().hex[:10]}"
    url = URL(base_url)
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, url.user or "guest", ".*", ".*", ".*")
    try:
        yield str(url.with_path(f"/{name}"))
    finally:
        with contextlib.suppress(RuntimeError):
            rabbitmqctl("delete_vhost", name)


def _raw_consumer(amqp_url: str, n: int, prefetch: int, pipe: Any) -> None:
    """A separate process: consume `n` messages, ack each, report when the last was acked."""

    async def consume() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.get_queue(RAW_QUEUE)
            done = asyncio.get_running_loop().create_future()
            seen = 0

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal seen
                await message.ack()
                seen += 1
                if seen == n and not done.done():
                    done.set_result(time.monotonic())

            await queue.consume(on_message)
            pipe.send("ready")
            pipe.send(await done)

    asyncio.run(consume())


async def raw_references(amqp_url: str, body: bytes, n: int, latency_samples: int
                         ) -> tuple[float, float]:
    """(pipelined-confirm msgs/s end to end, awaited-confirm p50 ms) with plain aio-pika."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(RAW_EXCHANGE, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        queue = await channel.declare_queue(RAW_QUEUE, durable=True,
                                            arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, "#")

        def message() -> aio_pika.Message:
            return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                    content_type="application/json")

        latencies = []
        for _ in range(latency_samples):
            start = time.perf_counter()
            await exchange.publish(message(), routing_key="trading.OrderFilled")
            latencies.append((time.perf_counter() - start) * 1000)
        await queue.purge()

        parent, child = multiprocessing.get_context("spawn").Pipe()
        consumer = multiprocessing.get_context("spawn").Process(
            target=_raw_consumer, args=(amqp_url, n, 2 * BATCH, child), daemon=True)
        consumer.start()
        try:
            await _receive(parent, 60)  # "ready"
            start = time.monotonic()
            for first in range(0, n, BATCH):
                await asyncio.gather(*(exchange.publish(message(), routing_key="trading.x")
                                       for _ in range(min(BATCH, n - first))))
            finished = await _receive(parent, 120)
        finally:
            consumer.join(10)
            if consumer.is_alive():
                consumer.kill()
    return n / (finished - start), statistics.median(latencies)


async def _receive(pipe: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not pipe.poll():
        if time.monotonic() > deadline:
            raise TimeoutError("the raw consumer did not answer")
        await asyncio.sleep(0.005)
    return pipe.recv()


# ------------------------------------------------------------------------------ ours


@contextlib.asynccontextmanager
async def monitor_process(amqp_url: str, data_dir: Path, log_file: Path
                          ) -> AsyncIterator[Callable[[], int]]:
    """`runner service monitor` on the vhost, ready; yields a function counting its log rows."""
    env = {**os.environ, "RUNNER_AMQP_URL": amqp_url, "RUNNER_DATA_DIR": str(data_dir)}
    with log_file.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "service", "monitor"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    database = data_dir / "monitor.db"

    def rows() -> int:
        try:
            with contextlib.closing(sqlite3.connect(database, timeout=10)) as db:
                return db.execute("SELECT coalesce(max(position), 0) FROM event_log").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    bus = AmqpBus(Settings(amqp_url=amqp_url, data_dir=data_dir), "bench")
    await bus.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the monitor exited (see {log_file})")
            try:
                await bus.request(MONITOR_RPC, HostsQuery(), timeout=0.5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        yield rows
    finally:
        await bus.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def our_ingest(amqp_url: str, envelopes: list[Envelope], latency_samples: int,
                     work: Path) -> tuple[float, float]:
    """(publish → recorded msgs/s through the monitor, `Bus.publish` awaited confirm p50 ms)."""
    n = len(envelopes)
    async with monitor_process(amqp_url, work / "var", work / "monitor.log") as rows:
        bus = AmqpBus(Settings(amqp_url=amqp_url, data_dir=work / "var"), "bench")
        await bus.start()
        try:
            latencies = []
            for envelope in trading_envelopes(latency_samples, seed=2):
                start = time.perf_counter()
                await bus.publish(envelope)
                latencies.append((time.perf_counter() - start) * 1000)
            deadline = time.monotonic() + 30
            while rows() < latency_samples and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            base = rows()
            start = time.monotonic()
            for first in range(0, n, BATCH):
                await bus.publish_many(envelopes[first : first + BATCH])
            deadline = time.monotonic() + 120
            while rows() < base + n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {rows() - base} of {n} recorded")
                await asyncio.sleep(0.01)
            elapsed = time.monotonic() - start
        finally:
            await bus.close()
    return n / elapsed, statistics.median(latencies)


# ------------------------------------------------------------------------------ SQLite references


def log_rows(envelopes: list[Envelope]) -> list[dict[str, Any]]:
    """The rows `EventLog.append` would write for `envelopes` (hashes stubbed: a pure insert)."""
    now = datetime.now(UTC)
    return [{
        "position": i + 1, "event_id": str(e.event_id), "type": e.type, "version": e.version,
        "kind": "event", "stream": e.stream, "user_id": e.user_id,
        "correlation_id": e.correlation_id,
        "causation_id": str(e.causation_id) if e.causation_id else None,
        "occurred_at": e.occurred_at, "recorded_at": now, "envelope": e.model_dump_json(),
        "prev_hash": "0" * 64, "hash": "1" * 64,
    } for i, e in enumerate(envelopes)]


async def sqlite_references(envelopes: list[Envelope], work: Path, batch: int = BATCH
                            ) -> dict[str, float]:
    """Rows/s appending the log's own rows, `batch` per transaction: raw aiosqlite, Core, ORM."""
    import aiosqlite
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlmodel import Field, SQLModel
    from sqlmodel.ext.asyncio.session import AsyncSession

    rows = log_rows(envelopes)
    results: dict[str, float] = {}

    async def fresh(name: str) -> EventLog:
        target = EventLog.at(f"sqlite:///{work / name}")
        await target.open()
        return target

    target = await fresh("core.db")
    start = time.perf_counter()
    for first in range(0, len(rows), batch):
        async with target.engine.begin() as conn:
            await conn.execute(event_log.insert(), rows[first : first + batch])
    results["core"] = len(rows) / (time.perf_counter() - start)
    await target.close()

    await (await fresh("aiosqlite.db")).close()  # same table and indexes
    columns = list(rows[0])
    values = [tuple(str(r[c]) if isinstance(r[c], datetime) else r[c] for c in columns)
              for r in rows]
    insert = (f"INSERT INTO event_log ({', '.join(columns)}) "
              f"VALUES ({', '.join('?' * len(columns))})")
    async with aiosqlite.connect(work / "aiosqlite.db") as db:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        start = time.perf_counter()
        for first in range(0, len(values), batch):
            await db.executemany(insert, values[first : first + batch])
            await db.commit()
        results["aiosqlite"] = len(values) / (time.perf_counter() - start)

    class OrmRow(SQLModel, table=True):
        __tablename__ = f"orm_{uuid.uuid4().hex[:8]}"
        position: int = Field(primary_key=True)
        event_id: str = Field(unique=True)
        type: str = Field(index=True)
        version: int
        kind: str
        stream: str = Field(index=True)
        user_id: str | None = Field(default=None, index=True)
        correlation_id: str | None = None
        causation_id: str | None = None
        occurred_at: datetime = Field(index=True)
        recorded_at: datetime
        envelope: str
        prev_hash: str
        hash: str

    orm = create_async_engine(f"sqlite+aiosqlite:///{work / 'orm.db'}")  # the ORM's async path
    async with orm.begin() as conn:
        await conn.run_sync(OrmRow.metadata.create_all, tables=[OrmRow.__table__])
    orm_rows = rows[: max(len(rows) // 5, batch)]  # the ORM is slow: a fifth is plenty
    start = time.perf_counter()
    for first in range(0, len(orm_rows), batch):
        async with AsyncSession(orm) as session, session.begin():
            session.add_all(OrmRow(**r) for r in orm_rows[first : first + batch])
    results["orm"] = len(orm_rows) / (time.perf_counter() - start)
    await orm.dispose()
    return results


async def our_append(envelopes: list[Envelope], work: Path, batch: int = BATCH) -> float:
    """Events/s through `EventLog.append`, `batch` per call (hash chain, duplicate check)."""
    target = EventLog.at(f"sqlite:///{work / 'ours.db'}")
    await target.open()
    start = time.perf_counter()
    for first in range(0, len(envelopes), batch):
        await target.append(envelopes[first : first + batch])
    rate = len(envelopes) / (time.perf_counter() - start)
    await target.close()
    return rate


# ------------------------------------------------------------------------------ the benchmark


async def run(quick: bool) -> list[Figure]:
    n = 5_000 if quick else 50_000
    samples = 200 if quick else 1000
    envelopes = trading_envelopes(n)
    body = envelopes[0].to_json()
    base = Settings().amqp_url
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with fresh_vhost(base) as url:
            raw_rate, raw_p50 = await raw_references(url, body, n, samples)
        with fresh_vhost(base) as url:
            ours_rate, ours_p50 = await our_ingest(url, envelopes, samples, work)
        stored = envelopes[: max(n, 20_000)]
        sqlite = await sqlite_references(stored, work)
        append = await our_append(stored, work)
    share = ours_rate / raw_rate
    figures = [
        Figure("event log ingest (Bus.publish_many → monitor's log)", ours_rate, "msg/s",
               raw_rate, "raw aio-pika pipelined confirms ×1000, 1 consumer acking",
               "≥ 70 % of reference", at_least(share, 0.70),
               note=f"{n:,} msgs, monitor as its own process"),
        Figure("one publish, confirm awaited (p50)", ours_p50, "ms", raw_p50,
               "raw aio-pika", higher_is_better=False),
    ]
    for key, label in (("core", "SQLAlchemy Core executemany ×1000"),
                       ("aiosqlite", "raw aiosqlite executemany ×1000"),
                       ("orm", "SQLModel ORM add/commit ×1000")):
        figures.append(Figure("EventLog.append ×1000 (hash chain, dedup)", append, "rows/s",
                              sqlite[key], label))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 messages instead of 50,000")
    args = parser.parse_args()
    figures = asyncio.run(run(args.quick))
    Console(width=200).print(table(figures, "event log ingest"))


if __name__ == "__main__":
    main()
