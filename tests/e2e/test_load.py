"""Load control and broker trouble: the system-wide ceiling pauses the queue (nothing dropped),
and every service survives the broker closing its connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.cli.client import GatewayError
from tests.conftest import rabbitmqctl
from tests.e2e.conftest import System, start_body
from tests.integration.broker_helpers import until

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def ceiling_of_two(tmp_path: Path) -> AsyncIterator[System]:
    system = System(tmp_path, RUNNER_MAX_SYSTEM_WORKERS="2")
    await system.start()
    try:
        yield system
    finally:
        await system.stop()


async def test_ceiling_pauses_the_queue_and_resumes_without_dropping_jobs(
    ceiling_of_two: System,
) -> None:
    system = ceiling_of_two
    _, client = await system.user(tier="enterprise")
    ids = [(await client.start(**start_body()))["workerId"] for _ in range(4)]

    async def statuses() -> list[str]:
        by_id = {
            e["worker"]["workerId"]: e["worker"]["status"]
            for e in (await client.status())["workers"]
        }
        return [by_id[w] for w in ids]

    for _ in range(100):
        if (await statuses()).count("running") == 2:
            break
        await asyncio.sleep(0.1)
    # the scheduler has met the ceiling with jobs still queued: it paused instead of placing them
    log = await system.wait_for_log(lambda ev: any(e.type == "QueuePaused" for e in ev))
    assert sorted(await statuses()) == ["queued", "queued", "running", "running"]
    paused = next(e for e in log if e.type == "QueuePaused")
    assert paused.payload["ceiling"] == 2 and paused.payload["running"] == 2

    running = [w for w, s in zip(ids, await statuses(), strict=True) if s == "running"]
    for wid in running:
        await client.stop(wid)
    for _ in range(100):
        if (await statuses()).count("running") == 2:
            break
        await asyncio.sleep(0.1)
    final = dict(zip(ids, await statuses(), strict=True))
    assert [final[w] for w in running] == ["stopped", "stopped"]
    assert sorted(final.values()) == ["running", "running", "stopped", "stopped"]
    log = await system.wait_for_log(lambda ev: any(e.type == "QueueResumed" for e in ev))


async def test_every_service_survives_the_broker_closing_its_connections(running: System) -> None:
    _, client = await running.user()
    before = (await client.start(**start_body("hold", amount=1)))["workerId"]
    await running.wait_for_worker(client, before, lambda e: e["positions"])

    rabbitmqctl(
        "close_all_connections", "--vhost", running.vhost, "--limit", "1000", "e2e: broker drop"
    )

    async def stop() -> dict[str, Any] | None:
        try:
            return await client.stop(before, flatten=True)
        except GatewayError as exc:  # 503: the broker not back yet for the gateway, or for
            if exc.status != 503:  # a service on the stop's way
                raise
            return None

    # robust connections come back; consumers must come back too, or the stop is not answered
    stopped = await until(stop, 10, "the stop answered")
    assert stopped["flattenedPositions"] == 1
    after = (await client.start(**start_body("hold", amount=1)))["workerId"]
    entry = await running.wait_for_worker(
        client, after, lambda e: e["positions"] and e["worker"]["lastHeartbeat"]
    )
    assert entry["worker"]["status"] == "running"
    log = await running.wait_for_log(
        lambda ev: any(e.type == "WorkerSpawned" and e.payload["worker_id"] == after for e in ev)
    )
    assert any(e.type == "PositionsFlattened" and e.payload["worker_id"] == before for e in log)
