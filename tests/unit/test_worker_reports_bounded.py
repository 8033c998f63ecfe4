"""A worker's control lines are untrusted: bounded in size, numbers, strings, items, depth and
rate, or a ProtocolViolation that says what is wrong, never what the line held; ids that name
files follow one pattern in every event."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from events import JobDispatched, OrderFilled, StopRunner, WorkerCrashed
from events.values import StrategyConfig
from services.worker import protocol
from services.worker.protocol import (
    LINE_BURST,
    MAX_LINE,
    Beat,
    LineBudget,
    ProtocolViolation,
    Report,
    decode,
    encode,
)
from services.worker_host.spawner import WorkerProcess

MARK = {"instrument": "BTC-PERPETUAL", "side": "long", "amount": 1.0, "entry_price": 1.0,
        "mark_price": 1.0, "unrealized_pnl": 0.0}


def beat(**mark: Any) -> bytes:
    return json.dumps({"type": "heartbeat", "at": datetime.now(UTC).isoformat(),
                       "positions": [MARK | mark]}).encode()


def test_valid_lines_decode_as_before() -> None:
    line = Beat(at=datetime.now(UTC), positions=())
    assert decode(encode(line)) == line
    report = Report(event="OrderFilled", payload={"order_id": "o-1"})
    assert decode(encode(report)) == report


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"x" * (MAX_LINE + 1), "a line of 65537 bytes"),
        (b"{not json", "not JSON"),
        (beat().replace(b'"amount": 1.0', b'"amount": NaN'), "not finite (NaN)"),
        (beat().replace(b'"amount": 1.0', b'"amount": -Infinity'), "not finite"),
        (beat().replace(b'"amount": 1.0', b'"amount": 1e999'), "not finite"),
        (beat(instrument="B" * 5000), "a string of 5000 characters"),
        (json.dumps({"type": "event", "event": "OrderFilled",
                     "payload": {"fills": [0] * 1001}}).encode(), "1001 items"),
        (json.dumps({"type": "event", "event": "OrderFilled",
                     "payload": {"a": [[[[[[[[[1]]]]]]]]]}}).encode(), "nested deeper"),
        (json.dumps({"type": "heartbeat", "at": "yesterday-ish"}).encode(), "not a valid line"),
        (json.dumps({"type": "shell", "cmd": "rm -rf /"}).encode(), "not a valid line"),
    ],
)
def test_out_of_bounds_lines_are_violations_that_quote_nothing(raw: bytes, says: str) -> None:
    with pytest.raises(ProtocolViolation, match=says.replace("(", r"\(").replace(")", r"\)")) as e:
        decode(raw)
    assert len(str(e.value)) < 300 and "BBBB" not in str(e.value) and "rm -rf" not in str(e.value)


def test_the_line_budget_allows_a_burst_then_the_rate() -> None:
    budget = LineBudget(rate=10, burst=5)
    assert all(budget.take(100.0) for _ in range(5))
    assert not budget.take(100.0)
    assert budget.take(100.1)  # one more after a tenth of a second
    assert not budget.take(100.1)
    assert sum(budget.take(101.1 + n / 1000) for n in range(20)) == 5  # never above the burst


async def test_a_worker_over_its_budget_or_its_line_length_is_a_violation() -> None:
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_LINE)

    class Alive:
        pid, running = 0, True

    worker = WorkerProcess("w-1", "j-1", "u-1", 0, Alive(), reader, writer)  # type: ignore[arg-type]
    worker.budget = protocol.LineBudget(rate=1e-6)  # no refill while a loaded machine reads
    line = encode(Beat(at=datetime.now(UTC)))
    theirs.sendall(line * int(LINE_BURST + 1))
    for _ in range(int(LINE_BURST)):
        assert await worker.next_line() == line
    with pytest.raises(ProtocolViolation, match="more than 1e-06 lines a second"):
        await worker.next_line()

    worker.budget = protocol.LineBudget()
    theirs.sendall(b"x" * (MAX_LINE + 10) + b"\n")
    with pytest.raises(ProtocolViolation, match="a line over 65536 bytes"):
        await worker.next_line()
    writer.close()
    theirs.close()


@pytest.mark.parametrize("bad", ["../etc", "w/1", ".hidden", "-rf", "", "w" * 101, "w 1"])
def test_ids_that_name_files_follow_one_pattern_in_every_event(bad: str) -> None:
    config = StrategyConfig(name="hold", type="hold")
    with pytest.raises(ValidationError):
        JobDispatched(job_id="j-1", worker_id=bad, host_id="h-1", strategy_id="s",
                      broker_id="paper", credentials_sealed="x", config=config)
    with pytest.raises(ValidationError):
        WorkerCrashed(job_id="j-1", worker_id="w-1", host_id=bad, reason="exited")
    with pytest.raises(ValidationError):
        OrderFilled(job_id=bad, worker_id="w-1", order_id="o", instrument="BTC", side="buy",
                    amount=1, price=1)
    with pytest.raises(ValidationError):
        StopRunner(worker_id=bad)
    assert StopRunner(worker_id="worker-0a1b2c3d4e5f").worker_id == "worker-0a1b2c3d4e5f"
