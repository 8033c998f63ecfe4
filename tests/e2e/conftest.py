"""The whole system as real processes (`runner service …` under the supervisor) on a real broker,
in its own vhost and data directory, driven through HTTP like a user would."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from events import Envelope
from services.cli.client import GatewayClient
from services.cli.local import LocalSystem
from tests.conftest import broker_reachable

FAST = {
    "RUNNER_HEARTBEAT_INTERVAL": "0.3",
    "RUNNER_HEARTBEAT_TIMEOUT": "2.5",
    "RUNNER_HOST_HEARTBEAT_INTERVAL": "0.3",
    "RUNNER_HOST_TIMEOUT": "2.5",
    "RUNNER_HOST_LEASE": "1.2",
    "RUNNER_RESTART_BACKOFF": "0.2",
    "RUNNER_RESTART_BACKOFF_MAX": "1",
    "RUNNER_STOP_GRACE": "3",
    "RUNNER_REQUEST_TIMEOUT": "15",
    "RUNNER_SPAWN_CONCURRENCY": "4",
    "RUNNER_CIRCUIT_COOLDOWN": "8",
}


class System(LocalSystem):
    """A running system plus the means to watch it from outside."""

    def __init__(self, root: Path, hosts: int = 1, own_broker_user: bool = False,
                 replicas: int = 1, amqp_url: str | None = None, **env: str) -> None:
        if not broker_reachable():
            pytest.fail("RabbitMQ is not reachable on 5672 (.ci/run starts it)")
        self.log_path = root / "services.log"
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 - open while the system runs
        super().__init__(
            root / "var",
            hosts=hosts,
            vhost=f"e2e-{uuid.uuid4().hex[:10]}",
            env=FAST | env,
            log=self._log_file,
            own_broker_user=own_broker_user,
            replicas=replicas,
            amqp_url=amqp_url,
        )

    async def stop(self, *, keep_vhost: bool = False) -> None:
        await super().stop(keep_vhost=keep_vhost)
        self._log_file.close()

    def runner(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the `runner` CLI against this system (its broker and data dir)."""
        return subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=self.env,
                              capture_output=True, text=True, timeout=60, check=check)

    def runner_with(self, env: dict[str, str], *args: str,
                    check: bool = True) -> subprocess.CompletedProcess[str]:
        """`runner` with an environment of its own (a user's token, …)."""
        return subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=check)

    def replay(self) -> dict[str, Any]:
        """`runner replay --json`: the projections rebuilt from the log."""
        return json.loads(self.runner("replay", "--json").stdout)

    async def wait_for_log(
        self, predicate: Callable[[list[Envelope]], Any], timeout: float = 20.0
    ) -> list[Envelope]:
        events: list[Envelope] = []
        for _ in range(int(timeout * 10)):
            events = await self.log()
            if predicate(events):
                return events
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"log never satisfied the condition; types: {[e.type for e in events]}"
        )

    async def running_workers(self, client: GatewayClient, count: int) -> dict[str, int]:
        """`count` paper `hold` runners started and running: each worker id with its pid."""
        pids = {}
        for _ in range(count):
            wid = (await client.start(**start_body("hold", amount=1)))["workerId"]
            entry = await self.wait_for_worker(
                client, wid, lambda e: e["worker"]["status"] == "running" and e["worker"]["pid"])
            pids[wid] = entry["worker"]["pid"]
        return pids

    async def wait_for_worker(
        self,
        client: GatewayClient,
        worker_id: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        for _ in range(int(timeout * 10)):
            status = await client.status()
            entry = next((e for e in status["workers"] if e["worker"]["workerId"] == worker_id), {})
            if entry and predicate(entry):
                return entry
            await asyncio.sleep(0.1)
        raise AssertionError(f"worker {worker_id} never satisfied the condition; last: {entry}")


def start_body(
    strategy: str = "hold",
    instruments: tuple[str, ...] = ("BTC-PERPETUAL",),
    secret: str | None = None,
    **parameters: Any,
) -> dict[str, Any]:
    return {
        "strategyId": f"{strategy}-{uuid.uuid4().hex[:6]}",
        "brokerId": "paper",
        "credentials": {
            "apiKey": f"key-{uuid.uuid4().hex}",
            "apiSecret": secret or f"sec-{uuid.uuid4().hex}",
        },
        "config": {
            "name": strategy,
            "type": strategy,
            "parameters": parameters,
            "instruments": list(instruments),
        },
    }


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    """One system shared by a module's tests (each test uses its own users)."""
    system_ = System(tmp_path_factory.mktemp("system"))
    await system_.start()
    yield system_
    await system_.stop()
