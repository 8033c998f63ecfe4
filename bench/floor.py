"""The start path's messaging floor: a start's messages, and nothing else, through raw aio-pika.

The reference for `bench.density`'s start throughput and CPU per start (`burst`), and for
`bench.start_path`'s `POST` at 50/s (`paced`). Four processes stand in for our services,
on a fresh vhost, with the same queues (quorum, persistent, publisher confirms) and the same
batching as ours (every delivery that has arrived handled as one batch, its publishes' confirms
awaited together, then one `multiple` ack), and no other work: no decoding beyond the one field
the log reads, no database, no worker process.

- the driver (the gateway): N starts, 64 in flight, each an RPC over direct reply-to;
- "entitlement": answers each RPC, then publishes JobRequested and JobAccepted (ours answers
  once its decision is committed, and its outbox publishes them after);
- "scheduler" (JobRequested, JobAccepted, WorkerSpawned): on JobAccepted publishes JobQueued
  and JobDispatched;
- "host" (JobDispatched): publishes WorkerSpawned, OrderFilled and PositionChanged (a `hold`
  worker's start);
- "log" (everything): reads each message's type and time.

Measured like ours: starts/s from the first JobDispatched to the last WorkerSpawned, and the CPU
per start of the four processes and the driver (the broker's beside it); or, at a steady pace,
each start's time to its answer.

    .venv/bin/python -m bench.floor [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import orjson

from bench.ingest import _receive, fresh_vhost
from bench.report import SHARED_BROKER, broker_process, by_process, cpu_seconds
from services.settings import Settings

IN_FLIGHT = 64
EXCHANGE = "floor.events"
RPC_QUEUE = "floor.entitlement.rpc"
# Roughly the size of each of our envelopes (a job's request and dispatch carry its config and
# its sealed credentials).
SIZES = {
    "JobRequested": 1200,
    "JobAccepted": 450,
    "JobQueued": 450,
    "JobDispatched": 1200,
    "WorkerSpawned": 500,
    "OrderFilled": 550,
    "PositionChanged": 500,
}
# queue: (its bindings, what a delivery of each type makes it publish)
ROLES: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "scheduler": (("JobRequested", "JobAccepted", "WorkerSpawned"),
                  {"JobAccepted": ("JobQueued", "JobDispatched")}),
    "host": (("JobDispatched",),
             {"JobDispatched": ("WorkerSpawned", "OrderFilled", "PositionChanged")}),
    "log": (("#",), {}),
}


def body(kind: str, job_id: str) -> bytes:
    head = orjson.dumps({"type": kind, "job_id": job_id, "at": time.monotonic(), "pad": ""})
    return head[:-2] + b"x" * max(0, SIZES[kind] - len(head)) + b'"}'


async def publish_all(exchange: aio_pika.abc.AbstractExchange, kinds: list[tuple[str, str]]
                      ) -> None:
    """Publish (type, job id) pairs persistently; their confirms awaited together."""
    await asyncio.gather(*(
        exchange.publish(aio_pika.Message(body(kind, job_id), type=kind,
                                          delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                         routing_key=kind)
        for kind, job_id in kinds))


def role(amqp_url: str, name: str, starts: int, pipe: Any) -> None:
    """A separate process standing in for one service (see the module doc)."""
    import uvloop  # as our services run

    uvloop.run(_role(amqp_url, name, starts, pipe))


async def _role(amqp_url: str, name: str, starts: int, pipe: Any) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        publishing = await connection.channel(publisher_confirms=True)
        exchange = await publishing.get_exchange(EXCHANGE)
        consuming = await connection.channel(publisher_confirms=False)
        await consuming.set_qos(prefetch_count=1000)
        arrived: list[aio_pika.abc.AbstractIncomingMessage] = []
        ready = asyncio.Event()
        done = asyncio.get_running_loop().create_future()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived.append(message)
            ready.set()

        if name == "entitlement":
            async def answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                job_id = message.correlation_id or ""
                await publishing.default_exchange.publish(
                    aio_pika.Message(b'{"accepted":true}', correlation_id=job_id),
                    routing_key=message.reply_to or "")
                await publish_all(exchange, [("JobRequested", job_id), ("JobAccepted", job_id)])

            queue = await consuming.get_queue(RPC_QUEUE)
            await queue.consume(answer, no_ack=True)
            pipe.send(os.getpid())
            await asyncio.Event().wait()  # until it is killed

        queue = await consuming.get_queue(f"floor.{name}")
        await queue.consume(on_message)
        pipe.send(os.getpid())
        makes = ROLES[name][1]
        first_dispatched, spawned = float("inf"), 0
        while not done.done():
            await ready.wait()
            ready.clear()
            batch, arrived[:] = arrived[:], []
            if name == "log":
                for message in batch:
                    if message.type in ("JobDispatched", "WorkerSpawned"):
                        at = orjson.loads(message.body)["at"]
                        if message.type == "JobDispatched":
                            first_dispatched = min(first_dispatched, at)
                        else:
                            spawned += 1
                            if spawned == starts:
                                done.set_result((first_dispatched, at))
            else:
                await publish_all(exchange, [
                    (kind, orjson.loads(message.body)["job_id"])
                    for message in batch for kind in makes.get(message.type or "", ())])
            await batch[-1].ack(multiple=True)
        pipe.send(await done)


async def declare(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        await channel.declare_queue(RPC_QUEUE, durable=False,
                                    arguments={"x-message-ttl": 30_000})
        for name, (bindings, _) in ROLES.items():
            queue = await channel.declare_queue(f"floor.{name}", durable=True,
                                                arguments={"x-queue-type": "quorum"})
            for key in bindings:
                await queue.bind(exchange, key)


class Driver:
    """The gateway's part: starts as RPCs over direct reply-to, each timed to its answer."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self.channel = channel
        self.answers: dict[str, asyncio.Future[bytes]] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def connected(cls, amqp_url: str) -> AsyncIterator[Driver]:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            driver = cls(await connection.channel())
            replies = await driver.channel.get_queue("amq.rabbitmq.reply-to")
            await replies.consume(driver.on_reply, no_ack=True)
            yield driver

    async def on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        waiter = self.answers.pop(message.correlation_id or "", None)
        if waiter is not None:
            waiter.set_result(message.body)

    async def start(self) -> float:
        """One start; ms until its answer."""
        job_id, started = uuid.uuid4().hex, time.perf_counter()
        self.answers[job_id] = asyncio.get_running_loop().create_future()
        await self.channel.default_exchange.publish(
            aio_pika.Message(orjson.dumps({"job_id": job_id}), correlation_id=job_id,
                             reply_to="amq.rabbitmq.reply-to"),
            routing_key=RPC_QUEUE)
        await asyncio.wait_for(self.answers[job_id], 30)
        return (time.perf_counter() - started) * 1000


