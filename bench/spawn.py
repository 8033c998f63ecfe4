"""Worker spawn: our exec and fork-server spawners beside the raw limits, measured in one run.

References: `exec` of a Python child that imports aio_pika (→ a "ready" byte on a pipe), and a
minimal fork-server that imported aio_pika once (fork → the child writes "ready"). Ours:
`ExecSpawner` and `ForkSpawner` starting the real worker runtime (a paper `hold`) → its Hello.
Each: p50 of one-at-a-time spawns, and spawns/s in a burst (all requested at once, until the
last is ready).
Memory: unique (USS: Private_Clean + Private_Dirty) of idle children.

    .venv/bin/python -m bench.spawn [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from rich.console import Console

from bench.report import Figure, at_least, at_most, table

MiB = 1024 * 1024
RAW_CHILD = "import aio_pika, os, sys; os.write(int(sys.argv[1]), b'r'); sys.stdin.read()"
RAW_FORKSERVER = """
import aio_pika, os, signal, socket, sys
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
server = socket.socket(fileno=int(sys.argv[1]))
while True:
    message, fds, _, _ = socket.recv_fds(server, 16, 1)
    if not message:
        break
    pid = os.fork()
    if pid == 0:
        server.close()
        os.write(fds[0], b"r")
        os.read(fds[0], 1)
        os._exit(0)
    os.close(fds[0])
    server.send(str(pid).encode())
"""

Spawn = Callable[[], Awaitable[Callable[[], Awaitable[None]]]]  # → ready; returns its reaper


def uss(pid: int) -> int:
    """Bytes only this process maps (what killing it would free)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            if name in ("Private_Clean", "Private_Dirty"):
                fields[name] = int(rest.split()[0]) * 1024
    return sum(fields.values())


async def timed(spawn: Spawn, one_by_one: int, burst: int) -> tuple[float, float, list]:
    """(p50 ms one at a time, spawns/s in a burst, the burst's reapers: children still idle)."""
    latencies = []
    for _ in range(one_by_one):
        started = time.perf_counter()
        reap = await spawn()
        latencies.append((time.perf_counter() - started) * 1000)
        await reap()
    started = time.perf_counter()
    reapers = await asyncio.gather(*(spawn() for _ in range(burst)))
    rate = burst / (time.perf_counter() - started)
    return statistics.median(latencies), rate, reapers


# ---------------------------------------------------------------- raw references


async def raw_exec() -> Callable[[], Awaitable[None]]:
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    ready = loop.create_future()
    loop.add_reader(r, lambda: ready.done() or ready.set_result(None))
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RAW_CHILD, str(w), pass_fds=(w,), stdin=asyncio.subprocess.PIPE
        )
        os.close(w)
        await ready
    finally:
        loop.remove_reader(r)
        os.close(r)

    async def reap() -> None:
        process.stdin.close()
        await process.wait()

    reap.pid = process.pid  # type: ignore[attr-defined]
    return reap


