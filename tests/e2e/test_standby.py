"""Two replicas each of the entitlement service, the scheduler and the monitor, on PostgreSQL:
`kill -9` of each active one in turn, with runners trading and a start and a stop made across
each kill. The standby takes over (the takeover is measured and printed); every start and stop
takes effect once; no worker runs twice, no message is recorded twice, the chain is intact and
a replay of the log equals the live state."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from services.cli.client import GatewayClient
from tests.e2e.conftest import System, start_body
from tests.integration.broker_helpers import until
from tests.integration.test_postgres_stores import PG_DSN, Backend, fresh_postgres

pytestmark = pytest.mark.broker

STATEFUL = ("scheduler", "entitlement", "monitor")
TAKEOVER_BUDGET = 5.0  # seconds from the kill to the standby's lease (issue 21)


async def active_pid(postgres: Backend, service: str) -> int | None:
    """The pid of the replica holding `service`'s lease (its session says which, by name)."""
    database = postgres.url(service).rsplit("/", 1)[1]
    conn = await asyncpg.connect(PG_DSN)
    try:
        name = await conn.fetchval(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "JOIN pg_database d ON d.oid = l.database WHERE l.locktype = 'advisory' AND "
            "l.granted AND d.datname = $1 AND a.application_name LIKE 'runner %'", database)
    finally:
        await conn.close()
    return int(name.split()[3]) if name else None  # "runner <service> pid <pid> on <host>"




async def running_worker(system: System, client: GatewayClient, worker_id: str) -> dict:
    entry = await system.wait_for_worker(client, worker_id,
                                         lambda e: e["worker"]["status"] == "running",
                                         timeout=30)
    return entry["worker"]


async def test_each_active_replica_killed_in_turn_its_standby_takes_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fresh_postgres("sb") as postgres:
        monkeypatch.setenv("RUNNER_DATABASE_URL", postgres.template)
        system = System(tmp_path, replicas=2)
        try:
            await system.start()
            for service in STATEFUL:
                await until(lambda s=service: active_pid(postgres, s), 30, f"{service} active")
            _, client = await system.user(tier="pro")
            first = [(await client.start(**start_body("hold", amount=1)))["workerId"]
                     for _ in range(2)]
            pids = {w: (await running_worker(system, client, w))["pid"] for w in first}

            # the first runner trades throughout; each kill comes with a stop of the one
            # started last and a new start
            started, stopped, timings = list(first), [], {}
            stop_next = first[1]
            for service in STATEFUL:
                victim = await active_pid(postgres, service)
                label = next(c.label for c in system.supervisor.children
                             if c.process is not None and c.process.pid == victim)
                killed = time.monotonic()
                system.supervisor.kill(label)  # SIGKILL; the supervisor starts it again
                # a start and a stop made at once, while the standby takes over
                start = asyncio.create_task(client.start(**start_body("hold", amount=1)))
                stop = asyncio.create_task(client.stop(stop_next))
                successor = await until(lambda s=service, v=victim: _another(postgres, s, v),
                                        15, f"{service} taken over")
                leased = time.monotonic() - killed
                worker_id = (await start)["workerId"]
                assert (await stop)["success"] is True
                stopped.append(stop_next)
                started.append(worker_id)
                stop_next = worker_id
                await running_worker(system, client, worker_id)
                timings[service] = (leased, time.monotonic() - killed)
                assert successor != victim
                # the killed replica comes back, standing by
                await until(lambda lb=label: system.supervisor.child(lb).restarts == 1, 15,
                            f"{label} restarted")

            for service, (leased, served) in timings.items():
                print(f"\n{service}: standby active {leased:.2f}s after kill -9; a start made "
                      f"then running {served:.2f}s after it")
            for service, (leased, _) in timings.items():
                assert leased < TAKEOVER_BUDGET, (service, leased)

            for worker_id in stopped:
                await system.wait_for_worker(client, worker_id,
                                             lambda e: e["worker"]["status"] == "stopped")
            status = await system.admin.status()
            live = {e["worker"]["workerId"]: e["worker"] for e in status["workers"]}
            for worker_id in started:
                if worker_id not in stopped:
                    assert live[worker_id]["status"] == "running"
                    assert live[worker_id]["restartCount"] == 0
            assert live[first[0]]["pid"] == pids[first[0]]  # never restarted

            log = await system.wait_for_log(lambda events: Counter(
                e.type for e in events)["WorkerStopped"] == len(stopped))
            ids = [str(e.event_id) for e in log]
            assert len(ids) == len(set(ids))  # no message recorded twice
            for kind in ("JobRequested", "JobAccepted", "JobQueued", "JobDispatched",
                         "WorkerSpawned", "StopRequested", "WorkerStopped"):
                per_worker = Counter(e.payload["worker_id"] for e in log if e.type == kind)
                assert all(n == 1 for n in per_worker.values()), (kind, per_worker)
            assert len({e.payload["worker_id"] for e in log if e.type == "WorkerSpawned"}) == (
                len(started))

            verify = system.runner("audit", "verify", check=False)
            assert verify.returncode == 0, verify.stdout + verify.stderr
            replayed = system.replay()
            assert replayed["queueStats"] == status["queueStats"]
            assert {e["worker"]["workerId"]: (e["worker"]["status"], e["worker"]["restartCount"])
                    for e in replayed["workers"]} == {
                w: (e["status"], e["restartCount"]) for w, e in live.items()}
            assert "Traceback" not in system.log_path.read_text()
        finally:
            await system.stop()


async def _another(postgres: Backend, service: str, victim: int) -> int | None:
    pid = await active_pid(postgres, service)
    return pid if pid is not None and pid != victim else None
