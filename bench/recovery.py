"""Detection and restart latency on the real system.

`kill -9` a running worker, then read the log: process death → WorkerCrashed (detection), and
process death → WorkerRestarted (a new process has said hello: running again). Prints p50 / p99
/ max and writes bench/results-recovery.json.

    .venv/bin/python -m bench.recovery [--kills 40] [--workers 8] [--backoff 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.cli.local import LocalSystem

RESULTS = Path(__file__).with_name("results-recovery.json")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(
    kills: int, workers: int, backoff: float, console: Console
) -> dict[str, list[float]]:
    env = {
        "RUNNER_RESTART_BACKOFF": str(backoff),
        "RUNNER_RESTART_BACKOFF_MAX": str(backoff),
        "RUNNER_MAX_RESTARTS": "1000000",
        "RUNNER_CIRCUIT_FAILURES": "1000000",
        "RUNNER_SPAWN_CONCURRENCY": "4",
    }
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "services.log", "w") as log:
        local = LocalSystem(Path(tmp) / "var", env=env, log=log)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--backoff", type=float, default=0.1, help="restart backoff, seconds")
    args = parser.parse_args()
    console = Console()
    figures = asyncio.run(measure(args.kills, args.workers, args.backoff, console))
    table = Table(
        title=f"recovery latency ({args.kills} kills, backoff {args.backoff * 1000:g} ms)"
    )
    for column in ("figure", "p50", "p99", "max", "n"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for name, values in figures.items():
        table.add_row(
            name,
            f"{statistics.median(values):.1f}",
            f"{percentile(values, 99):.1f}",
            f"{max(values):.1f}",
            str(len(values)),
        )
    console.print(table)
    RESULTS.write_text(
        json.dumps({"backoff_ms": args.backoff * 1000, "figures": figures}, indent=2)
    )
    console.print(f"raw figures in {RESULTS}")


if __name__ == "__main__":
    main()