@contextlib.asynccontextmanager
async def standing_in(amqp_url: str, starts: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The four processes on a fresh vhost, ready for `starts` starts: yields the vhost's URL
    and each process's pipe (the log's says when the last WorkerSpawned was logged)."""
    context = multiprocessing.get_context("spawn")
    with fresh_vhost(amqp_url) as url:
        await declare(url)
        pipes, procs = {}, []
        for name in ("entitlement", *ROLES):
            ours, theirs = context.Pipe()
            proc = context.Process(target=role, args=(url, name, starts, theirs), daemon=True)
            proc.start()
            pipes[name], procs = ours, [*procs, proc]
        try:
            pids = {name: await _receive(pipe, 60) for name, pipe in pipes.items()}
            yield url, {name: (pipes[name], pid) for name, pid in pids.items()}
        finally:
            for proc in procs:  # stand-ins holding nothing: only the log's stops by itself
                proc.kill()
                proc.join()


async def burst(amqp_url: str, starts: int) -> tuple[float, dict[str, float]]:
    """`starts` starts at once (`IN_FLIGHT` at a time): (starts/s from the first JobDispatched
    to the last WorkerSpawned, CPU ms per start by process, the broker's included)."""
    async with standing_in(amqp_url, starts) as (url, roles):
        pids = {name: pid for name, (_, pid) in roles.items()} | broker_process()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        driven = time.process_time()
        async with Driver.connected(url) as driver:
            limit = asyncio.Semaphore(IN_FLIGHT)

            async def one() -> None:
                async with limit:
                    await driver.start()

            await asyncio.gather(*(one() for _ in range(starts)))
        first_dispatched, last_spawned = await _receive(roles["log"][0], 60 + starts / 10)
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        cpu["driver (gateway)"] = time.process_time() - driven
    per_start = {name: seconds * 1000 / starts for name, seconds in cpu.items()}
    per_start.setdefault(SHARED_BROKER, 0.0)
    return starts / (last_spawned - first_dispatched), per_start


async def paced(amqp_url: str, rate: float, starts: int) -> list[float]:
    """`starts` starts at `rate` a second: each one's ms until its answer."""
    async with standing_in(amqp_url, starts) as (url, roles), Driver.connected(url) as driver:
        tasks, begin = [], time.perf_counter()
        for n in range(starts):
            await asyncio.sleep(max(0.0, begin + n / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(driver.start()))
        latencies = await asyncio.gather(*tasks)
        await _receive(roles["log"][0], 60)
    return list(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    starts = 60 if parser.parse_args().quick else 300
    rate, cpu = asyncio.run(burst(Settings().amqp_url, starts))
    print(f"{starts} starts' messages alone: {rate:.0f} starts/s; CPU ms per start: "
          f"{by_process(cpu)}")


if __name__ == "__main__":
    main()
