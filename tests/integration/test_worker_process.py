"""The real worker process, driven over its control socket the way a worker-host drives it."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from events import REGISTRY, FlattenFailed, OrderFilled, PositionChanged, PositionsFlattened
from events.values import Position
from services.worker import protocol
from services.worker.brokers.paper import PaperBroker
from services.worker.protocol import Beat, Credentials, Hello, Lease, Report, Stop

REPO = Path(__file__).resolve().parents[2]
BTC = "BTC-PERPETUAL"
ETH = "ETH-USD"
API_KEY = "ak-live-5D1E-integration"
API_SECRET = "sk-live-9F2C-integration"
BEAT = 0.2
CREDENTIALS = Credentials(api_key=API_KEY, api_secret=API_SECRET)
TIMEOUT = 5.0


def hold(*instruments: str, **parameters: Any) -> dict[str, Any]:
    return {
        "name": "Hold test",
        "type": "hold",
        "parameters": parameters,
        "riskManagement": {"maxPositionSize": 10},
        "instruments": list(instruments or (BTC,)),
    }


@dataclass
class Worker:
    """One spawned worker and the host's end of its control channel."""

    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    worker_id: str
    job_id: str
    state_file: Path
    log_file: Path
    process_env: dict[str, str] = field(default_factory=dict)
    received: list[Hello | Beat | Report] = field(default_factory=list)

    async def line(self, timeout: float = TIMEOUT) -> Hello | Beat | Report | None:
        """The next line, or None at EOF."""
        raw = await asyncio.wait_for(self.reader.readline(), timeout)
        if not raw:
            return None
        line = protocol.decode(raw)
        self.received.append(line)
        return line

    async def until(self, wanted: Callable[[Any], bool], timeout: float = TIMEOUT) -> list[Any]:
        """Lines up to and including the first one `wanted` accepts."""
        seen: list[Any] = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.line()
                assert line is not None, f"channel closed while waiting; got {seen}"
                seen.append(line)
                if wanted(line):
                    return seen

    async def rest(self, timeout: float = TIMEOUT) -> list[Any]:
        """Every line until the worker closes the channel."""
        seen: list[Any] = []
        async with asyncio.timeout(timeout):
            while (line := await self.line()) is not None:
                seen.append(line)
        return seen

    async def opened(self, count: int) -> list[Report]:
        """Wait for Hello and the PositionChanged reports of `count` opened positions."""
        lines = await self.until(
            lambda line: len(reports(self.received, "PositionChanged")) == count
        )
        return [line for line in lines if isinstance(line, Report)]

    async def send(self, line: Stop | Lease) -> None:
        self.writer.write(protocol.encode(line))
        await self.writer.drain()

    async def exit_code(self, timeout: float = TIMEOUT) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)

    def log(self) -> str:
        return self.log_file.read_text()

    def saved_positions(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text())["positions"]


def reports(lines: list[Any], event: str) -> list[Report]:
    return [line for line in lines if isinstance(line, Report) and line.event == event]


def beats(lines: list[Any]) -> list[Beat]:
    return [line for line in lines if isinstance(line, Beat)]


