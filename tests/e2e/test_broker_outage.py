"""A whole-broker outage shorter than the host lease (`rabbitmqctl stop_app` … `start_app`) with
runners up and users calling: nothing is restarted, the gateway answers 503 with Retry-After
while the bus is down, and a start made after the broker is back takes effect.

The system runs on a private RabbitMQ node of its own (`tests.rabbit_nodes`), started beside
the machine's shared one and removed afterwards: the shared broker is never stopped. A drill
(`make drill`), for its length."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.cli.client import GatewayClient, GatewayError
from tests import rabbit_nodes
from tests.e2e.conftest import System, start_body
from tests.e2e.test_lifecycle import alive
from tests.integration.broker_helpers import until

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.drill]

OUTAGE = 6.0  # seconds the broker is down: well inside the host lease below
REQUEST_TIMEOUT = 5.0
LEASED = {
    "RUNNER_HOST_LEASE": "15",
    "RUNNER_HOST_HEARTBEAT_INTERVAL": "1",
    "RUNNER_HOST_TIMEOUT": "25",
    "RUNNER_HEARTBEAT_INTERVAL": "1",
    "RUNNER_HEARTBEAT_TIMEOUT": "25",
    "RUNNER_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
}


async def poll_status(client: httpx.AsyncClient, stop: asyncio.Event,
                      answers: list[tuple[int, str | None, float]]) -> None:
    """`GET /runner/status` over and over: each answer's status, Retry-After, and how long it
    took (a refused connection counts as status 0)."""
    while not stop.is_set():
        began = time.monotonic()
        try:
            response = await client.get("/runner/status")
            answers.append((response.status_code, response.headers.get("retry-after"),
                            time.monotonic() - began))
        except httpx.HTTPError:
            answers.append((0, None, time.monotonic() - began))
        await asyncio.sleep(0.1)  # a dashboard's pace, not a wait for a condition


async def started(client: GatewayClient) -> dict | None:
    """A start, or None if the gateway answers 503 (the services still reconnecting)."""
    try:
        return await client.start(**start_body("hold", amount=1))
    except GatewayError as exc:
        if exc.status != 503:
            raise
        return None


async def host_heard_since(system: System, since: float) -> bool:
    """Whether the monitor has heard every worker-host's heartbeat after `since` (Unix s)."""
    with contextlib.suppress(GatewayError):
        hosts = await system.admin.hosts()
        return bool(hosts) and all((h["lastSeen"] or 0) / 1000 > since for h in hosts)
    return False


@pytest.fixture
def node(tmp_path: Path) -> Iterator[rabbit_nodes.RabbitNode]:
    """A private RabbitMQ node, removed afterwards."""
    if not rabbit_nodes.available():
        pytest.skip("no rabbitmq-server package for a private node")
    with rabbit_nodes.RabbitNode(tmp_path / "rabbit") as private:
        yield private


async def test_broker_outage_shorter_than_the_lease_restarts_nothing(
    tmp_path: Path, node: rabbit_nodes.RabbitNode
) -> None:
    system = System(tmp_path, amqp_url=node.url, **LEASED)
    await system.start()
    try:
        _, client = await system.user(tier="pro")
        pids = await system.running_workers(client, 2)
        before = list(pids)

        answers: list[tuple[int, str | None, float]] = []
        stop_polling = asyncio.Event()
        async with httpx.AsyncClient(base_url=system.base_url, timeout=30,
                                     headers=dict(client.http.headers)) as raw:
            poller = asyncio.create_task(poll_status(raw, stop_polling, answers))
            await asyncio.to_thread(node.stop_app)
            try:
                down_at = time.monotonic()
                with pytest.raises(GatewayError) as refused:  # and nothing started behind it
                    await client.start(**start_body("hold", amount=1))
                assert refused.value.status == 503
                # the outage's length (the drill's pace, not a wait for a condition)
                await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
            finally:
                await asyncio.to_thread(node.start_app)
            back_at, back_wall = time.monotonic(), time.time()
            await until(lambda: host_heard_since(system, back_wall), 20,
                        "the worker-host's heartbeats back")
            heard_after = time.monotonic() - back_at
            after = await until(lambda: started(client), 20, "a start taken after the return")
            started_after = time.monotonic() - back_at
            await system.wait_for_worker(client, after["workerId"],
                                         lambda e: e["worker"]["status"] == "running")
            stop_polling.set()
            await poller

        print(f"host heard {heard_after:.1f}s and a start taken {started_after:.1f}s after the "
              "broker's return")
        assert started_after < 5.0  # about a second on an idle machine
        status = await client.status()
        workers = {e["worker"]["workerId"]: e["worker"] for e in status["workers"]}
        assert set(workers) == {*before, after["workerId"]}
        for wid in before:
            assert workers[wid]["status"] == "running", workers[wid]
            assert workers[wid]["pid"] == pids[wid] and alive(pids[wid])
            assert workers[wid]["restartCount"] == 0
        await client.stop(before[0])  # a stop after the outage takes effect, once

        log = await system.wait_for_log(lambda events: any(
            e.type == "WorkerStopped" and e.payload["worker_id"] == before[0] for e in events))
        ran = Counter((e.type, e.payload.get("worker_id")) for e in log
                      if e.type in ("WorkerSpawned", "WorkerRestarted", "WorkerCrashed",
                                    "WorkerStopped", "HeartbeatMissed", "HostLost"))
        assert ran == Counter({("WorkerSpawned", wid): 1 for wid in workers}
                              | {("WorkerStopped", before[0]): 1}), ran
        failures = [(code, retry) for code, retry, _ in answers if code >= 500 or code == 0]
        assert all(code == 503 and retry for code, retry in failures), failures
        assert max(took for _, _, took in answers) < REQUEST_TIMEOUT + 2.0
        assert any(code == 503 for code, _ in failures), "the outage was never seen"
        logged = system.log_path.read_text()
        assert "Traceback" not in logged, logged[logged.index("Traceback") - 2000:][:6000]
        assert "fenced" not in logged
        said = Counter((line.split("]", 1)[0], "lost" if "lost the connection" in line else "back")
                       for line in logged.splitlines()
                       if "lost the connection to the broker" in line
                       or "connection to the broker back" in line)
        services = {label.split("]", 1)[0] for label, _ in said}
        assert len(services) == 5 and set(said.values()) == {1}, said  # one line each way
    finally:
        await system.stop()
