"""The real worker process on a real exchange account: the local Deribit (tests/exchanges),
reached through RUNNER_BROKER_URLS by the real ccxt client, driven over the control channel the
way a worker-host drives it. The `spawn` fixture checks that no credential reached any file or
any line the worker sent."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from events import FlattenFailed, OrderRejected, PositionsFlattened, RiskLimitHit
from services.worker import protocol
from services.worker.protocol import Beat, CannotStart, Hello, Report, Stop
from tests.exchanges.deribit import LocalDeribit
from tests.integration.worker_processes import API_KEY, API_SECRET, REPO, Spawn, reports

BTC = "BTC-PERPETUAL"
PLUGINS = REPO / "tests" / "plugins"


def strategy(kind: str = "hold", *, max_position: float = 100, **parameters: Any
             ) -> dict[str, Any]:
    return {"name": "exchange test", "type": kind, "parameters": parameters,
            "riskManagement": {"maxPositionSize": max_position}, "instruments": [BTC]}


def on(deribit: LocalDeribit, **env: str) -> dict[str, str]:
    """The environment of a worker trading the local Deribit."""
    return {"BROKER_ID": "deribit",
            "RUNNER_BROKER_URLS": json.dumps({"deribit": deribit.url})} | env


@pytest.fixture
def alice(deribit: LocalDeribit) -> LocalDeribit:
    deribit.add_account(API_KEY, API_SECRET)
    return deribit


def events_of(lines: list[Any], name: str) -> list[dict[str, Any]]:
    return [line.payload for line in reports(lines, name)]


async def test_hold_on_deribit_trades_survives_kill_9_and_flattens_for_real(
        spawn: Spawn, alice: LocalDeribit, tmp_path: Path) -> None:
    state = tmp_path / "journal.json"
    first = await spawn(strategy(amount=30), state_file=state, **on(alice))
    opened = await first.until(lambda line: bool(reports(first.received, "PositionChanged")))
    assert isinstance(opened[0], Hello)
    [fill] = events_of(opened, "OrderFilled")
    assert (fill["instrument"], fill["side"], fill["amount"]) == (BTC, "buy", 30)
    [order] = alice.orders_of(API_KEY)
    assert ("buy", API_KEY) in alice.signed_by, "signed with that user's key"
    assert events_of(opened, "PositionChanged")[-1] | {"entry_price": 0} == {
        "job_id": first.job_id, "worker_id": first.worker_id, "instrument": BTC,
        "side": "long", "amount": 30.0, "entry_price": 0}

    first.process.send_signal(signal.SIGKILL)
    assert await first.exit_code() == -signal.SIGKILL

    second = await spawn(strategy(amount=30), state_file=state, **on(alice))
    lines = await second.until(lambda line: isinstance(line, Beat))
    assert isinstance(lines[0], Hello)
    assert [(r.event, r.payload["amount"]) for r in lines if isinstance(r, Report)] == [
        ("PositionChanged", 30.0)], "reconciled from the exchange, no order placed"
    assert alice.orders_of(API_KEY) == [order]
    assert lines[-1].positions[0].mark_price == 50_000.0

    await second.send(Stop(flatten=True))
    tail = await second.rest()
    assert await second.exit_code() == 0
    [flattened] = events_of(tail, "PositionsFlattened")
    assert PositionsFlattened.model_validate(flattened).count == 1
    close = alice.orders_of(API_KEY)[-1]
    assert (close["direction"], close["amount"], close["reduce_only"]) == ("sell", 30, True)
    assert alice.position(API_KEY, BTC) == 0


async def test_a_rejected_key_says_why_and_exits_5_before_hello(
        spawn: Spawn, deribit: LocalDeribit) -> None:
    deribit.add_account(API_KEY, "a-different-secret-9999")
    worker = await spawn(strategy(amount=30), **on(deribit))
    line = await worker.line()
    assert line == CannotStart(reason="exchange rejected the API key", permanent=True)
    assert await worker.exit_code() == protocol.EXIT_CREDENTIALS_REJECTED == 5
    assert deribit.calls["private/buy"] == 0
    assert "exchange rejected the API key" in worker.log()


async def test_an_exchange_unreachable_at_start_is_not_permanent(
        spawn: Spawn, alice: LocalDeribit) -> None:
    alice.down()
    worker = await spawn(strategy(amount=30), **on(alice))
    line = await worker.line(timeout=15)
    assert isinstance(line, CannotStart) and not line.permanent
    assert line.reason.startswith("exchange unreachable")
    assert await worker.exit_code() == 1


async def test_rate_limits_are_waited_out(spawn: Spawn, alice: LocalDeribit) -> None:
    alice.fail_next(2, "rate_limit")
    alice.fail_next(2, "rate_limit", "private/buy")
    worker = await spawn(strategy(amount=20), **on(alice))
    await worker.until(lambda line: bool(reports(worker.received, "OrderFilled")))
    assert len(alice.orders_of(API_KEY)) == 1
    await worker.send(Stop())
    assert await worker.exit_code() == 0


async def test_insufficient_funds_is_reported_and_the_worker_goes_on(
        spawn: Spawn, alice: LocalDeribit) -> None:
    alice.accounts[API_KEY].equity["BTC"] = 0.00001
    worker = await spawn(strategy(amount=100), **on(alice))
    await worker.until(lambda line: bool(reports(worker.received, "OrderRejected")))
    [rejected] = events_of(worker.received, "OrderRejected")
    assert OrderRejected.model_validate(rejected).reason == "not_enough_funds"
    await worker.until(lambda line: isinstance(line, Beat) and len(
        [b for b in worker.received if isinstance(b, Beat)]) >= 2)
    assert worker.process.returncode is None and alice.orders_of(API_KEY) == []
    await worker.send(Stop())
    assert await worker.exit_code() == 0


async def test_exchange_down_during_flatten_names_what_remains(
        spawn: Spawn, alice: LocalDeribit) -> None:
    worker = await spawn(strategy(amount=40), **on(alice, RUNNER_FLATTEN_TIMEOUT="2"))
    await worker.until(lambda line: bool(reports(worker.received, "PositionChanged")))
    alice.down()
    await worker.send(Stop(flatten=True))
    tail = await worker.rest(timeout=10)
    assert await worker.exit_code() == 0
    [failed] = [FlattenFailed.model_validate(p) for p in events_of(tail, "FlattenFailed")]
    assert [(p.instrument, p.side, p.amount) for p in failed.remaining] == [(BTC, "long", 40)]
    assert failed.error
    assert alice.position(API_KEY, BTC) == 40


async def test_a_flatten_only_run_closes_what_the_account_holds_and_exits_0(
        spawn: Spawn, alice: LocalDeribit) -> None:
    first = await spawn(strategy(amount=50), **on(alice))
    await first.until(lambda line: bool(reports(first.received, "PositionChanged")))
    first.process.send_signal(signal.SIGKILL)
    await first.exit_code()

    worker = await spawn(strategy(amount=50), **on(alice, RUNNER_WORKER_MODE="flatten"))
    lines = await worker.rest(timeout=15)
    assert await worker.exit_code() == 0
    assert isinstance(lines[0], Hello)
    assert [r.event for r in lines if isinstance(r, Report)] == [
        "PositionChanged", "OrderFilled", "TradeClosed", "PositionChanged",
        "PositionsFlattened"]
    assert PositionsFlattened.model_validate(
        events_of(lines, "PositionsFlattened")[0]).count == 1
    assert alice.position(API_KEY, BTC) == 0
    assert len(alice.orders_of(API_KEY)) == 2, "no buy from the strategy: only the close"


async def test_a_plugin_that_ignores_the_risk_limits_is_held_to_them(
        spawn: Spawn, alice: LocalDeribit) -> None:
    config = strategy("greedy", max_position=100, buys=[1_000, 100])
    worker = await spawn(config, PYTHONPATH=str(PLUGINS), **on(alice))
    await worker.until(lambda line: bool(reports(worker.received, "OrderFilled")))
    [hit] = [RiskLimitHit.model_validate(p) for p in events_of(worker.received, "RiskLimitHit")]
    assert (hit.rule, hit.action, hit.limit, hit.value) == ("max_position_size", "refused",
                                                            100, 1_000)
    assert [o["amount"] for o in alice.orders_of(API_KEY)] == [100], "only the allowed buy"

    alice.set_price(BTC, 48_000)  # past its 2% stop-loss
    await worker.until(lambda line: len(reports(worker.received, "RiskLimitHit")) == 2)
    closed = RiskLimitHit.model_validate(events_of(worker.received, "RiskLimitHit")[1])
    assert (closed.rule, closed.action, closed.value) == ("stop_loss", "closed", 48_000)
    assert alice.position(API_KEY, BTC) == 0
    assert alice.orders_of(API_KEY)[-1]["reduce_only"] is True
    await worker.send(Stop())
    assert await worker.exit_code() == 0
    log = worker.log()
    assert "greedy was told: buy 1000 refused by the risk" in log
    assert "greedy was told: BTC-PERPETUAL closed by stop_loss" in log


async def test_the_plugin_is_held_to_its_limits_on_paper_too(spawn: Spawn) -> None:
    config = strategy("greedy", max_position=5, buys=[50, 5])
    worker = await spawn(config, PYTHONPATH=str(PLUGINS))
    await worker.until(lambda line: bool(reports(worker.received, "OrderFilled")))
    [hit] = events_of(worker.received, "RiskLimitHit")
    assert (hit["rule"], hit["value"]) == ("max_position_size", 50)
    assert [f["amount"] for f in events_of(worker.received, "OrderFilled")] == [5]
    await worker.send(Stop(flatten=True))
    await worker.rest()
    assert await worker.exit_code() == 0


async def test_paper_deribit_is_priced_by_the_exchanges_public_data(
        spawn: Spawn, deribit: LocalDeribit) -> None:
    worker = await spawn(strategy(amount=2), **on(deribit, BROKER_ID="paper-deribit"))
    await worker.until(lambda line: bool(reports(worker.received, "OrderFilled")))
    [fill] = events_of(worker.received, "OrderFilled")
    assert (fill["amount"], fill["price"]) == (2, 50_000.5), "bought at the exchange's ask"
    assert fill["fee"] == pytest.approx(2 * 50_000.5 * 0.0005), "at the exchange's taker fee"
    deribit.set_price(BTC, 50_400)
    await worker.until(lambda line: isinstance(line, Beat) and bool(line.positions)
                       and line.positions[0].mark_price == 50_400)
    await worker.send(Stop(flatten=True))
    tail = await worker.rest()
    assert await worker.exit_code() == 0
    [closed] = events_of(tail, "TradeClosed")
    assert closed["exit_price"] == 50_399.5, "sold at the bid"
    assert not any(call.startswith("private/") for call in deribit.calls), "no keys, no orders"
    assert deribit.accounts == {}
