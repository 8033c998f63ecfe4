"""The container spawner against a real engine (Podman or Docker): a worker in its container
speaks the same control protocol as a process worker, with its environment, labels and limits
as the engine shows them, its end noticed at once and its container removed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.settings import Settings
from services.worker import protocol
from services.worker_host.container_spawner import (
    LABEL_HOST,
    LABEL_WORKER,
    ContainerSpawner,
)
from services.worker_host.spawner import SpawnError, SpawnRequest, worker_environment
from tests.container_engine import engine_or_skip

API_KEY = "ak-live-7Q4Z-container"
API_SECRET = "sk-live-3M8P-container"
HOST = "ctest-host"


def hold_request(workdir: Path, number: int, *, image: str | None = None,
                 strategy: str = "hold", lease_until: float | None = None,
                 **parameters: float) -> SpawnRequest:
    wid = f"cw-{os.getpid()}-{number}"
    env = worker_environment(
        worker_id=wid, job_id=f"job-{number}", user_id="user-1", strategy_id="integration",
        broker_id="paper",
        config_json=json.dumps({"name": strategy, "type": strategy,
                                "parameters": {"amount": 1} | parameters}),
        heartbeat_interval=0.2, lease_until=lease_until) | {"RUNNER_ENABLE_CHAOS": "1"}
    return SpawnRequest(wid, f"job-{number}", "user-1", 0, env, workdir / wid, 20.0,
                        {"apiKey": API_KEY, "apiSecret": API_SECRET}, image=image)


@pytest.fixture
async def spawner(tmp_path: Path) -> AsyncIterator[ContainerSpawner]:
    url = engine_or_skip()
    settings = Settings(container_url=url, worker_uids="", container_network="none",
                        container_memory_mb=128,
                        container_runtime=os.environ.get("RUNNER_CONTAINER_RUNTIME", ""))
    spawner = ContainerSpawner(settings, HOST, tmp_path)
    await spawner.start()
    yield spawner
    await spawner.call(spawner.remove_leftovers)
    await spawner.close()


async def next_beat(worker, timeout: float = 10.0) -> protocol.Beat:
    async with asyncio.timeout(timeout):
        while True:
            line = await worker.reader.readline()
            assert line, "channel closed"
            if isinstance(decoded := protocol.decode(line), protocol.Beat):
                return decoded


async def test_container_worker_beats_with_its_environment_and_is_removed_at_its_end(
        spawner: ContainerSpawner, tmp_path: Path) -> None:
    request = hold_request(tmp_path, 1)
    worker = await spawner.spawn(request)
    worker.send(protocol.Lease(until=1e12))
    await next_beat(worker)
    container = worker.process.container
    attrs = await spawner.call(lambda: spawner.client.api.inspect_container(container.id))
    env = dict(item.split("=", 1) for item in attrs["Config"]["Env"])
    assert env["USER_ID"] == "user-1" and env["BROKER_ID"] == "paper"
    assert env["STRATEGY_ID"] == "integration" and json.loads(env["CONFIG"])["type"] == "hold"
    assert "API_KEY" not in env and API_SECRET not in json.dumps(attrs)  # over the channel only
    assert attrs["Config"]["Labels"][LABEL_WORKER] == request.worker_id
    assert attrs["Config"]["Labels"][LABEL_HOST] == spawner.host_id
    host_config = attrs["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["Memory"] == 128 * 1024 * 1024 and host_config["PidsLimit"] == 128
    assert "no-new-privileges" in " ".join(host_config["SecurityOpt"] or [])
    assert attrs["Config"]["User"] not in ("", "0", "root", "0:0")

    os.kill(worker.pid, signal.SIGKILL)  # the container's init, as this machine sees it
    code = await asyncio.wait_for(worker.wait(), timeout=5.0)
    assert code is not None and code != 0
    assert not await spawner.call(spawner.client.containers.list,
                                  all=True, filters={"label": f"{LABEL_WORKER}="
                                                     f"{request.worker_id}"})
    assert "worker" in (request.directory / "worker.log").read_text()


async def test_stop_over_the_channel_ends_the_container_with_code_zero(
        spawner: ContainerSpawner, tmp_path: Path) -> None:
    worker = await spawner.spawn(hold_request(tmp_path, 2))
    worker.send(protocol.Lease(until=1e12))
    await next_beat(worker)
    worker.send(protocol.Stop(flatten=False))
    assert await asyncio.wait_for(worker.wait(), timeout=10.0) == 0


async def test_an_image_off_the_allow_list_is_never_started(
        spawner: ContainerSpawner, tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match="not allowed") as refused:
        await spawner.spawn(hold_request(tmp_path, 3, image="evil/miner:latest"))
    assert refused.value.permanent


async def test_a_worker_past_its_memory_limit_is_killed_and_says_so(
        spawner: ContainerSpawner, tmp_path: Path) -> None:
    worker = await spawner.spawn(hold_request(tmp_path, 4, strategy="chaos", hogAfter=0.2))
    worker.send(protocol.Lease(until=1e12))
    code = await asyncio.wait_for(worker.wait(), timeout=20.0)
    assert code == -signal.SIGKILL
    assert worker.process.cause == "out of memory (over its 128 MiB limit)"


async def test_where_its_pid_is_not_the_containers_here_the_engine_tells_its_end(
        spawner: ContainerSpawner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose pid namespace is not the engine's (the pid the engine gives names another
    process here) waits on the engine instead."""
    from services.worker_host import container_spawner

    monkeypatch.setattr(container_spawner, "in_cgroup_of", lambda pid, container_id: False)
    worker = await spawner.spawn(hold_request(tmp_path, 5))
    worker.send(protocol.Lease(until=1e12))
    await next_beat(worker)
    worker.signal(signal.SIGKILL)
    assert await asyncio.wait_for(worker.wait(), timeout=10.0) == -signal.SIGKILL


async def test_a_host_starting_again_removes_its_own_containers_only(
        spawner: ContainerSpawner, tmp_path: Path) -> None:
    """Another deployment's host of the same id (another workers' directory) leaves them be;
    the same host starting again removes them."""
    worker = await spawner.spawn(hold_request(tmp_path, 6))
    worker.send(protocol.Lease(until=1e12))
    await next_beat(worker)
    elsewhere = ContainerSpawner(spawner.settings, HOST, tmp_path / "elsewhere")
    again = ContainerSpawner(spawner.settings, HOST, tmp_path)
    for other in (elsewhere, again):
        other.client = spawner.client
    assert await elsewhere.call(elsewhere.remove_leftovers) == []
    assert worker.process.running
    assert await again.call(again.remove_leftovers) == [worker.worker_id]
    await asyncio.wait_for(worker.wait(), timeout=10.0)  # gone (its code with it)
    assert not worker.process.running


async def test_a_container_worker_reads_its_hosts_lease_on_the_same_clock(
        spawner: ContainerSpawner, tmp_path: Path) -> None:
    """The lease's instants are the host's time.monotonic(): a container has no clock of its
    own, so a worker whose lease runs out exits by itself (EXIT_LEASE_LAPSED), on time."""
    until = time.monotonic() + 2.0  # given at spawn and answered to its Hello, as a host does
    worker = await spawner.spawn(hold_request(tmp_path, 7, lease_until=until))
    worker.send(protocol.Lease(until=until))
    await next_beat(worker)
    code = await asyncio.wait_for(worker.wait(), timeout=6.0)
    assert code == protocol.EXIT_LEASE_LAPSED
