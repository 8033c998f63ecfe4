"""The paper exchange: fills, fees, net positions, realised P&L, persistence, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from events.values import Fill, Position, StrategyConfig
from services.worker.brokers import BROKERS, PaperBroker, UnknownBroker, open_broker
from services.worker.brokers.base import BrokerError, BrokerFact, ClosedTrade
from services.worker.brokers.paper import (
    MAKER_FEE,
    MARKS_SAVE_EVERY,
    TAKER_FEE,
    PaperSettings,
    base_asset,
    starting_price,
)

BTC = "BTC-PERPETUAL"
ETH = "ETH-USD"


def still_market(**kwargs) -> PaperSettings:
    """No random walk and no spread: fills at exactly the mark we set."""
    return PaperSettings(volatility=0.0, spread=0.0, **kwargs)


@pytest.fixture
def facts() -> list[BrokerFact]:
    return []


@pytest.fixture
def broker(facts: list[BrokerFact]) -> PaperBroker:
    return PaperBroker(seed="t", instruments=[BTC], settings=still_market(), sink=facts.append)


@pytest.mark.parametrize(
    ("instrument", "asset", "price"),
    [
        ("BTC-PERPETUAL", "BTC", 50_000.0),
        ("ETH-USD", "ETH", 3_000.0),
        ("sol-perpetual", "SOL", 150.0),
        ("SOL/USDT:USDT", "SOL", 150.0),
        ("DOGE-USD", "DOGE", 100.0),
    ],
)
def test_starting_price_by_base_asset(instrument: str, asset: str, price: float) -> None:
    assert base_asset(instrument) == asset
    assert starting_price(instrument) == price


async def test_market_buy_fills_at_ask_with_taker_fee() -> None:
    broker = PaperBroker(
        seed="t", instruments=[BTC], settings=PaperSettings(volatility=0.0, spread=0.0002)
    )
    fill = await broker.market_order(BTC, "buy", 0.5)
    assert fill.price == pytest.approx(50_000 * 1.0001)
    assert fill.fee == pytest.approx(0.5 * fill.price * TAKER_FEE)
    sell = await broker.market_order(BTC, "sell", 0.5)
    assert sell.price == pytest.approx(50_000 * 0.9999)


async def test_fill_reports_fill_then_position_in_order(
    broker: PaperBroker, facts: list[BrokerFact]
) -> None:
    fill = await broker.market_order(BTC, "buy", 2)
    assert facts == [fill, Position(instrument=BTC, side="long", amount=2, entry_price=50_000)]


async def test_adding_to_a_position_averages_the_entry(broker: PaperBroker) -> None:
    await broker.market_order(BTC, "buy", 1)
    broker.set_mark(BTC, 60_000)
    await broker.market_order(BTC, "buy", 3)
    [position] = await broker.positions()
    assert position.side == "long"
    assert position.amount == 4
    assert position.entry_price == pytest.approx((50_000 + 3 * 60_000) / 4)


async def test_closing_realises_pnl_net_of_the_closing_fee(
    broker: PaperBroker, facts: list[BrokerFact]
) -> None:
    await broker.market_order(BTC, "buy", 2)
    broker.set_mark(BTC, 51_000)
    facts.clear()
    fill = await broker.market_order(BTC, "sell", 2)
    closing_fee = 2 * 51_000 * TAKER_FEE
    reported, trade, position = facts
    assert reported == fill
    assert trade == ClosedTrade(
        instrument=BTC,
        side="long",
        amount=2,
        entry_price=50_000,
        exit_price=51_000,
        realized_pnl=trade.realized_pnl,
    )
    assert trade.realized_pnl == pytest.approx(2_000 - closing_fee)
    assert position == Position(instrument=BTC, side="long", amount=0, entry_price=0)
    assert await broker.positions() == []
    opening_fee = 2 * 50_000 * TAKER_FEE
    assert broker.account.realized_pnl == pytest.approx(2_000 - closing_fee - opening_fee)
    assert broker.account.fees_paid == pytest.approx(closing_fee + opening_fee)


async def test_partial_close_keeps_the_entry_price(
    broker: PaperBroker, facts: list[BrokerFact]
) -> None:
    await broker.market_order(BTC, "sell", 3)
    broker.set_mark(BTC, 49_000)
    facts.clear()
    await broker.market_order(BTC, "buy", 1)
    trade = facts[1]
    assert isinstance(trade, ClosedTrade)
    assert (trade.side, trade.amount) == ("short", 1)
    assert trade.realized_pnl == pytest.approx(1_000 - 49_000 * TAKER_FEE)
    assert await broker.positions() == [
        Position(instrument=BTC, side="short", amount=2, entry_price=50_000)
    ]


async def test_flip_closes_then_opens_the_rest_at_the_fill_price(
    broker: PaperBroker, facts: list[BrokerFact]
) -> None:
    await broker.market_order(BTC, "buy", 1)
    broker.set_mark(BTC, 48_000)
    facts.clear()
    fill = await broker.market_order(BTC, "sell", 3)
    _, trade, position = facts
    assert isinstance(trade, ClosedTrade)
    assert trade.amount == 1
    # One third of the fill closed the long, so one third of its fee is charged to that trade.
    assert trade.realized_pnl == pytest.approx(-2_000 - fill.fee / 3)
    assert position == Position(instrument=BTC, side="short", amount=2, entry_price=48_000)


async def test_reduce_only_caps_at_the_position_and_never_opens(broker: PaperBroker) -> None:
    with pytest.raises(BrokerError, match="reduce-only"):
        await broker.market_order(BTC, "sell", 1, reduce_only=True)
    await broker.market_order(BTC, "buy", 1)
    with pytest.raises(BrokerError, match="reduce-only"):
        await broker.market_order(BTC, "buy", 1, reduce_only=True)
    fill = await broker.market_order(BTC, "sell", 5, reduce_only=True)
    assert fill.amount == 1
    assert await broker.positions() == []


@pytest.mark.parametrize("amount", [0, -1, float("nan"), float("inf")])
async def test_nonsense_amounts_are_refused(broker: PaperBroker, amount: float) -> None:
    with pytest.raises(BrokerError, match="amount"):
        await broker.market_order(BTC, "buy", amount)


async def test_limit_order_rests_until_the_mark_crosses_then_fills_as_maker(
    broker: PaperBroker, facts: list[BrokerFact]
) -> None:
    order_id = await broker.limit_order(BTC, "buy", 1, 49_000)
    await broker.tick()
    assert facts == []
    assert [order.order_id for order in await broker.open_orders()] == [order_id]
    broker.set_mark(BTC, 48_500)
    await broker.tick()
    fill = facts[0]
    assert fill == Fill(
        order_id=order_id,
        instrument=BTC,
        side="buy",
        amount=1,
        price=49_000,
        fee=49_000 * MAKER_FEE,
    )
    assert await broker.open_orders() == []
    assert await broker.positions() == [
        Position(instrument=BTC, side="long", amount=1, entry_price=49_000)
    ]


async def test_sell_limit_fills_when_the_mark_rises_to_it(broker: PaperBroker) -> None:
    await broker.limit_order(BTC, "sell", 1, 51_000)
    broker.set_mark(BTC, 51_000)
    await broker.tick()
    assert await broker.positions() == [
        Position(instrument=BTC, side="short", amount=1, entry_price=51_000)
    ]


async def test_cancelled_order_never_fills(broker: PaperBroker, facts: list[BrokerFact]) -> None:
    order_id = await broker.limit_order(BTC, "buy", 1, 49_000)
    await broker.cancel(order_id)
    with pytest.raises(BrokerError):
        await broker.cancel(order_id)
    broker.set_mark(BTC, 40_000)
    await broker.tick()
    assert facts == []


async def test_account_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state" / "worker.json"
    first = PaperBroker(seed="t", instruments=[BTC, ETH], state_file=state, settings=still_market())
    await first.market_order(BTC, "buy", 1)
    await first.market_order(ETH, "sell", 2)
    resting = await first.limit_order(BTC, "sell", 1, 55_000)
    first.set_mark(ETH, 3_100)

    second = PaperBroker(
        seed="t", instruments=[BTC, ETH], state_file=state, settings=still_market()
    )
    assert await second.positions() == await first.positions()
    assert [order.order_id for order in await second.open_orders()] == [resting]
    assert await second.mark(ETH) == 3_100
    assert second.account.realized_pnl == pytest.approx(first.account.realized_pnl)
    fill = await second.market_order(ETH, "buy", 2)
    assert fill.order_id == "paper-4", "order ids continue after a restart"
    assert list(state.parent.iterdir()) == [state], "atomic writes leave no temp files behind"
    assert json.loads(state.read_text())["positions"][BTC]["amount"] == 1


async def test_mark_only_ticks_are_written_now_and_then_and_at_close(tmp_path: Path) -> None:
    state = tmp_path / "worker.json"
    broker = PaperBroker(seed="t", instruments=[BTC], state_file=state)
    await broker.market_order(BTC, "buy", 1)  # a fill: written at once

    def saved_ticks() -> int:
        return json.loads(state.read_text())["ticks"].get(BTC, 0)

    before = saved_ticks()
    for _ in range(MARKS_SAVE_EVERY - 1):
        await broker.tick()
    assert saved_ticks() == before
    await broker.tick()
    assert saved_ticks() == before + MARKS_SAVE_EVERY
    await broker.tick()
    await broker.close()
    assert saved_ticks() == before + MARKS_SAVE_EVERY + 1
    assert PaperBroker(seed="t", state_file=state).account == broker.account


async def test_opening_writes_nothing_until_something_changes(tmp_path: Path) -> None:
    """Nothing (and no fsync) before the worker's hello: starting marks are reproducible."""
    state = tmp_path / "worker.json"
    broker = PaperBroker(seed="t", instruments=[BTC], state_file=state)
    assert not state.exists()
    await broker.close()  # the starting marks are written at close, like mark-only ticks
    assert PaperBroker(seed="t", state_file=state).account == broker.account
    again = PaperBroker(seed="t", instruments=[BTC], state_file=state)
    await again.close()
    assert again.account == broker.account


