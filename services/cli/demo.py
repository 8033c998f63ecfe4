"""`runner demo`: the whole system, live, on the paper broker, narrated step by step."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from yarl import URL

from services.cli.client import GatewayClient, GatewayError, status_table
from services.cli.local import LocalSystem
from services.settings import Settings, amqp_node_urls

DEMO_VHOST = "runner-demo"
DEMO_DIR = Path("var/demo")
# Seed intervals shortened so the demo's crash and restart play out in seconds.
DEMO_ENV = {
    "RUNNER_HEARTBEAT_INTERVAL": "1",
    "RUNNER_HEARTBEAT_TIMEOUT": "6",
    "RUNNER_HOST_HEARTBEAT_INTERVAL": "1",
    "RUNNER_HOST_TIMEOUT": "6",
    "RUNNER_HOST_LEASE": "3",
    "RUNNER_RESTART_BACKOFF": "1",
    "RUNNER_STOP_GRACE": "5",
    "RUNNER_SPAWN_CONCURRENCY": "2",
}


async def _until(client: GatewayClient, predicate: Any, seconds: float) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for _ in range(int(seconds * 4)):
        status = await client.status()
        if predicate(status):
            return status
        await asyncio.sleep(0.25)
    return status


def _worker(status: dict[str, Any], worker_id: str) -> dict[str, Any]:
    return next(
        (e["worker"] for e in status["workers"] if e["worker"]["workerId"] == worker_id), {}
    )


def _start_body(strategy: str, instrument: str, **parameters: Any) -> dict[str, Any]:
    return {
        "strategyId": f"{strategy}-{instrument.split('-')[0].lower()}",
        "brokerId": "paper",
        "credentials": {
            "apiKey": "demo-" + secrets.token_hex(8),
            "apiSecret": "demo-" + secrets.token_hex(16),
        },
        "config": {
            "name": f"{strategy} {instrument}",
            "type": strategy,
            "parameters": parameters,
            "instruments": [instrument],
            "riskManagement": {
                "maxPositionSize": 100,
                "stopLossPercent": 0.5,
                "takeProfitPercent": 0.5,
            },
        },
    }


async def run_demo(console: Console, *, watch_seconds: float = 12.0) -> int:
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    local = LocalSystem(
        DEMO_DIR, hosts=2, vhost=DEMO_VHOST, env=DEMO_ENV, console=console, quiet=True
    )
    console.rule("[bold]Runner Orchestrator demo[/] — five services over RabbitMQ, paper broker")
    if not local.own_vhost:
        nodes = (str(URL(n).with_password("***")) for n in amqp_node_urls(local.amqp_url))
        console.print(f"[dim]using the configured broker as is: {', '.join(nodes)}[/]")
    try:
        await local.start()
        admin = local.admin
        console.print(
            f"gateway on {local.base_url} · 2 worker-hosts · vhost {local.vhost} · "
            f"data in {DEMO_DIR}/"
        )

        console.rule("1 · users on two tiers")
        _, alice = await local.user("alice")
        _, bob = await local.user("bob", tier="pro", days=30)
        plan = await admin.entitlement("bob")
        console.print("alice: free (1 worker)")
        console.print(
            f"bob:   {plan['tier']} ({plan['maxWorkers']} workers) until {plan['expiresAt']}"
        )

        console.rule("2 · runners start (credentials sealed at the gateway)")
        plans = {
            "alice/hold": (alice, _start_body("hold", "BTC-PERPETUAL", amount=0.5)),
            "bob/hold": (bob, _start_body("hold", "ETH-PERPETUAL", amount=4)),
            "bob/scalping": (
                bob,
                _start_body("scalping", "BTC-PERPETUAL", amount=0.2, timeframe="1s", rsiPeriod=5),
            ),
            "bob/hold-sol": (bob, _start_body("hold", "SOL-PERPETUAL", amount=25)),
        }
        issued = [
            body["credentials"][k] for _, body in plans.values() for k in ("apiKey", "apiSecret")
        ]
        started = {name: await client.start(**body) for name, (client, body) in plans.items()}
        for name, result in started.items():
            console.print(f"{name:14} → {result['workerId']}  [dim]{result['message']}[/]")

        console.rule("3 · over the limit")
        try:
            await alice.start(**_start_body("hold", "ETH-PERPETUAL"))
            console.print("[red]unexpected: a second start on free was accepted[/]")
        except GatewayError as exc:
            console.print(f"alice's second runner → HTTP {exc.status}: [yellow]{exc}[/]")

        console.rule(f"4 · live status ({watch_seconds:g}s of paper trading)")
        await _until(admin, lambda s: s["queueStats"]["runningWorkers"] >= 4, 30)
        with Live(console=console, refresh_per_second=2) as live:
            for _ in range(int(watch_seconds)):
                live.update(status_table(await admin.status(), title="all runners (admin view)"))
                await asyncio.sleep(1)

        console.rule("5 · a worker process dies → crashed at once → restarted")
        victim = started["alice/hold"]["workerId"]
        pid = _worker(await admin.status(), victim).get("pid")
        if pid:
            os.kill(pid, signal.SIGKILL)
            console.print(f"kill -9 {pid} (alice's worker {victim})")
            back = await _until(
                admin,
                lambda s: (
                    _worker(s, victim).get("restartCount", 0) >= 1
                    and _worker(s, victim).get("status") == "running"
                ),
                20,
            )
            w = _worker(back, victim)
            console.print(
                f"{victim}: {w.get('status')} again, pid {w.get('pid')}, "
                f"restartCount {w.get('restartCount')} [dim]({w.get('reason') or ''})[/]"
            )

        console.rule("6 · stop with flatten (positions closed at market)")
        target = started["bob/hold"]["workerId"]
        result = await bob.stop(target, flatten=True)
        console.print(
            f"{target}: {result['message']} — flattenedPositions = {result['flattenedPositions']}"
        )
        console.print(status_table(await bob.status(), title="bob's runners"))

        console.rule("7 · audit trail")
        await _audit(console, DEMO_DIR, await admin.status(), issued)
        return 0
    except (GatewayError, RuntimeError) as exc:
        console.print(f"[bold red]demo failed: {exc}[/]")
        return 1
    finally:
        console.rule("shutting down (graceful drain)")
        await local.stop(keep_vhost=True)


async def _audit(console: Console, data_dir: Path, live: dict[str, Any], issued: list[str]) -> None:
    """Replay the monitor's log: event counts, hash chain, and replay == live."""
    from services.monitor.log import EventLog
    from services.monitor.replay import replay
    from services.monitor.views import status as status_view

    await asyncio.sleep(1.0)  # let the last events reach the log
    event_log = EventLog.at(Settings(data_dir=data_dir).own("monitor").database_for("monitor"),
                            must_exist=True)
    try:
        counts: Counter[str] = Counter()
        folded = await replay(event_log, each=lambda _p, e: counts.update([e.type]))
        broken = await event_log.verify()
    finally:
        await event_log.close()
    table = Table(title=f"{sum(counts.values())} events in the log")
    table.add_column("type")
    table.add_column("count", justify="right")
    for name, count in counts.most_common():
        table.add_row(name, str(count))
    console.print(table)
    console.print("hash chain: " + ("[green]intact[/]" if broken is None else f"[red]{broken}[/]"))
    replayed = status_view(folded.state)["queueStats"]
    same = replayed == live["queueStats"]
    console.print(
        f"replayed queue stats {replayed} "
        + ("[green]= live[/]" if same else f"[yellow]≠ live {live['queueStats']}[/]")
    )
    secrets_found = [
        p.name
        for p in data_dir.rglob("*")
        if p.is_file() and any(s.encode() in p.read_bytes() for s in issued)
    ]
    console.print(
        "credentials in clear under the data dir: "
        + ("[green]none[/]" if not secrets_found else f"[red]{secrets_found}[/]")
    )
