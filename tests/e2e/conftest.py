"""The whole system as real processes (`runner service …` under the supervisor) on a real broker,
in its own vhost and data directory, driven through HTTP like a user would."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from rich.console import Console

from events import Envelope
from services.cli.client import GatewayClient
from services.cli.supervisor import Supervisor, system
from services.monitor.log import EventLog
from services.settings import Settings
from tests.conftest import AMQP_HOST, AMQP_PORT, broker_reachable, rabbitmqctl

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
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class System:
    """A running system plus the means to look at it from outside."""

    def __init__(self, root: Path, hosts: int = 1, **env: str) -> None:
        self.vhost = f"e2e-{uuid.uuid4().hex[:10]}"
        self.data_dir = root / "var"
        self.log_path = root / "services.log"
        self.admin_token = secrets.token_urlsafe(24)
        self.port = free_port()
        self.env = dict(os.environ) | FAST | {
            "RUNNER_AMQP_URL": f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{self.vhost}",
            "RUNNER_DATA_DIR": str(self.data_dir),
            "RUNNER_HTTP_PORT": str(self.port),
            "RUNNER_ADMIN_TOKEN": self.admin_token,
        } | env
        self._log = open(self.log_path, "w")  # noqa: SIM115 - kept open while the system runs
        self.supervisor = Supervisor(self.env, console=Console(file=self._log, width=200))
        system(self.supervisor, hosts=hosts)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin = GatewayClient(self.base_url, self.admin_token)
        self._clients: list[GatewayClient] = [self.admin]

    def create_vhost(self) -> None:
        if not broker_reachable():
            pytest.fail("RabbitMQ is not reachable on 5672 (.ci/run starts it)")
        rabbitmqctl("add_vhost", self.vhost)
        rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        self._vhost_created = True

    async def start(self) -> None:
        if not getattr(self, "_vhost_created", False):
            self.create_vhost()
        self.data_dir.mkdir(parents=True)
        await self.supervisor.start()
        for _ in range(300):
            try:
                await self.admin.call("GET", "/health")
                return
            except Exception:
                await asyncio.sleep(0.1)
        raise RuntimeError(f"gateway did not come up; see {self.log_path}")

    async def stop(self) -> None:
        for client in self._clients:
            await client.close()
        await self.supervisor.stop(grace=15)
        self._log.close()
        try:
            rabbitmqctl("delete_vhost", self.vhost)
        except RuntimeError:
            pass

    async def user(self, name: str | None = None) -> tuple[str, GatewayClient]:
        name = name or f"u-{uuid.uuid4().hex[:8]}"
        client = GatewayClient(self.base_url, await self.admin.add_user(name))
        self._clients.append(client)
        return name, client

    @property
    def settings(self) -> Settings:
        return Settings(data_dir=self.data_dir)

    async def log(self) -> list[Envelope]:
        """Every envelope recorded by the monitor so far, in log order."""
        event_log = EventLog.at(self.settings.database_for("monitor"), must_exist=True)
        try:
            return [e async for _, e in event_log.read()]
        finally:
            await event_log.close()

    async def wait_for_log(self, predicate: Callable[[list[Envelope]], Any],
                           timeout: float = 20.0) -> list[Envelope]:
        events: list[Envelope] = []
        for _ in range(int(timeout * 10)):
            events = await self.log()
            if predicate(events):
                return events
            await asyncio.sleep(0.1)
        raise AssertionError(f"log never satisfied the condition; types: {[e.type for e in events]}")

    async def wait_for_worker(self, client: GatewayClient, worker_id: str,
                              predicate: Callable[[dict[str, Any]], bool],
                              timeout: float = 20.0) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        for _ in range(int(timeout * 10)):
            status = await client.status()
            entry = next((e for e in status["workers"] if e["worker"]["workerId"] == worker_id), {})
            if entry and predicate(entry):
                return entry
            await asyncio.sleep(0.1)
        raise AssertionError(f"worker {worker_id} never satisfied the condition; last: {entry}")


def start_body(strategy: str = "hold", instruments: tuple[str, ...] = ("BTC-PERPETUAL",),
               secret: str | None = None, **parameters: Any) -> dict[str, Any]:
    return {
        "strategyId": f"{strategy}-{uuid.uuid4().hex[:6]}",
        "brokerId": "paper",
        "credentials": {"apiKey": f"key-{uuid.uuid4().hex}", "apiSecret": secret or f"sec-{uuid.uuid4().hex}"},
        "config": {"name": strategy, "type": strategy, "parameters": parameters,
                   "instruments": list(instruments)},
    }


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    """One system shared by a module's tests (each test uses its own users)."""
    system_ = System(tmp_path_factory.mktemp("system"))
    await system_.start()
    yield system_
    await system_.stop()
