"""Start throughput, request → first heartbeat, and density, through the real system.

One worker-host (fork-server spawner, spawn concurrency 32) under `LocalSystem`; `hold` workers
on the paper broker, started over HTTP by enterprise users (50 workers each). A queue of our own
on `runner.telemetry` sees every worker heartbeat the host relays (`WorkerHeartbeats`).

(a) start throughput: N workers requested at once; workers/s from the first JobDispatched to the
    last WorkerSpawned in the event log (target ≥ 100/s).
(b) request → first heartbeat: one start at a time; from sending the HTTP request to the first
    heartbeat of that worker on the bus, p50 (target ≤ 50 ms).
(c) density: D idle workers on the host; unique memory (USS) per worker (≤ 8 MiB), every worker's
    last heartbeat younger than 2 × the interval, the idle system's CPU (% of one core, by
    process on stderr; the broker shown, not counted), and `GET /runner/status` p99 over 50 calls
    (≤ 50 ms; until the answer is wholly received, not parsed) three ways: the admin's whole
    status (every worker), one page of it (`limit`), and a user's own; beside them the whole
    status straight from the monitor over the bus.

    .venv/bin/python -m bench.density [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aio_pika
import orjson
from rich.console import Console

from bench import floor
from bench.http import BenchClient
from bench.report import (
    SHARED_BROKER,
    Figure,
    at_least,
    at_most,
    broker_process,
    by_process,
    cpu_seconds,
    percentile,
    scratch_with_services_log,
    table,
    without_broker,
)
from bench.spawn import MiB, uss
from events.queries import StatusQuery
from events.routing import TELEMETRY_EXCHANGE
from services.bus import AmqpBus
from services.cli.client import GatewayClient
from services.cli.local import LocalSystem
from services.settings import Settings
from services.topology import MONITOR_RPC

PER_USER = 50  # the enterprise limit
HEARTBEAT = 5.0  # seconds: the contract's default interval
IN_FLIGHT = 64  # concurrent start requests
STATUS_CALLS = 50
STATUS_PAGE = 100  # workers per page in the paged status figure
BODY = {
    "brokerId": "paper",
    "credentials": {"apiKey": "bench-key", "apiSecret": "bench-secret"},
    "config": {"name": "bench", "type": "hold", "parameters": {"amount": 1}},
}


def processes(local: LocalSystem) -> dict[str, int]:
    """The system's processes by name: its services, the host's fork-server, the broker."""
    pids = {child.label: child.process.pid for child in local.supervisor.children}
    for label, pid in list(pids.items()):
        if label.startswith("worker-host"):
            with open(f"/proc/{pid}/task/{pid}/children") as children:
                pids["fork-server"] = int(children.read().split()[0])
    return pids | broker_process()


class Heartbeats:
    """Arrival times (monotonic) of each worker's first and latest heartbeat on the bus."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[float]] = {}

    async def listen(self, amqp_url: str) -> aio_pika.abc.AbstractConnection:
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(TELEMETRY_EXCHANGE, routing_key="#")
        await queue.consume(self._on_message, no_ack=True)
        return connection

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.type == "WorkerHeartbeats":
            beats = json.loads(message.body)["beats"]
        elif message.type == "WorkerHeartbeat":
            beats = [json.loads(message.body)]
        else:
            return
        at = time.monotonic()
        for beat in beats:
            worker_id = beat["worker_id"]
            self.first.setdefault(worker_id, at)
            self.last[worker_id] = at
            waiter = self._waiters.pop(worker_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(at)

    async def first_of(self, worker_id: str, timeout: float = 30.0) -> float:
        if worker_id in self.first:
            return self.first[worker_id]
        waiter = self._waiters.setdefault(worker_id, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(waiter, timeout)

    async def all_beating(self, worker_ids: list[str], timeout: float) -> None:
        await asyncio.wait_for(
            asyncio.gather(*(self.first_of(w, timeout) for w in worker_ids)), timeout
        )


async def start_many(clients: list[BenchClient], first: int, count: int) -> list[str]:
    """`count` starts, `IN_FLIGHT` at a time; worker n belongs to user n // PER_USER."""
    limit = asyncio.Semaphore(IN_FLIGHT)

    async def one(n: int) -> str:
        async with limit:
            reply = await clients[n // PER_USER].start(strategyId=f"s-{n}", **BODY)
            return reply["workerId"]

    return list(await asyncio.gather(*(one(n) for n in range(first, first + count))))


async def run(quick: bool) -> list[Figure]:
    burst, singles, density = (60, 10, 100) if quick else (300, 30, 1000)
    env = {
        "RUNNER_RATE_LIMIT": "0",  # capacity measured here, not the per-user limit
        "RUNNER_HOST_CAPACITY": str(density + 50),
        "RUNNER_WORKER_UIDS": f"60000-{60000 + density + 49}",  # a uid per worker, to capacity
        "RUNNER_MAX_SYSTEM_WORKERS": str(density + 100),
        "RUNNER_SPAWN_CONCURRENCY": "32",
        "RUNNER_SPAWN_MODE": "fork",
        "RUNNER_HEARTBEAT_INTERVAL": str(HEARTBEAT),
    }
    console = Console(stderr=True)
    console.print(f"(floor) the messages of {burst} starts alone, through raw aio-pika")
    floor_rate, floor_cpu = await floor.burst(Settings().amqp_url, burst)
    with scratch_with_services_log() as (tmp, log):
        local = LocalSystem(tmp / "var", env=env, log=log, quiet=True)
        await local.start()
        beats = Heartbeats()
        connection = await beats.listen(local.amqp_url)
        admin, clients = BenchClient(local.admin), list[BenchClient]()
        try:
            clients += [
                BenchClient((await local.user(tier="enterprise"))[1])
                for _ in range((density + PER_USER - 1) // PER_USER)
            ]
            # Warm: a worker running, so the fork-server's preload (once per host) is not
            # counted per start; the floor's processes are ready before it is timed.
            warm = BenchClient((await local.user(tier="enterprise"))[1])
            clients.append(warm)  # after the users of the starts: `start_many` never picks it
            await beats.first_of((await warm.start(strategyId="warm-up", **BODY))["workerId"])
            # (a) a burst of starts
            console.print(f"(a) starting {burst} workers at once")
            pids = processes(local)
            cpu_before = cpu_by_process(pids, [])
            requested = time.perf_counter()
            burst_ids = await start_many(clients, 0, burst)
            answered = time.perf_counter() - requested
            await beats.all_beating(burst_ids, timeout=60 + burst / 10)
            cpu_after = cpu_by_process(pids, (await worker_pids(local.admin)).values())
            cpu_ms = {name: (cpu_after[name] - cpu_before[name]) * 1000 / burst
                      for name in cpu_after}
            events = [e for e in await local.log() if e.payload.get("worker_id") in burst_ids]
            dispatched = min(e.occurred_at for e in events if e.type == "JobDispatched")
            spawned = max(e.occurred_at for e in events if e.type == "WorkerSpawned")
            rate = burst / (spawned - dispatched).total_seconds()

            # (b) one start at a time, request → first heartbeat, once the burst has settled
            await asyncio.sleep(3)
            console.print(f"(b) {singles} starts one at a time")
            latencies = []
            for n in range(burst, burst + singles):
                sent = time.monotonic()
                reply = await clients[n // PER_USER].start(strategyId=f"s-{n}", **BODY)
                latencies.append((await beats.first_of(reply["workerId"]) - sent) * 1000)
                await asyncio.sleep(0.05)

            # (c) fill the host, let it idle, then look
            rest = density - burst - singles
            console.print(f"(c) {rest} more workers, to {density}")
            rest_ids = await start_many(clients, burst + singles, rest)
            await beats.all_beating(rest_ids, timeout=60 + rest / 10)
            await asyncio.sleep(HEARTBEAT)  # the last spawns settle
            idle_pids, idle_started = (await worker_pids(local.admin)).values(), time.monotonic()
            idle_before = cpu_by_process(pids, idle_pids)
            await asyncio.sleep(HEARTBEAT + 1)
            idle_after = cpu_by_process(pids, idle_pids)
            idle_pct = {name: (idle_after[name] - idle_before[name]) * 100
                        / (time.monotonic() - idle_started) for name in idle_after}
            looked = time.monotonic()
            ages = [looked - at for at in beats.last.values()]
            late = sum(age > 2 * HEARTBEAT for age in ages)
            missed = sum(e.type == "HeartbeatMissed" for e in await local.log())
            status_ms = await timed(lambda: answer(admin))
            whole = await answer(admin)
            parsing = time.perf_counter()
            status = orjson.loads(whole)
            parse_ms = (time.perf_counter() - parsing) * 1000
            rpc_ms = await monitor_status_ms(local.amqp_url)
            page_ms = await timed(lambda: answer(admin, limit=STATUS_PAGE))
            own_ms = await timed(lambda: answer(clients[0]))  # a user's own: PER_USER workers
            running = [e["worker"] for e in status["workers"] if e["worker"]["status"] == "running"]
            memory = [uss(w["pid"]) / MiB for w in running]
        finally:
            for client in (admin, *clients):
                await client.close()
            await connection.close()
            console.print("stopping the system")
            await local.stop()

    p50_beat = statistics.median(latencies)
    system_cpu = without_broker(cpu_ms)
    console.print(f"CPU ms per worker started: {by_process(cpu_ms)}")
    console.print(f"the messages alone, CPU ms per start: {by_process(floor_cpu)}")
    idle_cpu = without_broker(idle_pct)
    console.print(f"idle CPU, % of one core: {by_process(idle_pct)}")
    spawn_side = sum(v for k, v in cpu_ms.items() if k.startswith(("worker", "fork-server")))
    p99_status = percentile(status_ms, 99)
    per_worker = statistics.mean(memory)
    return [
        Figure(
            "start throughput, first JobDispatched → last WorkerSpawned",
            rate,
            "workers/s",
            reference=floor_rate,
            reference_name="its messages alone, raw aio-pika",
            target="≥ 100/s",
            met=at_least(rate, 100),
            note=f"{burst} workers; HTTP answered all in {answered:.1f}s",
        ),
        Figure(
            "CPU per worker started, all our processes",
            system_cpu,
            "ms",
            reference=without_broker(floor_cpu),
            reference_name="its messages alone",
            higher_is_better=False,
            note=f"+ {cpu_ms.get(SHARED_BROKER, 0):.1f} in the broker (alone: "
                 f"{floor_cpu[SHARED_BROKER]:.1f}); on 2 cores ≤ {2000 / system_cpu:.0f} starts/s; "
                 "by process on stderr",
        ),
        Figure(
            "  of which worker-host + fork-server + worker",
            spawn_side,
            "ms",
            higher_is_better=False,
            note=f"on 1 core ≤ {1000 / spawn_side:.0f} starts/s",
        ),
        Figure(
            "request → first heartbeat, p50",
            p50_beat,
            "ms",
            target="≤ 50 ms",
            met=at_most(p50_beat, 50),
            higher_is_better=False,
            note=f"n={singles}, p99 {percentile(latencies, 99):.0f} ms",
        ),
        Figure(
            f"USS per idle worker, {len(running)} on one host",
            per_worker,
            "MiB",
            target="≤ 8 MiB",
            met=at_most(per_worker, 8) and len(running) >= density,
            higher_is_better=False,
            note=f"max {max(memory):.1f} MiB",
        ),
        Figure(
            f"oldest last heartbeat, {len(ages)} workers",
            max(ages),
            "s",
            target=f"< {2 * HEARTBEAT:g} s (2 × interval)",
            met=late == 0 and missed == 0 and len(ages) >= density,
            higher_is_better=False,
            note=f"{late} late, {missed} HeartbeatMissed",
        ),
        Figure(
            f"CPU of the idle system, {len(idle_pids)} workers, all our processes",
            idle_cpu,
            "% of a core",
            higher_is_better=False,
            note="by process on stderr",
        ),
        Figure(
            f"GET /runner/status (admin, {len(status['workers'])} workers), p99",
            p99_status,
            "ms",
            target="≤ 50 ms",
            met=at_most(p99_status, 50),
            higher_is_better=False,
            note=f"p50 {statistics.median(status_ms):.0f} ms; parsing it here adds {parse_ms:.0f}",
        ),
        Figure(
            f"GET /runner/status?limit={STATUS_PAGE} (admin, a page of the {density}), p99",
            percentile(page_ms, 99),
            "ms",
            target="≤ 50 ms",
            met=at_most(percentile(page_ms, 99), 50),
            higher_is_better=False,
            note=f"p50 {statistics.median(page_ms):.0f} ms",
        ),
        Figure(
            f"GET /runner/status (a user's own {PER_USER}, among {density}), p99",
            percentile(own_ms, 99),
            "ms",
            target="≤ 50 ms",
            met=at_most(percentile(own_ms, 99), 50),
            higher_is_better=False,
            note=f"p50 {statistics.median(own_ms):.0f} ms",
        ),
        Figure(
            "  the whole admin status from the monitor's RPC (as sent, no HTTP, no parse), p99",
            percentile(rpc_ms, 99),
            "ms",
            higher_is_better=False,
            note=f"p50 {statistics.median(rpc_ms):.0f} ms",
        ),
    ]


def cpu_by_process(pids: dict[str, int], workers: Iterable[int]) -> dict[str, float]:
    """CPU seconds used so far by each of the system's processes, and by `workers` together."""
    used = {name: cpu_seconds(pid) for name, pid in pids.items()}
    return used | {"workers": sum(cpu_seconds(pid) for pid in workers)}


async def worker_pids(client: GatewayClient) -> dict[str, int]:
    """Each running worker's process, by worker id."""
    return {e["worker"]["workerId"]: e["worker"]["pid"]
            for e in (await client.status())["workers"] if e["worker"]["pid"]}


async def answer(client: BenchClient, **params: Any) -> bytes:
    """One status answer, wholly received: inflated, not parsed (what a client makes of it is
    its own cost)."""
    return await client.get("/runner/status", **params)


async def timed(call: Callable[[], Awaitable[Any]]) -> list[float]:
    """Milliseconds of each of `STATUS_CALLS` calls, one after another. This process's garbage
    collector waits meanwhile: its heap holds the whole benchmark's state (every heartbeat seen,
    the event log read back), and a full collection of it inside a call would be timed as the
    system's answer."""
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(STATUS_CALLS):
            started = time.perf_counter()
            await call()
            times.append((time.perf_counter() - started) * 1000)
    finally:
        gc.enable()
    return times


async def monitor_status_ms(amqp_url: str) -> list[float]:
    """The admin status straight from the monitor over the bus, as the gateway asks for it."""
    bus = AmqpBus(Settings(amqp_url=amqp_url), "bench")
    await bus.start()
    try:
        return await timed(
            lambda: bus.request_encoded(MONITOR_RPC, StatusQuery()))
    finally:
        await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    figures = asyncio.run(run(parser.parse_args().quick))
    Console().print(table(figures, "start throughput and density (one worker-host)"))


if __name__ == "__main__":
    main()
