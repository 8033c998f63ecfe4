"""The cost of worker isolation (docs/SECURITY.md), measured in one run: start → first heartbeat
(the spawn request to the worker's first Beat on its channel) and the unique memory (USS) of an
idle worker, forked and exec'd, each as the host runs them (a uid and gid of its own, limits,
Landlock and seccomp) beside the same spawner with none of it; and the time to get a uid back
after its worker ends (the sweep that proves nothing runs under it any more).

Workers start one at a time, with and without isolation in turn, and stay up (idle hold
workers), so the last ones start beside the first: n = 10 of each with --quick, 40 otherwise.
Without root the isolated runs lack only the uid switch (and say so).

    .venv/bin/python -m bench.isolation [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from bench.report import Figure, at_most, table
from bench.spawn import MiB, uss

UIDS = range(64800, 64900)  # the bench's own, beside the hosts' default range


def isolations() -> dict[str, object]:
    from services.worker.confinement import Limits
    from services.worker_host.isolation import Isolation

    limits = Limits(address_space=4096 * MiB, open_files=256, processes=64)
    return {
        "plain": Isolation(),
        "isolated": Isolation(UIDS if os.geteuid() == 0 else None, limits=limits, sandbox=True,
                              tcp_ports=(443,)),
    }


async def compare(mode: str, workdir: Path, n: int) -> dict[str, tuple[float, float]]:
    """{variant: (p50 ms start → first heartbeat, median idle USS MiB)}, the variants' starts
    interleaved (plain, isolated, plain, ...) so that a busy moment of the machine costs both."""
    from services.worker import protocol
    from services.worker_host.spawner import SpawnRequest, worker_environment
    from services.worker_host.spawners import make_spawner

    spawners = {name: make_spawner(mode, workdir / name, isolation)  # type: ignore[arg-type]
                for name, isolation in isolations().items()}
    for spawner in spawners.values():
        await spawner.start()
    config = json.dumps({"name": "bench", "type": "hold", "parameters": {"amount": 1}})
    workers: dict[str, list] = {name: [] for name in spawners}
    latencies: dict[str, list[float]] = {name: [] for name in spawners}
    try:
        for number in range(n + 1):  # the first warms each spawner up: not counted
            for name, spawner in spawners.items():
                wid = f"w-{number}"
                env = worker_environment(
                    worker_id=wid, job_id=f"j-{wid}", user_id=f"u-{number}",
                    strategy_id="bench", broker_id="paper", config_json=config,
                    heartbeat_interval=5.0)
                started = time.perf_counter()
                worker = await spawner.spawn(SpawnRequest(
                    wid, f"j-{wid}", f"u-{number}", 0, env, workdir / name / wid, 30.0,
                    {"apiKey": "bench-key", "apiSecret": "bench-secret"}))
                while not isinstance(protocol.decode(await worker.reader.readline()),
                                     protocol.Beat):
                    pass
                if number:
                    latencies[name].append((time.perf_counter() - started) * 1000)
                workers[name].append(worker)
        await asyncio.sleep(1.0)  # idle: strategy started, first beats sent
        return {name: (statistics.median(latencies[name]),
                       statistics.median(uss(w.pid) for w in workers[name][1:]) / MiB)
                for name in spawners}
    finally:
        for worker in [w for ws in workers.values() for w in ws]:
            worker.send(protocol.Stop())
            await worker.wait()
            worker.writer.close()
        for spawner in spawners.values():
            await spawner.close()


async def sweep_ms(n: int) -> float | None:
    """p50 of one uid's sweep (a process run under it, nothing left to end)."""
    if os.geteuid() != 0:
        return None
    from services.worker_host.isolation import Identity, sweep

    times = []
    for uid in list(UIDS)[:n]:
        started = time.perf_counter()
        assert await sweep(Identity(uid, uid))
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def run(quick: bool) -> list[Figure]:
    n = 10 if quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: await compare(mode, Path(tmp) / mode, n) for mode in ("fork", "exec")}
    swept = await sweep_ms(n)
    note = f"n={n}, one at a time, in turn with the reference" + (
        "" if os.geteuid() == 0 else "; not root: no uid switch")
    figures = []
    for mode, label in (("fork", "forked"), ("exec", "exec'd")):
        (plain_ms, plain_uss), (ours_ms, ours_uss) = (
            results[mode]["plain"], results[mode]["isolated"])
        figures += [
            Figure(f"start → first heartbeat p50, {label}, isolated", ours_ms, "ms", plain_ms,
                   "the same without uid, limits, sandbox", target="≤ 1.5× + 2 ms",
                   met=at_most(ours_ms, plain_ms * 1.5 + 2), higher_is_better=False, note=note),
            Figure(f"idle worker USS, {label}, isolated", ours_uss, "MiB", plain_uss,
                   "the same without uid, limits, sandbox", target="≤ + 0.5 MiB",
                   met=at_most(ours_uss, plain_uss + 0.5), higher_is_better=False),
        ]
    if swept is not None:
        figures.append(Figure("a uid's sweep before its reuse, p50", swept, "ms",
                              note="off the start path: after the worker's exit"))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    figures = asyncio.run(run(parser.parse_args().quick))
    Console(width=200 if not sys.stdout.isatty() else None).print(
        table(figures, "worker isolation"))


if __name__ == "__main__":
    main()
