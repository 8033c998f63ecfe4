"""Container workers (RUNNER_SPAWN_MODE=container) beside the fork-server and exec, in one run.

Floor: the engine's own create + start of a container from the worker image (through the same
Docker Engine API), which no container worker can beat. Ours: `ContainerSpawner` starting the
real worker runtime (a paper `hold`) → its first heartbeat, p50 and p99 one at a time, and
starts/s in a burst; the same for the fork-server and exec spawners. Memory: unique (USS) of an
idle worker's interpreter, and of the engine's monitor (conmon) per container; host CPU: the
host's CPU per container worker while they idle (beats every second). Skipped (no figures)
where no engine answers or it lacks the worker image.

    .venv/bin/python -m bench.containers [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.report import Figure, percentile, table
from bench.spawn import MiB, uss

ENGINES = ("unix:///run/podman/podman.sock", "unix:///var/run/docker.sock")


def engine_url() -> str | None:
    """An engine that answers and holds the worker image, if any."""
    import docker

    from services.worker_host.worker_image import DEFAULT_IMAGE

    for url in filter(None, (os.environ.get("RUNNER_CONTAINER_URL"), *ENGINES)):
        try:
            client = docker.DockerClient(base_url=url, timeout=30)
        except Exception:
            continue
        try:
            client.images.get(DEFAULT_IMAGE)
            return url
        except Exception:
            continue
        finally:
            client.close()
    return None


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(p) for p in listing.read().split()]
    except OSError:
        return []


def interpreter(pid: int) -> int:
    """The worker's interpreter: `pid` itself, or the child of a container's init."""
    return next(iter(children(pid)), pid)


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def host_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def requests(workdir: Path):
    from services.worker_host.spawner import SpawnRequest, worker_environment

    config = json.dumps({"name": "bench", "type": "hold", "parameters": {"amount": 1}})
    number = 0

    def make() -> SpawnRequest:
        nonlocal number
        number += 1
        wid = f"bw{os.getpid()}-{number}"
        env = worker_environment(worker_id=wid, job_id=f"j-{wid}", user_id="bench",
                                 strategy_id="bench", broker_id="paper", config_json=config,
                                 heartbeat_interval=1.0)
        return SpawnRequest(wid, f"j-{wid}", "bench", 0, env, workdir / wid, 60.0,
                            {"apiKey": "bench-key", "apiSecret": "bench-secret"})

    return make


async def first_beat(spawner: Any, request: Any) -> tuple[float, Any]:
    """Seconds from the spawn's start to its first heartbeat, and the worker."""
    from services.worker import protocol

    started = time.perf_counter()
    worker = await spawner.spawn(request)
    worker.send(protocol.Lease(until=time.monotonic() + 3600))
    while not isinstance(protocol.decode(await worker.reader.readline()), protocol.Beat):
        pass
    return time.perf_counter() - started, worker


async def stop(worker: Any) -> None:
    from services.worker import protocol

    worker.send(protocol.Stop())
    while await worker.reader.readline():
        pass
    await worker.wait()
    worker.writer.close()


async def measure(spawner: Any, workdir: Path, one_by_one: int, burst: int,
                  idle: float) -> dict[str, float]:
    make = requests(workdir)
    await spawner.start()
    try:
        await stop((await first_beat(spawner, make()))[1])  # warm-up
        latencies = []
        for _ in range(one_by_one):
            took, worker = await first_beat(spawner, make())
            latencies.append(took * 1000)
            await stop(worker)
        started = time.perf_counter()
        workers = [w for _, w in await asyncio.gather(
            *(first_beat(spawner, make()) for _ in range(burst)))]
        rate = burst / (time.perf_counter() - started)
        draining = [asyncio.create_task(_drain(w)) for w in workers]
        cpu = host_cpu()
        await asyncio.sleep(idle)
        cpu_per_worker = (host_cpu() - cpu) / idle / burst * 100
        memory = statistics.median(uss(interpreter(w.pid)) for w in workers) / MiB
        monitors = [parent(w.pid) for w in workers]
        monitor = statistics.median(uss(m) for m in monitors) / MiB
        for task in draining:
            task.cancel()
        await asyncio.gather(*draining, return_exceptions=True)
        await asyncio.gather(*(stop(w) for w in workers))
        return {"p50": statistics.median(latencies), "p99": percentile(latencies, 99),
                "rate": rate, "uss": memory, "monitor": monitor, "cpu": cpu_per_worker}
    finally:
        await spawner.close()


async def _drain(worker: Any) -> None:
    while await worker.reader.readline():
        pass


def floor(url: str, samples: int) -> float:
    """p50 ms of the engine's create + start of a worker-image container (then removed)."""
    import docker

    from services.worker_host.container_spawner import remove
    from services.worker_host.worker_image import DEFAULT_IMAGE

    client = docker.DockerClient(base_url=url, timeout=60)
    took = []
    try:
        for _ in range(samples):
            started = time.perf_counter()
            container = client.containers.create(
                DEFAULT_IMAGE, entrypoint=["/opt/venv/bin/python", "-c", "import sys"],
                network_mode="none", init=True, read_only=True)
            container.start()
            took.append((time.perf_counter() - started) * 1000)
            remove(container)
    finally:
        client.close()
    return statistics.median(took)


async def run(quick: bool) -> list[Figure]:
    url = await asyncio.to_thread(engine_url)
    if url is None:
        Console().print("bench.containers: no container engine with the worker image "
                        "(`runner images build`): skipped")
        return []
    from services.settings import Settings
    from services.worker_host.spawners import make_spawner

    one_by_one, burst, idle = (3, 3, 1.0) if quick else (30, 20, 10.0)
    settings = Settings(container_url=url, worker_uids="", container_network="none")
    engine_floor = await asyncio.to_thread(floor, url, one_by_one)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("container", "fork", "exec"):
            spawner = make_spawner(mode, Path(tmp) / mode, None, settings, f"bench-{os.getpid()}")
            results[mode] = await measure(spawner, Path(tmp) / mode, one_by_one, burst, idle)
    ours, fork, exec_ = results["container"], results["fork"], results["exec"]
    n = f"n={one_by_one}, burst of {burst}"
    return [
        Figure("container start → first heartbeat p50", ours["p50"], "ms", engine_floor,
               "the engine's create + start alone", higher_is_better=False, note=n),
        Figure("container start → first heartbeat p99", ours["p99"], "ms", ours["p50"],
               "its p50", higher_is_better=False),
        Figure("container vs fork-server, start → first heartbeat p50", ours["p50"], "ms",
               fork["p50"], "fork-server", higher_is_better=False),
        Figure("container vs exec, start → first heartbeat p50", ours["p50"], "ms",
               exec_["p50"], "exec", higher_is_better=False),
        Figure("container starts/s in a burst", ours["rate"], "starts/s", fork["rate"],
               "fork-server", note=f"exec: {exec_['rate']:.1f}/s"),
        Figure("idle container worker USS", ours["uss"], "MiB", fork["uss"],
               "forked worker", higher_is_better=False, note=f"exec'd: {exec_['uss']:.1f} MiB"),
        Figure("engine's monitor (conmon) USS per container", ours["monitor"], "MiB",
               higher_is_better=False),
        Figure("host CPU per idle container worker", ours["cpu"], "% of a core", fork["cpu"],
               "per forked worker", higher_is_better=False, note=f"beats every 1 s, {n}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    figures = asyncio.run(run(parser.parse_args().quick))
    Console().print(table(figures, "container workers"))


if __name__ == "__main__":
    main()
