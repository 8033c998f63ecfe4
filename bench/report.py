"""What every benchmark returns, and how the suite prints and saves it.

A benchmark module exposes `async def run(quick: bool) -> list[Figure]`. Each figure is
measured in the same run as its reference (never quoted), so the ratio compares like with like
on this machine, today.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from rich.table import Table

LOG_TAIL = 40  # lines of the services' log shown when a benchmark fails
SHARED_BROKER = "rabbitmq (whole broker)"


@dataclass(frozen=True)
class Figure:
    name: str  # what was measured, e.g. "event log ingest (publish → recorded)"
    ours: float
    unit: str  # "events/s", "ms", "MiB", …
    reference: float | None = None  # the limit or peer measured in the same run
    reference_name: str = ""  # e.g. "raw aio-pika pipelined confirms"
    target: str = ""  # human-readable target, e.g. "≥ 70 % of reference"
    met: bool | None = None  # None when there is no target
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """ours / reference, oriented so that > 1 means we do better."""
        if not self.reference or not self.ours:
            return None
        return self.ours / self.reference if self.higher_is_better else self.reference / self.ours

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio}


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def at_least(value: float, bound: float) -> bool:
    return value >= bound


def at_most(value: float, bound: float) -> bool:
    return value <= bound


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def table(figures: list[Figure], title: str) -> Table:
    out = Table(title=title)
    for column in ("figure", "ours", "reference", "ratio", "target", "met?"):
        out.add_column(
            column, justify="left" if column in ("figure", "reference", "target") else "right"
        )
    for f in figures:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "–"}[f.met]
        reference = f"{_number(f.reference, f.unit)} ({f.reference_name})" if f.reference else "–"
        ratio = f"{f.ratio:.2f}×" if f.ratio is not None else "–"
        out.add_row(
            f.name + (f" [dim]{f.note}[/]" if f.note else ""),
            _number(f.ours, f.unit),
            reference,
            ratio,
            f.target or "–",
            met,
        )
    return out


@contextmanager
def scratch_with_services_log() -> Iterator[tuple[Path, IO[str]]]:
    """A scratch directory and a log file in it for the services a benchmark runs. If the
    benchmark fails, the log's last warnings and errors go to stderr before it is deleted, so a
    failure (in CI too) shows what the services said."""
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "services.log", "w+") as log:
        try:
            yield Path(tmp), log
        except BaseException:
            log.flush()
            log.seek(0)
            said = [line for line in log if " INFO " not in line and " DEBUG " not in line]
            print(f"the services' last warnings and errors ({len(said)} in all):", file=sys.stderr)
            sys.stderr.writelines(said[-LOG_TAIL:])
            raise


def cpu_seconds(pid: int) -> float:
    """CPU time its live threads have used so far (0 once it is gone)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                total += int(schedstat.read().split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total / 1e9


def broker_process() -> dict[str, int]:
    """The local broker's process by name, if it runs on this machine."""
    broker = subprocess.run(["pgrep", "-o", "beam.smp"], capture_output=True, text=True)
    return {SHARED_BROKER: int(broker.stdout.split()[0])} if broker.stdout.strip() else {}


def by_process(values: dict[str, float]) -> str:
    """`name value, …`, the largest first: a figure's breakdown by process, for stderr."""
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(values.items(), key=lambda i: -i[1]))


def without_broker(values: dict[str, float]) -> float:
    """The sum over our processes: the broker serves other vhosts too, so it is shown, not
    counted."""
    return sum(v for k, v in values.items() if k != SHARED_BROKER)


def hold_start() -> dict[str, Any]:
    """The body of `POST /runner/start` for a paper `hold` worker (benchmark traffic)."""
    return {
        "strategyId": f"bench-{uuid.uuid4().hex[:6]}",
        "brokerId": "paper",
        "credentials": {"apiKey": "bench", "apiSecret": "bench"},
        "config": {"name": "bench", "type": "hold", "parameters": {"amount": 1}},
    }