def test_unreadable_state_refuses_to_start(tmp_path: Path) -> None:
    state = tmp_path / "worker.json"
    state.write_text("{not json")
    with pytest.raises(BrokerError, match="unreadable"):
        PaperBroker(seed="t", state_file=state)


async def marks_after(broker: PaperBroker, ticks: int) -> list[float]:
    marks = []
    for _ in range(ticks):
        await broker.tick()
        marks.append(await broker.mark(BTC))
    return marks


async def test_same_seed_same_prices_other_seed_other_prices() -> None:
    def make(seed: str) -> PaperBroker:
        return PaperBroker(seed=seed, instruments=[BTC, ETH])

    path = await marks_after(make("42"), 50)
    assert path == await marks_after(make("42"), 50)
    assert path != await marks_after(make("43"), 50)
    assert len(set(path)) == 50, "prices move every tick"
    assert all(40_000 < price < 60_000 for price in path)


async def test_seed_defaults_to_worker_id_and_env_seed_overrides() -> None:
    config = StrategyConfig(name="t", type="hold", instruments=(BTC,))

    def make(worker_id: str, seed: str | None = None) -> PaperBroker:
        return open_broker("paper", worker_id=worker_id, config=config, seed=seed)  # type: ignore[return-value]

    assert await marks_after(make("w-1"), 10) == await marks_after(make("w-1"), 10)
    assert await marks_after(make("w-1"), 10) != await marks_after(make("w-2"), 10)
    assert await marks_after(make("w-1", "7"), 10) == await marks_after(make("w-2", "7"), 10)


async def test_reject_orders_fault_refuses_every_order() -> None:
    config = StrategyConfig(
        name="t", type="hold", parameters={"paperFaults": {"rejectOrders": True}}
    )
    broker = open_broker("paper", worker_id="w", config=config)
    with pytest.raises(BrokerError, match="rejectOrders"):
        await broker.market_order(BTC, "buy", 1)
    with pytest.raises(BrokerError, match="rejectOrders"):
        await broker.limit_order(BTC, "buy", 1, 40_000)


def test_misspelt_fault_is_a_configuration_error() -> None:
    config = StrategyConfig(
        name="t", type="hold", parameters={"paperFaults": {"rejectOrder": True}}
    )
    with pytest.raises(ValueError, match="paper broker parameters"):
        open_broker("paper", worker_id="w", config=config)


def test_unknown_broker_is_named_with_the_known_ones() -> None:
    config = StrategyConfig(name="t", type="hold")
    assert set(BROKERS) == {"paper"}
    with pytest.raises(UnknownBroker, match=r"'nasdaq'.*available: paper, deribit"):
        open_broker("nasdaq", worker_id="w", config=config)
