"""What the metrics cost: CPU per worker started with the instruments on (and `/metrics` of
every service scraped each second) against the same run with them off (`RUNNER_METRICS=false`).

Each round starts a fresh system and a burst of `hold` workers, as `bench.density` (a) does,
and takes the CPU the services and the workers used per start (the broker not counted). Rounds
alternate off, on, off, on, … so that the machine's drift falls on both alike; the figure is
the median of the rounds' ratios. That difference is within the machine's noise, so beside it
the instruments' own cost is worked out exactly: each instrument timed here in a loop, times
how often the "on" rounds called it per start (counted by the metrics themselves).

    .venv/bin/python -m bench.metrics_cost [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import httpx
from rich.console import Console

from bench.density import (
    PER_USER,
    Heartbeats,
    cpu_by_process,
    processes,
    start_many,
    worker_pids,
)
from bench.http import BenchClient
from bench.report import Figure, at_most, scratch_with_services_log, table, without_broker
from services import metrics
from services.cli.local import LocalSystem, free_port

CALLS = {  # what each instrument's call counts, in the series the services export
    "batch": "runner_batch_size_count",
    "rpc": "runner_rpc_seconds_count",
    "outbox": "runner_outbox_published_total",
    "recorded": "runner_log_recorded_total",
}


def instrument_us() -> dict[str, float]:
    """µs per call of each instrument (an outbox or log call per message it covers)."""
    envelope = SimpleNamespace(type="WorkerSpawned", occurred_at=datetime.now(UTC))
    calls = {
        "batch": lambda: metrics.batch_settled("bench", "bench.inbox", 3, 0, 0, 0.002),
        "rpc": lambda: metrics.rpc_called("bench", "bench.rpc", "DecideStart", 0.001, "ok"),
        "outbox": lambda: metrics.outbox_confirmed("bench", [envelope.occurred_at]),
        "recorded": lambda: metrics.log_recorded([(1, envelope)]),
    }
    cost = {}
    for name, call in calls.items():
        started = time.perf_counter()
        for _ in range(20_000):
            call()
        cost[name] = (time.perf_counter() - started) / 20_000 * 1e6
    return cost


def calls_in(pages: list[str]) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    counted = dict.fromkeys(CALLS, 0.0)
    for page in pages:
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                for name, series in CALLS.items():
                    if sample.name == series:
                        counted[name] += sample.value
    return counted


async def _scrape_every_second(urls: list[str]) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            for url in urls:
                with contextlib.suppress(httpx.HTTPError):
                    await http.get(url)
            await asyncio.sleep(1.0)


async def one_round(burst: int, metrics_on: bool) -> tuple[float, dict[str, float]]:
    """CPU ms per start (services and workers, not the broker) in a fresh system, and (metrics
    on) how often each instrument was called per start."""
    env = {"RUNNER_RATE_LIMIT": "0",
           "RUNNER_HOST_CAPACITY": str(burst + 50), "RUNNER_SPAWN_CONCURRENCY": "32",
           "RUNNER_HEARTBEAT_INTERVAL": "5", "RUNNER_METRICS": "true" if metrics_on else "false"}
    with scratch_with_services_log() as (tmp, log):
        local = LocalSystem(tmp / "var", env=env, log=log, quiet=True)
        urls = [f"{local.base_url}/metrics"]
        for child in local.supervisor.children:
            if metrics_on and child.service != "gateway":
                port = child.env["RUNNER_METRICS_PORT"] = str(free_port())
                urls.append(f"http://127.0.0.1:{port}/metrics")
        await local.start()
        beats = Heartbeats()
        connection = await beats.listen(local.amqp_url)
        clients: list[BenchClient] = []
        scraper = asyncio.ensure_future(_scrape_every_second(urls)) if metrics_on else None
        try:
            clients += [BenchClient((await local.user(tier="enterprise"))[1])
                        for _ in range((burst + 2 + PER_USER - 1) // PER_USER)]
            await start_many(clients, 0, 2)  # warm up: connections, caches, the fork-server
            pids = processes(local)
            before = cpu_by_process(pids, (await worker_pids(local.admin)).values())
            ids = await start_many(clients, 2, burst)
            await beats.all_beating(ids, timeout=60 + burst / 10)
            after = cpu_by_process(pids, (await worker_pids(local.admin)).values())
            pages = []
            if metrics_on:
                async with httpx.AsyncClient(timeout=10) as http:
                    pages = [(await http.get(url)).text for url in urls]
        finally:
            if scraper is not None:
                scraper.cancel()
            for client in clients:
                await client.close()
            await connection.close()
            await local.stop()
    per_start = {name: value / (burst + 2) for name, value in calls_in(pages).items()}
    return without_broker({name: (after[name] - before.get(name, 0.0)) * 1000 / burst
                           for name in after}), per_start


async def run(quick: bool) -> list[Figure]:
    burst, rounds = (40, 1) if quick else (200, 3)
    console = Console(stderr=True)
    off, on, calls = [], [], {}
    for n in range(rounds):
        off.append((await one_round(burst, metrics_on=False))[0])
        cpu, calls = await one_round(burst, metrics_on=True)
        on.append(cpu)
        console.print(f"round {n + 1}: {off[-1]:.1f} ms off, {on[-1]:.1f} ms on per start")
    extra = statistics.median((b - a) / a * 100 for a, b in zip(off, on, strict=True))
    cost = instrument_us()
    instruments_ms = sum(calls[name] * cost[name] for name in CALLS) / 1000
    share = instruments_ms / statistics.median(off) * 100
    console.print("instrument calls per start: " + ", ".join(
        f"{name} {calls[name]:.1f} × {cost[name]:.1f} µs" for name in CALLS))
    return [
        Figure("metrics' instruments, CPU per start", share, "%", target="≤ 2 %",
               met=at_most(share, 2), higher_is_better=False,
               note=f"{instruments_ms * 1000:.0f} µs of {statistics.median(off):.1f} ms"),
        Figure("CPU per start with metrics on (scraped each second)", statistics.median(on),
               "ms", reference=statistics.median(off), reference_name="metrics off",
               higher_is_better=False, note=f"{rounds} rounds of {burst} starts"),
        Figure("metrics on − off, CPU per start", extra, "%", higher_is_better=False,
               note="median of the rounds' differences (within the machine's noise)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    figures = asyncio.run(run(parser.parse_args().quick))
    Console().print(table(figures, "metrics cost"))


if __name__ == "__main__":
    main()
