"""The start path under a steady load: `POST /runner/start` answered (p50/p99) at 50 requests/s.

Each request starts a real `hold` worker through the whole system; its answer waits for the
entitlement decision (gateway → entitlement → gateway), as the contract says.
Requests go through a lean client (`bench.http`): the figure is the gateway's answer, not the
CLI's client's own cost. Beside it, the same pace through the start path's messaging floor
(`bench.floor`): each start answered over raw aio-pika RPC, its two events published after.
Then the same starts on a system whose host has no room, so that no worker is spawned: the
path's own latency, without the CPU the starts' workers take from it.

    .venv/bin/python -m bench.start_path [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from rich.console import Console

from bench import floor
from bench.http import BenchClient
from bench.report import Figure, at_most, percentile, scratch_with_services_log, table
from services.cli.local import LocalSystem
from services.settings import Settings

RATE = 50.0  # requests per second
PER_USER = 50  # the enterprise limit


async def run(quick: bool) -> list[Figure]:
    seconds = 2.0 if quick else 6.0
    count = int(RATE * seconds)
    alone = await floor.paced(Settings().amqp_url, RATE, count)
    latencies = await paced_starts(count, capacity=count + 10)
    unspawned = await paced_starts(count, capacity=0)
    p50, p99 = statistics.median(latencies), percentile(latencies, 99)
    return [
        Figure(
            f"POST /runner/start at {RATE:g}/s, p50",
            p50,
            "ms",
            reference=statistics.median(alone),
            reference_name="its messages alone, raw aio-pika",
            target="≤ 10 ms",
            met=at_most(p50, 10),
            higher_is_better=False,
            note=f"n={len(latencies)}",
        ),
        Figure(
            f"POST /runner/start at {RATE:g}/s, p99",
            p99,
            "ms",
            reference=percentile(alone, 99),
            reference_name="its messages alone",
            target="≤ 30 ms",
            met=at_most(p99, 30),
            higher_is_better=False,
        ),
        Figure(
            "  the same, no worker spawned (a host of capacity 0), p50",
            statistics.median(unspawned),
            "ms",
            reference=p50,
            reference_name="with the workers spawned",
            higher_is_better=False,
            note=f"p99 {percentile(unspawned, 99):.1f} ms against {p99:.1f}: what the "
                 "starts' own work costs the path",
        ),
    ]


async def paced_starts(count: int, capacity: int) -> list[float]:
    """ms to each answer of `count` starts at `RATE`, on a system whose one worker-host takes
    `capacity` workers (0: every job stays queued, no worker is spawned)."""
    env = {
        "RUNNER_RATE_LIMIT": "0",  # capacity measured here, not the per-user limit
        "RUNNER_HOST_CAPACITY": str(capacity),
        "RUNNER_SPAWN_CONCURRENCY": "16",
        "RUNNER_HEARTBEAT_INTERVAL": "5",
    }
    with scratch_with_services_log() as (tmp, log):
        local = LocalSystem(tmp / "var", env=env, log=log)
        await local.start()
        clients: list[BenchClient] = []
        try:
            for _ in range((count + PER_USER - 1) // PER_USER):
                clients.append(BenchClient((await local.user(tier="enterprise"))[1]))
            body = {
                "brokerId": "paper",
                "credentials": {"apiKey": "bench", "apiSecret": "bench"},
                "config": {"name": "bench", "type": "hold", "parameters": {"amount": 1}},
            }
            await clients[0].start(strategyId="warm-up", **body)  # connections, caches
            latencies: list[float] = []

            async def one(n: int) -> None:
                started = time.perf_counter()
                await clients[n // PER_USER].start(strategyId=f"s-{n}", **body)
                latencies.append((time.perf_counter() - started) * 1000)

            tasks, begin = [], time.perf_counter()
            for n in range(1, count):
                await asyncio.sleep(max(0.0, begin + n / RATE - time.perf_counter()))
                tasks.append(asyncio.create_task(one(n)))
            await asyncio.gather(*tasks)
        finally:
            for client in clients:
                await client.close()
            await local.stop()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    figures = asyncio.run(run(parser.parse_args().quick))
    Console().print(table(figures, "start path"))


if __name__ == "__main__":
    main()