Spawn = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start real `python -m services.worker` processes; afterwards kill leftovers and check
    that no credential reached any file or any line the worker sent."""
    workers: list[Worker] = []
    numbers = itertools.count(1)

    async def start(
        config: dict[str, Any], *, state_file: Path | None = None,
        first: protocol.Line | None = CREDENTIALS, **extra_env: str
    ) -> Worker:
        number = next(numbers)
        host_end, worker_end = socket.socketpair()
        worker_id, job_id = f"worker-{number}", f"job-{number}"
        state_file = state_file or tmp_path / f"state-{number}.json"
        log_file = tmp_path / f"worker-{number}.log"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "USER_ID": "user-7",
            "STRATEGY_ID": "integration",
            "BROKER_ID": "paper",
            "CONFIG": json.dumps(config),
            "RUNNER_WORKER_ID": worker_id,
            "RUNNER_JOB_ID": job_id,
            "RUNNER_CONTROL_FD": str(worker_end.fileno()),
            "RUNNER_HEARTBEAT_INTERVAL": str(BEAT),
            "RUNNER_WORKER_STATE": str(state_file),
            "RUNNER_PAPER_SEED": "7",
            **extra_env,
        }
        with open(log_file, "wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.worker",
                env=env,
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=(worker_end.fileno(),),
            )
        worker_end.close()
        if first is not None:
            host_end.sendall(protocol.encode(first))
        reader, writer = await asyncio.open_unix_connection(sock=host_end)
        worker = Worker(process, reader, writer, worker_id, job_id, state_file, log_file, env)
        workers.append(worker)
        return worker

    yield start

    for worker in workers:
        if worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()
        worker.writer.close()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert API_KEY.encode() not in content and API_SECRET.encode() not in content, path
    for worker in workers:
        for line in worker.received:
            dumped = protocol.encode(line).decode()
            assert API_KEY not in dumped and API_SECRET not in dumped


async def test_hello_carries_the_childs_pid(spawn: Spawn) -> None:
    worker = await spawn(hold())
    hello = await worker.line()
    assert hello == Hello(pid=worker.process.pid)
    await worker.send(Stop())
    assert await worker.exit_code() == 0


async def test_beats_arrive_every_interval_with_holds_positions(spawn: Spawn) -> None:
    worker = await spawn(hold(BTC, ETH, amount=0.5))
    await worker.until(lambda line: len(beats(worker.received)) == 4)
    first, *later = beats(worker.received)
    gaps = [(b.at - a.at).total_seconds() for a, b in itertools.pairwise([first, *later])]
    assert all(BEAT * 0.5 < gap < BEAT * 2.5 for gap in gaps), gaps
    assert sum(gaps) / len(gaps) == pytest.approx(BEAT, abs=0.06)
    for beat in later:
        assert [(mark.instrument, mark.side, mark.amount) for mark in beat.positions] == [
            (BTC, "long", 0.5),
            (ETH, "long", 0.5),
        ]
        for mark in beat.positions:
            expected = (mark.mark_price - mark.entry_price) * mark.amount
            assert mark.unrealized_pnl == pytest.approx(expected)
    await worker.send(Stop())
    assert await worker.exit_code() == 0


async def test_opening_fills_are_reported_as_valid_events_with_the_workers_ids(
    spawn: Spawn,
) -> None:
    worker = await spawn(hold(BTC, ETH, amount=0.5))
    lines = await worker.opened(2)
    assert isinstance(lines[0], Report) and isinstance(worker.received[0], Hello)
    assert [line.event for line in lines] == [
        "OrderFilled",
        "PositionChanged",
        "OrderFilled",
        "PositionChanged",
    ]
    events = [REGISTRY[line.event].model_validate(line.payload) for line in lines]
    assert {(event.job_id, event.worker_id) for event in events} == {
        (worker.job_id, worker.worker_id)
    }
    fills = [event for event in events if isinstance(event, OrderFilled)]
    changes = [event for event in events if isinstance(event, PositionChanged)]
    assert [(fill.instrument, fill.side, fill.amount) for fill in fills] == [
        (BTC, "buy", 0.5),
        (ETH, "buy", 0.5),
    ]
    assert all(fill.fee > 0 for fill in fills)
    assert [(c.instrument, c.side, c.amount) for c in changes] == [
        (BTC, "long", 0.5),
        (ETH, "long", 0.5),
    ]
    assert [c.entry_price for c in changes] == [fill.price for fill in fills]
    await worker.send(Stop())
    assert await worker.exit_code() == 0


async def test_stop_with_flatten_closes_every_instrument_then_exits_0(spawn: Spawn) -> None:
    worker = await spawn(hold(BTC, ETH, "SOL-PERPETUAL"))
    await worker.opened(3)
    await worker.send(Stop(flatten=True))
    tail = await worker.rest()
    assert await worker.exit_code() == 0
    final = [line for line in tail if isinstance(line, Report)][-1]
    assert final.event == "PositionsFlattened"
    flattened = PositionsFlattened.model_validate(final.payload)
    assert flattened.count == 3
    assert [(fill.instrument, fill.side, fill.amount) for fill in flattened.fills] == [
        (BTC, "sell", 1.0),
        (ETH, "sell", 1.0),
        ("SOL-PERPETUAL", "sell", 1.0),
    ]
    closes = reports(tail, "TradeClosed")
    assert len(closes) == 3
    assert flattened.realized_pnl == pytest.approx(
        sum(line.payload["realized_pnl"] for line in closes)
    )
    assert worker.saved_positions() == {}
    assert "PositionsFlattened" in worker.log()


async def test_stop_without_flatten_exits_0_and_leaves_positions_open(spawn: Spawn) -> None:
    worker = await spawn(hold(BTC, ETH))
    await worker.opened(2)
    await worker.send(Stop(flatten=False))
    tail = await worker.rest()
    assert await worker.exit_code() == 0
    assert [line for line in tail if isinstance(line, Report)] == []
    assert set(worker.saved_positions()) == {BTC, ETH}


async def test_host_gone_exits_3_without_touching_positions(spawn: Spawn) -> None:
    worker = await spawn(hold(BTC, ETH))
    await worker.opened(2)
    before = worker.saved_positions()
    worker.writer.close()
    assert await worker.exit_code() == protocol.EXIT_HOST_GONE == 3
    assert worker.saved_positions() == before
    assert "host gone" in worker.log()


async def test_lease_that_runs_out_exits_4_without_touching_positions(spawn: Spawn) -> None:
    worker = await spawn(hold(BTC, ETH), RUNNER_LEASE_UNTIL=repr(time.monotonic() + 1.5))
    await worker.opened(2)
    before = worker.saved_positions()
    assert await worker.exit_code(timeout=5) == protocol.EXIT_LEASE_LAPSED == 4
    assert time.monotonic() >= float(worker.process_env["RUNNER_LEASE_UNTIL"])
    assert worker.saved_positions() == before
    assert "lease lapsed" in worker.log()


async def test_renewed_lease_keeps_the_worker_running(spawn: Spawn) -> None:
    worker = await spawn(hold(BTC), RUNNER_LEASE_UNTIL=repr(time.monotonic() + 0.6))
    await worker.opened(1)
    for _ in range(6):  # 1.8 s in all: three times the first lease
        await worker.send(Lease(until=time.monotonic() + 0.6))
        await asyncio.sleep(0.3)
    assert worker.process.returncode is None
    await worker.send(Stop())
    assert await worker.exit_code() == 0


async def test_sigterm_is_a_stop_without_flatten(spawn: Spawn) -> None:
    worker = await spawn(hold(BTC))
    await worker.opened(1)
    worker.process.send_signal(signal.SIGTERM)
    tail = await worker.rest()
    assert await worker.exit_code() == 0
    assert [line for line in tail if isinstance(line, Report)] == []
    assert set(worker.saved_positions()) == {BTC}


async def test_restarted_worker_keeps_its_positions_and_orders_nothing(
    spawn: Spawn, tmp_path: Path
) -> None:
    state = tmp_path / "account.json"
    first = await spawn(hold(BTC, ETH), state_file=state)
    await first.opened(2)
    first.process.kill()  # a crash: no goodbye, no flatten
    await first.exit_code()

    second = await spawn(hold(BTC, ETH), state_file=state)
    lines = await second.until(lambda line: isinstance(line, Beat))
    assert isinstance(lines[0], Hello)
    assert [line for line in lines if isinstance(line, Report)] == [], (
        "the restored position already matches"
    )
    assert {mark.instrument for mark in lines[-1].positions} == {BTC, ETH}
    await second.send(Stop(flatten=True))
    tail = await second.rest()
    assert (
        PositionsFlattened.model_validate(reports(tail, "PositionsFlattened")[0].payload).count == 2
    )
    assert await second.exit_code() == 0


async def test_flatten_that_the_exchange_rejects_is_reported_with_the_remaining_positions(
    spawn: Spawn, tmp_path: Path
) -> None:
    state = tmp_path / "account.json"
    account = PaperBroker(seed="7", instruments=[BTC, ETH], state_file=state)
    await account.market_order(BTC, "buy", 1)
    await account.market_order(ETH, "buy", 1)
    opened = await account.positions()

    worker = await spawn(hold(BTC, ETH, paperFaults={"rejectOrders": True}), state_file=state)
    lines = await worker.until(lambda line: isinstance(line, Beat))
    assert [line for line in lines if isinstance(line, Report)] == []
    await worker.send(Stop(flatten=True))
    tail = await worker.rest()
    assert await worker.exit_code() == 0
    [report] = [line for line in tail if isinstance(line, Report)]
    assert report.event == "FlattenFailed"
    failed = FlattenFailed.model_validate(report.payload)
    assert (failed.job_id, failed.worker_id) == (worker.job_id, worker.worker_id)
    assert "rejectOrders" in failed.error
    assert list(failed.remaining) == opened
    assert [Position.model_validate(p) for p in worker.saved_positions().values()] == opened


async def test_strategy_failure_exits_1_with_the_error_on_stderr(spawn: Spawn) -> None:
    worker = await spawn(hold(BTC, paperFaults={"rejectOrders": True}))
    assert isinstance(await worker.line(), Hello)
    assert await worker.exit_code() == 1
    tail = await worker.rest()
    assert [type(line) for line in tail] in ([], [Beat])  # the immediate first beat, no report
    log = worker.log()
    assert "strategy hold crashed" in log and "BrokerError" in log and "rejectOrders" in log


async def test_credentials_come_over_the_channel_first_and_never_in_the_environment(
    spawn: Spawn,
) -> None:
    worker = await spawn(hold())
    assert isinstance(await worker.line(), Hello)
    with open(f"/proc/{worker.process.pid}/environ", "rb") as environ:
        assert API_SECRET.encode() not in environ.read()
    await worker.send(Stop())
    assert await worker.exit_code() == 0


async def test_host_gone_before_the_credentials_exits_3_before_hello(spawn: Spawn) -> None:
    worker = await spawn(hold(), first=None)
    worker.writer.close()
    assert await worker.exit_code() == protocol.EXIT_HOST_GONE
    assert "closed before the credentials came" in worker.log()


async def test_a_first_line_other_than_the_credentials_exits_2_before_hello(spawn: Spawn) -> None:
    worker = await spawn(hold(), first=Beat(at=datetime.now(UTC)))
    assert await worker.exit_code() == 2
    assert await worker.rest() == []
    assert "first line was not the credentials" in worker.log()


async def test_unusable_configuration_exits_2_before_hello(spawn: Spawn) -> None:
    worker = await spawn({**hold(), "type": "martingale"})
    assert await worker.exit_code() == 2
    assert await worker.rest() == []
    assert "unknown strategy 'martingale'" in worker.log()


async def test_unknown_broker_exits_2(spawn: Spawn) -> None:
    worker = await spawn(hold(), BROKER_ID="deribit")
    assert await worker.exit_code() == 2
    assert "unknown broker 'deribit'" in worker.log()


async def test_chaos_is_refused_where_fault_drills_are_not_enabled(spawn: Spawn) -> None:
    worker = await spawn({**hold(), "type": "chaos", "parameters": {"crashAfter": 0.3}})
    assert await worker.exit_code() == 2
    assert "'chaos' is a fault drill" in worker.log()


async def test_chaos_crash_exits_with_the_configured_code(spawn: Spawn) -> None:
    worker = await spawn(
        {**hold(), "type": "chaos", "parameters": {"crashAfter": 0.3, "exitCode": 42}},
        RUNNER_ENABLE_CHAOS="1",
    )
    await worker.opened(1)
    assert await worker.exit_code() == 42
    assert "chaos: crashing" in worker.log()


async def test_chaos_hang_stops_the_heartbeats(spawn: Spawn) -> None:
    worker = await spawn({**hold(), "type": "chaos", "parameters": {"hangAfter": 0.5}},
                         RUNNER_ENABLE_CHAOS="1")
    await worker.until(lambda line: isinstance(line, Beat))
    loop = asyncio.get_running_loop()
    last_beat = loop.time()
    with pytest.raises(TimeoutError):
        while True:
            line = await worker.line(timeout=BEAT * 5)
            if isinstance(line, Beat):
                last_beat = loop.time()
    assert loop.time() - last_beat >= BEAT * 5
    worker.process.send_signal(signal.SIGTERM)
    with pytest.raises(TimeoutError):
        await worker.exit_code(timeout=BEAT * 3)  # a hung loop cannot even answer SIGTERM
    worker.process.kill()
    assert await worker.exit_code() == -signal.SIGKILL
