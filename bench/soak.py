"""Service memory over many worker lives: rounds of `hold` workers started, then stopped.

Not part of `make bench` (it takes minutes per thousand lives on two cores). After each round it
reads every service's unique memory (USS); at the end it prints, per service, the growth per
worker started and stopped over each quarter of the run: a cache filling levels off, a leak does
not. The admin's status is read every round (to know when the stops are done), so the monitor
holds every worker's status entry too.

    .venv/bin/python -m bench.soak [--rounds 80] [--per-round 200]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.density import BODY, PER_USER, Heartbeats, processes
from bench.http import BenchClient
from bench.spawn import uss
from services.cli.local import LocalSystem

ENV = {"RUNNER_RATE_LIMIT": "0",
       "RUNNER_HOST_CAPACITY": "1200", "RUNNER_MAX_SYSTEM_WORKERS": "1200",
       "RUNNER_SPAWN_CONCURRENCY": "32", "RUNNER_SPAWN_MODE": "fork", "RUNNER_STOP_GRACE": "5"}
IN_FLIGHT = 64
LIVE = ("queued", "starting", "running")


async def soak(rounds: int, per_round: int, console: Console) -> list[tuple[int, dict[str, int]]]:
    """(lives so far, USS in bytes by service) after each round."""
    samples: list[tuple[int, dict[str, int]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        local = LocalSystem(Path(tmp) / "var", env=ENV, quiet=True,
                            log=open(Path(tmp) / "services.log", "w"))  # noqa: SIM115
        await local.start()
        beats = Heartbeats()
        connection = await beats.listen(local.amqp_url)
        limit = asyncio.Semaphore(IN_FLIGHT)
        try:
            users = [await local.user(tier="enterprise")
                     for _ in range((per_round + PER_USER - 1) // PER_USER)]
            starters = [BenchClient(client) for _, client in users]
            services = {k: v for k, v in processes(local).items() if "rabbitmq" not in k}

            async def start(n: int) -> str:
                async with limit:
                    reply = await starters[n // PER_USER].start(strategyId=f"s-{n}", **BODY)
                    return str(reply["workerId"])

            async def stop(n: int, worker_id: str) -> None:
                async with limit:
                    await users[n // PER_USER][1].stop(worker_id)

            for done in range(1, rounds + 1):
                ids = await asyncio.gather(*(start(n) for n in range(per_round)))
                await beats.all_beating(ids, timeout=120)
                await asyncio.gather(*(stop(n, w) for n, w in enumerate(ids)))
                while any(e["worker"]["status"] in LIVE
                          for e in (await local.admin.status())["workers"]):
                    await asyncio.sleep(0.5)
                samples.append((done * per_round, {k: uss(p) for k, p in services.items()}))
                console.print(f"round {done}/{rounds}: {done * per_round} lives", end="\r")
            for client in starters:
                await client.close()
        finally:
            await connection.close()
            await local.stop()
    return samples


def growth_table(samples: list[tuple[int, dict[str, int]]]) -> Table:
    """Growth per life (KiB) over each quarter of the run, from the second round on (the first
    round's caches and pools fill once)."""
    start = 1 if len(samples) > 4 else 0
    cuts = [start + round(q * (len(samples) - 1 - start) / 4) for q in range(5)]
    table = Table(title="unique memory (USS) per worker started and stopped, KiB")
    table.add_column("service")
    for a, b in itertools.pairwise(cuts):
        table.add_column(f"{samples[a][0]:,}–{samples[b][0]:,}", justify="right")
    table.add_column("USS, MiB", justify="right")
    for service in samples[0][1]:
        row = [service]
        for a, b in itertools.pairwise(cuts):
            lives = samples[b][0] - samples[a][0]
            grown = samples[b][1][service] - samples[a][1][service]
            row.append(f"{grown / 1024 / lives:.2f}" if lives else "–")
        first, last = samples[cuts[0]][1][service], samples[-1][1][service]
        row.append(f"{first / 2**20:.1f} → {last / 2**20:.1f}")
        table.add_row(*row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args()
    if args.rounds < 2 or not 1 <= args.per_round <= 1000:
        parser.error("--rounds must be at least 2, --per-round 1 to 1000")
    console = Console()
    samples = asyncio.run(soak(args.rounds, args.per_round, console))
    console.print(growth_table(samples))


if __name__ == "__main__":
    main()
