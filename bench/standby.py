"""Standby takeover: `kill -9` of the active replica of the scheduler, the entitlement service
and the monitor (two of each on PostgreSQL) under a little traffic: the kill → a start made
then running, per service, beside kill → lease taken and the same start without a kill (issue
21's budget; bench/RESULTS.md says how each figure is taken).

    .venv/bin/python -m bench.standby [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from rich.console import Console

from bench.report import (
    Figure,
    at_most,
    hold_start,
    percentile,
    scratch_with_services_log,
    table,
)
from services.cli.client import GatewayClient, GatewayError
from services.cli.local import LocalSystem

PG_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://root@127.0.0.1:5432/postgres")
STATEFUL = ("scheduler", "entitlement", "monitor")
BUDGET = 5.0  # seconds, kill → standby handling messages, p99 (issue 21)
POLL = 0.02
ENV = {
    "RUNNER_RATE_LIMIT": "0",
    "RUNNER_REQUEST_TIMEOUT": "15",  # a start waits for the entitlement's standby
    "RUNNER_SPAWN_CONCURRENCY": "4",
}


async def postgres_unreachable() -> str | None:
    import asyncpg

    try:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


@contextlib.asynccontextmanager
async def scratch_databases() -> AsyncIterator[tuple[str, Any]]:
    """A RUNNER_DATABASE_URL template under a database-name prefix nobody uses, and a connection
    to the server; every database under the prefix is dropped afterwards."""
    import asyncpg

    prefix = f"bench_{uuid.uuid4().hex[:10]}_"
    server = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    conn = await asyncpg.connect(PG_DSN)
    try:
        yield f"{server}/{prefix}{{service}}", conn
    finally:
        for row in await conn.fetch(
                "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", prefix):
            name = row["datname"].replace('"', '""')
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def replica_pids(conn: Any, database: str, service: str) -> tuple[int | None, set[int]]:
    """The pid of the replica holding `service`'s lease, and every replica's pid with a lease
    session open (active or standing by): sessions are named `runner <service> pid <pid> …`."""
    rows = await conn.fetch(
        "SELECT a.application_name AS name, l.pid IS NOT NULL AS holds "
        "FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid "
        "AND l.locktype = 'advisory' AND l.granted WHERE a.datname = $1 "
        "AND a.application_name LIKE $2", database, f"runner {service} pid %")
    pids = {int(r["name"].split()[3]): r["holds"] for r in rows}
    return next((p for p, holds in pids.items() if holds), None), set(pids)


async def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := await check():
            return got
        await asyncio.sleep(POLL)
    raise TimeoutError(f"{what}: not within {timeout:g}s")


async def running(client: GatewayClient, worker_id: str) -> dict[str, Any] | None:
    with contextlib.suppress(GatewayError):
        for entry in (await client.status())["workers"]:
            worker = entry["worker"]
            if worker["workerId"] == worker_id and worker["status"] == "running":
                return worker
    return None


async def start_to_running(client: GatewayClient, timeout: float = 30) -> str:
    """A start; returns once its worker is running."""
    worker_id = (await client.start(**hold_start()))["workerId"]
    await until(lambda: running(client, worker_id), timeout, f"{worker_id} running")
    return worker_id


async def timed_start(client: GatewayClient, since: float, stops: list[asyncio.Task]) -> float:
    """Seconds from `since` until a start made now is running; the runner is then stopped
    (in the background, in `stops`)."""
    worker_id = await start_to_running(client)
    took = time.monotonic() - since
    stops.append(asyncio.create_task(client.stop(worker_id)))
    return took


async def traffic(client: GatewayClient, stop: asyncio.Event, failures: list[str]) -> None:
    """A start and a stop of another runner every second (failures while a service is
    taken over are counted, not fatal)."""
    previous: str | None = None
    while not stop.is_set():
        began, call = time.monotonic(), "start"
        try:
            started = (await client.start(**hold_start()))["workerId"]
            if previous is not None:
                call = "stop"
                await client.stop(previous)
            previous = started
        except GatewayError as exc:
            failures.append(f"{call} {exc.status}: {exc}"[:200])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, 1.0 - (time.monotonic() - began)))


async def measure(kills: int, console: Console) -> dict[str, Any]:
    async with scratch_databases() as (template, conn):
        databases = {s: template.rsplit("/", 1)[1].replace("{service}", s) for s in STATEFUL}
        with scratch_with_services_log() as (tmp, log):
            local = LocalSystem(tmp / "var", env=ENV | {"RUNNER_DATABASE_URL": template},
                                log=log, replicas=2)
            await local.start()
            stop_traffic, refused, stops = asyncio.Event(), [], []
            try:
                for service in STATEFUL:
                    await until(lambda s=service: _both_up(local, conn, databases[s], s), 60,
                                f"{service}: one active, one standing by")
                _, client = await local.user(tier="enterprise")
                steady_id = await start_to_running(client)
                steady = await running(client, steady_id)
                assert steady is not None
                load = asyncio.create_task(traffic(client, stop_traffic, refused))
                plain = []
                leased: dict[str, list[float]] = {s: [] for s in STATEFUL}
                served: dict[str, list[float]] = {s: [] for s in STATEFUL}
                for n in range(kills * len(STATEFUL)):
                    service = STATEFUL[n % len(STATEFUL)]
                    database = databases[service]
                    victim = await until(lambda s=service, d=database: _both_up(local, conn, d, s),
                                         60, f"{service}: one active, one standing by")
                    label = next(c.label for c in local.supervisor.children
                                 if c.process is not None and c.process.pid == victim)
                    # the reference: the same start, no kill
                    plain.append(await timed_start(client, time.monotonic(), stops))
                    killed = time.monotonic()
                    local.supervisor.kill(label)  # SIGKILL; the supervisor starts it again
                    lease = asyncio.create_task(until(
                        lambda s=service, d=database, v=victim: _taken_over(conn, d, s, v), 30,
                        f"{service} taken over"))
                    served[service].append(await timed_start(client, killed, stops))
                    await lease
                    leased[service].append(lease.result() - killed)
                    console.print(f"kill {n + 1}/{kills * len(STATEFUL)}: {service}, lease "
                                  f"taken {leased[service][-1]:.2f}s, a start running "
                                  f"{served[service][-1]:.2f}s after the kill")
                stop_traffic.set()
                await load
                refused += [f"stop {exc.status}: {exc}"[:200] for exc in
                            await asyncio.gather(*stops, return_exceptions=True)
                            if isinstance(exc, GatewayError)]
                after = await running(client, steady_id)
                assert after is not None and after["pid"] == steady["pid"] and (
                    after["restartCount"] == 0), f"the steady runner was restarted: {after}"
                return {"plain": plain, "leased": leased, "served": served,
                        "refused": refused}
            finally:
                stop_traffic.set()
                await local.stop()


async def _both_up(local: LocalSystem, conn: Any, database: str, service: str) -> int | None:
    """The active replica's pid once each of `service`'s running replicas has its lease
    session open (one holding the lease, the others standing by)."""
    active, every = await replica_pids(conn, database, service)
    ours = {c.process.pid for c in local.supervisor.children
            if c.service == service and c.process is not None and c.process.returncode is None}
    return active if active is not None and len(ours) >= 2 and ours <= every else None


async def _taken_over(conn: Any, database: str, service: str, victim: int) -> float | None:
    active, _ = await replica_pids(conn, database, service)
    return time.monotonic() if active is not None and active != victim else None


async def run(quick: bool) -> list[Figure]:
    console = Console(stderr=True)
    if why := await postgres_unreachable():
        console.print(f"bench.standby: no PostgreSQL at {PG_DSN} ({why}): skipped")
        return []
    got = await measure(1 if quick else 20, console)
    plain = statistics.median(got["plain"]) * 1000
    figures = []
    for service in STATEFUL:
        served = [s * 1000 for s in got["served"][service]]
        leased = [s * 1000 for s in got["leased"][service]]
        worst = percentile(served, 99)
        figures.append(Figure(
            f"{service} standby: kill -9 of the active → a start made then running, p99",
            worst,
            "ms",
            reference=plain,
            reference_name="start → running, no kill, p50",
            target=f"≤ {BUDGET * 1000:g} ms",
            met=at_most(worst, BUDGET * 1000),
            higher_is_better=False,
            note=f"n={len(served)}, p50 {statistics.median(served):.0f}; kill → lease taken "
                 f"p50 {statistics.median(leased):.0f}, max {max(leased):.0f}",
        ))
    if got["refused"]:
        console.print("bench.standby: traffic calls refused during takeovers:\n  "
                      + "\n  ".join(got["refused"]))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    figures = asyncio.run(run(parser.parse_args().quick))
    Console().print(table(figures, "standby takeover"))


if __name__ == "__main__":
    main()