class RawForkServer:
    """A minimal fork-server: aio_pika imported once; per request one fork whose child writes
    "ready" on the socket it was handed, then idles until that socket closes."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RAW_FORKSERVER, str(theirs.fileno()), pass_fds=(theirs.fileno(),)
        )
        theirs.close()
        self.sock.setblocking(False)

    async def close(self) -> None:
        self.sock.close()
        await self.process.wait()

    async def spawn(self) -> Callable[[], Awaitable[None]]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        async with self.lock:
            socket.send_fds(self.sock, [b"f"], [theirs.fileno()])
            pid = int(await loop.sock_recv(self.sock, 16))
        theirs.close()
        await loop.sock_recv(ours, 1)

        async def reap() -> None:
            ours.close()

        reap.pid = pid  # type: ignore[attr-defined]
        return reap


# ---------------------------------------------------------------- ours


def our_spawn(spawner, workdir: Path) -> Spawn:
    from services.worker import protocol
    from services.worker_host.spawner import SpawnRequest, worker_environment

    numbers = iter(range(1_000_000))
    config = json.dumps({"name": "bench", "type": "hold", "parameters": {"amount": 1}})

    async def spawn() -> Callable[[], Awaitable[None]]:
        wid = f"w{next(numbers)}"
        env = worker_environment(
            worker_id=wid,
            job_id=f"j-{wid}",
            user_id="bench",
            strategy_id="bench",
            broker_id="paper",
            config_json=config,
            heartbeat_interval=5.0,
        )
        worker = await spawner.spawn(
            SpawnRequest(wid, f"j-{wid}", "bench", 0, env, workdir / wid, 30.0,
                         {"apiKey": "bench-key", "apiSecret": "bench-secret"})
        )

        async def drain() -> None:
            while await worker.reader.readline():
                pass

        draining = asyncio.create_task(drain())  # keep its channel flowing while it idles

        async def reap() -> None:
            worker.send(protocol.Stop())
            await worker.wait()
            await draining
            worker.writer.close()

        reap.pid = worker.pid  # type: ignore[attr-defined]
        return reap

    return spawn


async def measure_ours(mode: str, workdir: Path, one_by_one: int, burst: int):
    from services.worker_host.spawners import make_spawner

    spawner = make_spawner(mode, workdir / mode)
    await spawner.start()
    try:
        spawn = our_spawn(spawner, workdir / mode)
        await (await spawn())()  # warm-up (the fork-server's own start and imports)
        p50, rate, reapers = await timed(spawn, one_by_one, burst)
        await asyncio.sleep(1.0)  # idle: strategy started, first beats sent
        memory = statistics.median(uss(reap.pid) for reap in reapers) / MiB
        await asyncio.gather(*(reap() for reap in reapers))
        return p50, rate, memory
    finally:
        await spawner.close()


async def run(quick: bool) -> list[Figure]:
    one_by_one, burst = (10, 20) if quick else (30, 100)
    exec_p50, exec_rate, reapers = await timed(raw_exec, one_by_one, burst)
    await asyncio.sleep(0.5)
    exec_uss = statistics.median(uss(reap.pid) for reap in reapers) / MiB
    await asyncio.gather(*(reap() for reap in reapers))

    raw = RawForkServer()
    await raw.start()
    try:
        await (await raw.spawn())()
        fs_p50, fs_rate, reapers = await timed(raw.spawn, one_by_one, burst)
        await asyncio.sleep(0.5)
        fs_uss = statistics.median(uss(reap.pid) for reap in reapers) / MiB
        await asyncio.gather(*(reap() for reap in reapers))
    finally:
        await raw.close()

    with tempfile.TemporaryDirectory() as tmp:
        ours_exec = await measure_ours("exec", Path(tmp), one_by_one, burst)
        ours_fork = await measure_ours("fork", Path(tmp), one_by_one, burst)

    n = f"n={one_by_one}, burst of {burst}"
    return [
        Figure(
            "spawn → hello p50, our exec spawner",
            ours_exec[0],
            "ms",
            exec_p50,
            "raw exec of python + aio_pika → ready",
            higher_is_better=False,
            note=n,
        ),
        Figure(
            "spawn → hello p50, our fork-server",
            ours_fork[0],
            "ms",
            fs_p50,
            "raw fork-server (aio_pika imported) → ready",
            higher_is_better=False,
        ),
        Figure(
            "spawns/s in a burst, our exec spawner",
            ours_exec[1],
            "spawns/s",
            exec_rate,
            "raw exec of python + aio_pika",
        ),
        Figure(
            "spawns/s in a burst, our fork-server",
            ours_fork[1],
            "spawns/s",
            fs_rate,
            "raw fork-server",
            target="≥ 100/s",
            met=at_least(ours_fork[1], 100),
        ),
        Figure(
            "idle worker USS, exec'd",
            ours_exec[2],
            "MiB",
            exec_uss,
            "raw exec'd python + aio_pika",
            higher_is_better=False,
        ),
        Figure(
            "idle worker USS, forked",
            ours_fork[2],
            "MiB",
            fs_uss,
            "raw fork-server child",
            target="≤ 8 MiB",
            met=at_most(ours_fork[2], 8),
            higher_is_better=False,
        ),
        Figure(
            "fork-server vs exec, spawn → hello p50",
            ours_fork[0],
            "ms",
            ours_exec[0],
            "our exec spawner",
            higher_is_better=False,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    figures = asyncio.run(run(parser.parse_args().quick))
    Console().print(table(figures, "worker spawn"))


if __name__ == "__main__":
    main()
