"""The benchmark suite: each of our figures beside its reference, all measured in one run.

make bench         # the full suite (a few minutes); results in bench/results.json
make bench-quick   # a short version (CI runs it so the suite cannot rot)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import subprocess
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from bench.report import Figure, table

SUITE = (
    "bench.ingest",
    "bench.replay",
    "bench.spawn",
    "bench.isolation",
    "bench.density",
    "bench.start_path",
    "bench.recovery",
    "bench.standby",
    "bench.broker_outage",
    "bench.failover",
    "bench.sse",
    "bench.metrics_cost",
    "bench.markets",
    "bench.containers",
)


def machine() -> dict[str, str]:
    try:
        rabbit = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except OSError:
        rabbit = "unknown"
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "os": platform.platform(),
        "rabbitmq": rabbit,
    }


def reference_loop_ms(repeats: int = 5) -> float:
    """This machine's speed for pure Python now: the best of `repeats` runs of a fixed loop
    (one million additions and dict stores), in ms, before and after the suite. Runs whose loops
    differ compare machines, not code: the benchmark VM's speed moves by tens of percent within
    minutes."""
    best = float("inf")
    for _ in range(repeats):
        started, total, seen = time.perf_counter(), 0, {}
        for i in range(1_000_000):
            total += i
            seen[i & 1023] = total
        best = min(best, time.perf_counter() - started)
    return best * 1000


async def suite(quick: bool, only: list[str], console: Console) -> tuple[list[Figure], list[str]]:
    figures: list[Figure] = []
    failed: list[str] = []
    for name in SUITE:
        if only and not any(o in name for o in only):
            continue
        console.rule(f"{name}{' (quick)' if quick else ''}")
        started = time.perf_counter()
        try:
            module = importlib.import_module(name)
            got = await module.run(quick)
        except Exception:
            console.print(f"[red]{name} failed:[/]\n{traceback.format_exc()}")
            failed.append(name)
            continue
        console.print(table(got, f"{name} ({time.perf_counter() - started:.0f} s)"))
        figures += got
    return figures, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", default=[], help="run modules matching this")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)  # logs and CI: one row per figure
    speed_before = reference_loop_ms()
    figures, failed = asyncio.run(suite(args.quick, args.only, console))
    speed = {"reference_loop_ms": f"{speed_before:.0f} before, {reference_loop_ms():.0f} after"}
    console.rule("summary")
    console.print(
        table(figures, "Runner Orchestrator benchmarks" + (" (quick)" if args.quick else ""))
    )
    console.print(f"this machine's reference loop, ms: {speed['reference_loop_ms']}")
    output = args.output or Path(__file__).with_name(
        "results-quick.json" if args.quick else "results.json"
    )
    output.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "quick": args.quick,
                "machine": machine() | speed,
                "figures": [f.as_json() for f in figures],
                "failed": failed,
            },
            indent=2,
        )
        + "\n"
    )
    console.print(f"written to {output}")
    if failed:
        raise SystemExit(f"benchmarks that crashed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
