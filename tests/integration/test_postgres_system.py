"""The whole system on PostgreSQL: every service's store in its own database
(`RUNNER_DATABASE_URL=postgresql+asyncpg://…/<prefix>{service}`), driven over HTTP through a
runner's life: start → running (positions) → stop with flatten; then the log verifies with
`runner audit verify` reading PostgreSQL, and no SQLite file was written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from services.monitor.log import EventLog
from services.settings import Settings
from tests.e2e.conftest import System, start_body
from tests.integration.test_postgres_stores import PG_DSN, fresh_postgres

pytestmark = pytest.mark.broker

SERVICES = ("gateway", "entitlement", "scheduler", "monitor", "worker-host-host-1")


async def test_runner_lifecycle_with_every_store_on_postgres(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fresh_postgres("e2e") as postgres:
        # the services inherit it, and so does System.log() reading the monitor's database
        monkeypatch.setenv("RUNNER_DATABASE_URL", postgres.template)
        system = System(tmp_path)
        try:
            await system.start()
            _, client = await system.user()
            body = start_body("hold", ("BTC-PERPETUAL", "ETH-PERPETUAL"))
            started = await client.start(**body)
            wid = started["workerId"]
            running = await system.wait_for_worker(
                client,
                wid,
                lambda e: e["worker"]["status"] == "running" and len(e["positions"]) == 2,
            )
            assert running["worker"]["pid"]

            stopped = await client.stop(wid, flatten=True)
            assert stopped["success"] is True and stopped["flattenedPositions"] == 2
            status = await client.status()
            mine = next(e for e in status["workers"] if e["worker"]["workerId"] == wid)
            assert mine["worker"]["status"] == "stopped" and mine["positions"] == []

            log = await system.wait_for_log(
                lambda ev: any(
                    e.type == "WorkerStopped" and e.payload["worker_id"] == wid for e in ev
                )
            )
            types = [e.type for e in log if e.correlation_id == started["jobId"]]
            for expected in ("JobRequested", "JobAccepted", "JobQueued",
                             "JobDispatched", "WorkerSpawned", "StopRunner", "StopRequested",
                             "PositionsFlattened", "WorkerStopped"):  # fmt: skip
                assert expected in types, (expected, types)
        finally:
            await system.stop()

        monitor_url = Settings().database_for("monitor")
        assert monitor_url == postgres.url("monitor")
        event_log = EventLog.at(monitor_url, must_exist=True)
        try:
            assert await event_log.verify() is None
            recorded = await event_log.count()
        finally:
            await event_log.close()
        audit = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "audit", "verify"],
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert audit.returncode == 0, audit.stderr
        assert audit.stdout.startswith(f"ok: {recorded} events, chain intact")

        assert list((tmp_path / "var").rglob("*.db")) == []  # nothing fell back to SQLite
        prefix = postgres.url("")
        conn = await asyncpg.connect(PG_DSN)
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE starts_with(datname, $1)",
                prefix.rsplit("/", 1)[1],
            )
        finally:
            await conn.close()
        assert {r["datname"] for r in rows} == {postgres.url(s).rsplit("/", 1)[1] for s in SERVICES}
