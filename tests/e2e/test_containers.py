"""Container workers end to end (RUNNER_SPAWN_MODE=container) against a real engine, Podman or
Docker, driven over HTTP: a worker runs in its container with the injected environment, its
killed process is restarted under the same workerId, a stop with flatten leaves no container;
a worker-host killed with SIGKILL and started again removes its earlier run's containers and no
worker ever runs twice, nor when a frozen host's lease runs out; a worker past its memory limit
is killed and reported so; a hung one is killed and restarted; a strategy runs in the allowed
image it names. Skipped, saying why, only where no engine answers (the worker image is built
when it is stale)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.cli.client import GatewayError
from services.worker_host.container_spawner import LABEL_ATTEMPT, LABEL_HOST, LABEL_WORKER
from tests.container_engine import engine_url
from tests.e2e.conftest import System, start_body
from tests.integration.broker_helpers import until as wait_until

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def engine_at() -> str:
    url, why = engine_url()
    if url is None:
        pytest.skip(why)
    return url


@pytest.fixture(scope="module")
def engine(engine_at: str) -> Iterator[Any]:
    import docker

    client = docker.DockerClient(base_url=engine_at, timeout=30)
    yield client
    client.close()


STRATEGY_IMAGE = "runner-test-strategy:1"  # the worker image and a library of its own


@pytest.fixture(scope="module")
def strategy_image(engine: Any) -> str:
    """An image a strategy brings: the worker image plus a module the host does not have (made
    again only when the worker image has changed)."""
    import docker.errors

    base = engine.images.get("runner-worker:latest").id
    with contextlib.suppress(docker.errors.ImageNotFound):
        if engine.images.get(STRATEGY_IMAGE).labels.get("io.runner.test.base") == base:
            return STRATEGY_IMAGE
    dockerfile = (b"FROM runner-worker:latest\n"
                  b"COPY talib_stub.py /opt/venv/lib/python3.11/site-packages/talib_stub.py\n"
                  + f'LABEL io.runner.test.base="{base}"\n'.encode())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile), ("talib_stub.py", b"VERSION = 1\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    engine.images.build(fileobj=buffer, custom_context=True, tag=STRATEGY_IMAGE, rm=True)
    return STRATEGY_IMAGE


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def in_containers(engine_at: str, strategy_image: str,
                        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    system = System(tmp_path_factory.mktemp("containers"), RUNNER_SPAWN_MODE="container",
                    RUNNER_CONTAINER_URL=engine_at, RUNNER_CONTAINER_NETWORK="none",
                    RUNNER_CONTAINER_MEMORY_MB="128", RUNNER_ENABLE_CHAOS="1",
                    RUNNER_CONTAINER_IMAGES=json.dumps([strategy_image]))
    await system.start()
    yield system
    await system.stop()


def worker_processes(worker_id: str) -> int:
    """Python processes on this machine running as `worker_id` (a container's init, which
    carries the same environment, aside)."""
    count = 0
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or not (proc / "comm").read_text().startswith("python"):
                continue
            if "zombie" in (proc / "status").read_text():
                continue
            if f"RUNNER_WORKER_ID={worker_id}".encode() in (proc / "environ").read_bytes().split(
                    b"\0"):
                count += 1
        except OSError:
            continue
    return count


def containers(engine: Any, worker_id: str, *, running: bool = False) -> list[Any]:
    return engine.containers.list(all=not running,
                                  filters={"label": f"{LABEL_WORKER}={worker_id}"})


async def until(condition: Any, timeout: float = 30.0) -> Any:
    """`broker_helpers.until` for a blocking condition (the engine's SDK), run in a thread."""
    return await wait_until(lambda: asyncio.to_thread(condition), timeout, "the engine")


async def test_a_container_worker_runs_restarts_and_stops_with_flatten(
        in_containers: System, engine: Any) -> None:
    system = in_containers
    user, client = await system.user()
    body = start_body("hold", amount=1)
    worker_id = (await client.start(**body))["workerId"]
    entry = await system.wait_for_worker(
        client, worker_id, lambda e: e["worker"]["status"] == "running" and e["positions"])

    (container,) = await until(lambda: containers(engine, worker_id, running=True))
    attrs = container.attrs
    env = dict(item.split("=", 1) for item in attrs["Config"]["Env"])
    assert (env["USER_ID"], env["STRATEGY_ID"], env["BROKER_ID"]) == (
        user, body["strategyId"], "paper")
    assert json.loads(env["CONFIG"])["type"] == "hold"
    secrets = body["credentials"]["apiKey"], body["credentials"]["apiSecret"]
    assert not any(s in json.dumps(attrs) for s in secrets)  # over its channel, never its env
    assert container.labels[LABEL_HOST] == "host-1" and container.labels[LABEL_ATTEMPT] == "0"
    assert attrs["HostConfig"]["ReadonlyRootfs"] and attrs["Config"]["User"] != "0:0"

    os.kill(entry["worker"]["pid"], signal.SIGKILL)  # the container's process, as seen here
    restarted = await system.wait_for_worker(
        client, worker_id,
        lambda e: e["worker"]["status"] == "running" and e["worker"]["restartCount"] == 1)
    assert restarted["worker"]["pid"] != entry["worker"]["pid"]
    (again,) = await until(lambda: containers(engine, worker_id, running=True))
    assert again.labels[LABEL_ATTEMPT] == "1" and again.id != container.id

    stopped = await client.stop(worker_id, flatten=True)
    assert stopped["success"] and stopped["flattenedPositions"] == 1
    await until(lambda: not containers(engine, worker_id), timeout=15)


async def test_a_host_killed_and_started_again_removes_its_containers_none_runs_twice(
        in_containers: System, engine: Any) -> None:
    system = in_containers
    _, client = await system.user()
    worker_id = (await client.start(**start_body("hold", amount=1)))["workerId"]
    await system.wait_for_worker(client, worker_id,
                                 lambda e: e["worker"]["status"] == "running")
    first = await until(lambda: containers(engine, worker_id, running=True))
    assert worker_processes(worker_id) == 1

    doubles: list[int] = []

    async def never_twice() -> None:
        while True:
            found = await asyncio.to_thread(containers, engine, worker_id, running=True)
            processes = worker_processes(worker_id)  # the engine's view, and this machine's
            if len(found) > 1 or processes > 1:
                doubles.append(max(len(found), processes))
            await asyncio.sleep(0.1)

    watching = asyncio.create_task(never_twice())
    try:
        system.supervisor.kill("worker-host host-1", restart=False)
        await system.supervisor.revive("worker-host host-1")
        restarted = await system.wait_for_worker(
            client, worker_id,
            lambda e: e["worker"]["status"] == "running" and e["worker"]["restartCount"] >= 1,
            timeout=40)
        (now,) = await until(lambda: containers(engine, worker_id, running=True))
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    assert now.id != first[0].id and doubles == []
    assert all(c.status == "running" for c in containers(engine, worker_id))  # the old: gone
    assert restarted["worker"]["hostId"] == "host-1"
    await client.stop(worker_id)
    await until(lambda: not containers(engine, worker_id), timeout=15)


async def test_a_container_worker_past_its_memory_limit_is_killed_and_reported_so(
        in_containers: System) -> None:
    system = in_containers
    _, client = await system.user()
    worker_id = (await client.start(**start_body("chaos", amount=1, hogAfter=0.2)))["workerId"]

    def crashed_out_of_memory(log: list[Any]) -> bool:
        return any(e.type == "WorkerCrashed" and e.payload["worker_id"] == worker_id
                   and e.payload["reason"] == "exited"
                   and e.payload["detail"] == "killed by SIGKILL: out of memory (over its "
                                              "128 MiB limit)" for e in log)

    await system.wait_for_log(crashed_out_of_memory, timeout=30)
    await client.stop(worker_id)


async def test_a_strategy_runs_in_the_allowed_image_it_names_and_not_in_another(
        in_containers: System, engine: Any) -> None:
    system = in_containers
    _, client = await system.user()
    body = start_body("hold", amount=1)
    body["config"]["image"] = STRATEGY_IMAGE
    worker_id = (await client.start(**body))["workerId"]
    await system.wait_for_worker(client, worker_id,
                                 lambda e: e["worker"]["status"] == "running")
    (container,) = await until(lambda: containers(engine, worker_id, running=True))
    assert container.image.id == engine.images.get(STRATEGY_IMAGE).id
    found = await asyncio.to_thread(container.exec_run, ["/opt/venv/bin/python", "-c",
                                                         "import talib_stub"])
    assert found.exit_code == 0  # its own library, which the host's venv has not
    await client.stop(worker_id)

    body["config"]["image"] = "someone/miner:latest"
    with pytest.raises(GatewayError) as refused:
        await client.start(**body)
    assert refused.value.status == 422 and "not an allowed worker image" in str(refused.value)


async def test_a_hung_container_worker_is_killed_and_restarted(in_containers: System,
                                                               engine: Any) -> None:
    system = in_containers
    _, client = await system.user()
    worker_id = (await client.start(**start_body("chaos", amount=1, hangAfter=0.5)))["workerId"]
    await system.wait_for_log(lambda log: any(
        e.type == "WorkerCrashed" and e.payload["worker_id"] == worker_id
        and e.payload["reason"] == "heartbeat_timeout" for e in log), timeout=30)
    await system.wait_for_worker(client, worker_id,
                                 lambda e: e["worker"]["restartCount"] >= 1)
    await client.stop(worker_id)
    await until(lambda: not containers(engine, worker_id), timeout=30)


async def test_a_frozen_hosts_containers_end_within_its_lease_and_none_runs_twice(
        in_containers: System, engine: Any) -> None:
    """A host that stalls (SIGSTOP) renews no lease: its container workers end themselves when
    it runs out (the host's clock is theirs), the engine shows none running, and once the host
    goes on the worker runs again, never twice."""
    system = in_containers
    _, client = await system.user()
    worker_id = (await client.start(**start_body("hold", amount=1)))["workerId"]
    await system.wait_for_worker(client, worker_id,
                                 lambda e: e["worker"]["status"] == "running")
    await until(lambda: containers(engine, worker_id, running=True))
    lease = float(system.env["RUNNER_HOST_LEASE"])
    host = system.supervisor.child("worker-host host-1").process
    assert host is not None
    host.send_signal(signal.SIGSTOP)
    frozen_at = asyncio.get_running_loop().time()
    try:
        while worker_processes(worker_id):
            assert asyncio.get_running_loop().time() - frozen_at < lease + 1.5, \
                "a container worker outlived its host's lease"
            await asyncio.sleep(0.05)
    finally:
        host.send_signal(signal.SIGCONT)
    await system.wait_for_worker(
        client, worker_id,
        lambda e: e["worker"]["status"] == "running" and e["worker"]["restartCount"] >= 1,
        timeout=40)
    running = await until(lambda: containers(engine, worker_id, running=True))
    assert len(running) == 1 and worker_processes(worker_id) == 1
    await client.stop(worker_id)
    await until(lambda: not containers(engine, worker_id), timeout=15)
