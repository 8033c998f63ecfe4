"""The real worker process, driven over its control socket the way a worker-host drives it."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from events import REGISTRY, FlattenFailed, OrderFilled, PositionChanged, PositionsFlattened
from events.values import Position
from services.worker import protocol
from services.worker.brokers.paper import PaperBroker
from services.worker.protocol import Beat, Hello, Lease, Report, Stop
from tests.integration.worker_processes import (
    API_SECRET,
    BEAT,
    BTC,
    ETH,
    Spawn,
    beats,
    hold,
    reports,
)


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


async def test_a_spawn_that_outlasted_its_lease_runs_on_the_hosts_answer(spawn: Spawn) -> None:
    worker = await spawn(hold(BTC), RUNNER_LEASE_UNTIL=repr(time.monotonic() - 1.0))
    worker.lease_answer = lambda: time.monotonic() + 30.0  # the host's lease as it is now
    await worker.opened(1)
    await worker.send(Stop())
    assert await worker.exit_code() == 0


async def test_renewed_lease_keeps_the_worker_running(spawn: Spawn) -> None:
    first_lease = time.monotonic() + 3.0  # room for a slow start
    worker = await spawn(hold(BTC), RUNNER_LEASE_UNTIL=repr(first_lease))
    await worker.opened(1)
    while time.monotonic() < first_lease + 1.0:  # past the first lease, on renewals alone
        await worker.send(Lease(until=time.monotonic() + 1.0))
        await asyncio.sleep(0.2)  # paces the renewals
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
    restored = [line for line in lines if isinstance(line, Report)]
    assert [(line.event, line.payload["instrument"]) for line in restored] == [
        ("PositionChanged", BTC), ("PositionChanged", ETH)
    ], "the account's positions are reported at start; the restored ones match: no order"
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
    assert {line.event for line in lines if isinstance(line, Report)} == {"PositionChanged"}
    await worker.send(Stop(flatten=True))
    tail = await worker.rest()
    assert await worker.exit_code() == 0
    [report] = [line for line in tail if isinstance(line, Report)]
    assert report.event == "FlattenFailed"  # one report: the attempts' errors, no fill
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
    worker = await spawn(hold(), BROKER_ID="nasdaq")
    assert await worker.exit_code() == 2
    assert "unknown broker 'nasdaq'" in worker.log()


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
