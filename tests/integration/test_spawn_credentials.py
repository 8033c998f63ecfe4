"""A worker whose exchange rejects its API key, spawned as a worker-host spawns it (fork-server
and exec): the spawn fails for good with the user's reason, and the secret is nowhere."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.worker_host.fork_spawner import ForkSpawner
from services.worker_host.spawner import (
    ExecSpawner,
    SpawnError,
    SpawnRequest,
    worker_environment,
)
from tests.exchanges.deribit import LocalDeribit

API_KEY = "ak-live-2W9X-spawn"
API_SECRET = "sk-live-6B1N-spawn"


@pytest.fixture(params=["fork", "exec"])
async def spawner(request, tmp_path: Path) -> AsyncIterator[ForkSpawner | ExecSpawner]:
    spawner = ForkSpawner(tmp_path / "fork") if request.param == "fork" else ExecSpawner()
    await spawner.start()
    yield spawner
    await spawner.close()


def request_for(deribit: LocalDeribit, workdir: Path, secret: str) -> SpawnRequest:
    env = worker_environment(
        worker_id="worker-1", job_id="job-1", user_id="user-1", strategy_id="s",
        broker_id="deribit",
        config_json=json.dumps({"name": "h", "type": "hold", "parameters": {"amount": 10}}),
        heartbeat_interval=0.2, broker_urls=json.dumps({"deribit": deribit.url}),
    )
    return SpawnRequest("worker-1", "job-1", "user-1", 0, env, workdir / "worker-1", 15.0,
                        credentials={"apiKey": API_KEY, "apiSecret": secret})


async def test_rejected_key_is_a_permanent_spawn_failure_with_the_reason(
        spawner: ForkSpawner | ExecSpawner, deribit: LocalDeribit, tmp_path: Path) -> None:
    deribit.add_account(API_KEY, API_SECRET)
    with pytest.raises(SpawnError) as raised:
        await spawner.spawn(request_for(deribit, tmp_path, secret="sk-live-wrong-0000"))
    assert str(raised.value) == "exchange rejected the API key"
    assert raised.value.permanent is True
    for path in tmp_path.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"sk-live-wrong-0000" not in content and API_KEY.encode() not in content


async def test_good_key_says_hello(
        spawner: ForkSpawner | ExecSpawner, deribit: LocalDeribit, tmp_path: Path) -> None:
    deribit.add_account(API_KEY, API_SECRET)
    worker = await spawner.spawn(request_for(deribit, tmp_path, secret=API_SECRET))
    worker.signal(9)
    await worker.wait()
    assert deribit.calls["private/get_account_summary"] == 1
    if isinstance(spawner, ForkSpawner):  # forked from the server that preloads the adapter
        assert spawner.markets.pid is not None
