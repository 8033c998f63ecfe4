"""Detection and restart latency on the real system.

`kill -9` a running worker, then read the log: process death → WorkerCrashed (detection), and
process death → WorkerRestarted (a new process has said hello: running again). Beside it,
the same drill on supervisord (bench.supervisord), in the same run.

    .venv/bin/python -m bench.recovery [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
from datetime import UTC, datetime

from rich.console import Console

from bench.report import Figure, at_most, percentile, scratch_with_services_log, table
from bench.supervisord import restart_latencies
from services.cli.local import LocalSystem


async def measure(
    kills: int, workers: int, backoff: float, console: Console
) -> dict[str, list[float]]:
    env = {
        "RUNNER_RATE_LIMIT": "0",  # capacity measured here, not the per-user limit
        "RUNNER_RESTART_BACKOFF": str(backoff),
        "RUNNER_RESTART_BACKOFF_MAX": str(backoff),
        "RUNNER_MAX_RESTARTS": "1000000",
        "RUNNER_CIRCUIT_FAILURES": "1000000",
        "RUNNER_SPAWN_CONCURRENCY": "4",
    }
    with scratch_with_services_log() as (tmp, log):
        local = LocalSystem(tmp / "var", env=env, log=log)
        await local.start()
        try:
            _, client = await local.user(tier="enterprise")
            body = {
                "brokerId": "paper",
                "credentials": {"apiKey": "bench", "apiSecret": "bench"},
                "config": {"name": "bench", "type": "hold", "parameters": {"amount": 1}},
            }
            ids = [
                (await client.start(strategyId=f"bench-{i}", **body))["workerId"]
                for i in range(workers)
            ]
            detect, running_again = [], []
            for n in range(kills):
                wid = ids[n % workers]
                entry = await _running(client, wid)
                restarts = entry["restartCount"]
                killed_at = datetime.now(UTC)
                os.kill(entry["pid"], signal.SIGKILL)
                await _running(client, wid, more_than=restarts)
                events = [
                    e
                    for e in await local.log()
                    if e.payload.get("worker_id") == wid and e.occurred_at >= killed_at
                ]
                crashed = next(e for e in events if e.type == "WorkerCrashed")
                restarted = next(e for e in events if e.type == "WorkerRestarted")
                detect.append((crashed.occurred_at - killed_at).total_seconds() * 1000)
                running_again.append((restarted.occurred_at - killed_at).total_seconds() * 1000)
                console.print(f"\rkill {n + 1}/{kills}", end="")
            console.print()
            return {
                "death → WorkerCrashed (ms)": detect,
                "death → running again (ms)": running_again,
            }
        finally:
            await local.stop()


async def _running(client, worker_id: str, more_than: int = -1, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await client.status()
        worker = next(
            e["worker"] for e in status["workers"] if e["worker"]["workerId"] == worker_id
        )
        if worker["status"] == "running" and worker["pid"] and worker["restartCount"] > more_than:
            return worker
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{worker_id} did not run again within {timeout}s")


async def run(quick: bool) -> list[Figure]:
    backoff = 0.1
    # 100 kills: the p99 of fewer is their slowest (nearest rank), and one slow restart decides it
    figures = await measure(10 if quick else 100, 4 if quick else 8, backoff,
                            Console(stderr=True))
    detect, again = figures["death → WorkerCrashed (ms)"], figures["death → running again (ms)"]
    peer = restart_latencies(5 if quick else 20)
    bound = backoff * 1000 + 100
    return [
        Figure(
            "process death → WorkerCrashed, p99",
            percentile(detect, 99),
            "ms",
            target="≤ 50 ms",
            met=at_most(percentile(detect, 99), 50),
            higher_is_better=False,
            note=f"n={len(detect)}, p50 {statistics.median(detect):.1f}, max {max(detect):.1f}",
        ),
        Figure(
            "process death → running again, p99",
            percentile(again, 99),
            "ms",
            reference=statistics.median(peer),
            reference_name="supervisord p50",
            target=f"≤ backoff + 100 = {bound:g} ms",
            met=at_most(percentile(again, 99), bound),
            higher_is_better=False,
            note=f"p50 {statistics.median(again):.0f}, max {max(again):.0f}; "
                 f"backoff {backoff * 1000:g} ms",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    figures = asyncio.run(run(parser.parse_args().quick))
    Console().print(table(figures, "recovery"))


if __name__ == "__main__":
    main()
