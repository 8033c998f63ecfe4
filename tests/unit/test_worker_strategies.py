"""Strategies: the RSI maths, the scalping signal table, Hold's idempotency, loading by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from events.values import Position, RiskManagement, StrategyConfig
from services.worker.brokers.base import BrokerFact, ClosedTrade
from services.worker.brokers.paper import PaperBroker, PaperSettings
from services.worker.strategies import (
    BUILTIN_STRATEGIES,
    Strategy,
    UnknownStrategy,
    available_strategies,
    load_strategy,
)
from services.worker.strategies import base as strategies_base
from services.worker.strategies.base import order_towards
from services.worker.strategies.chaos import Chaos
from services.worker.strategies.hold import Hold
from services.worker.strategies.indicators import Candles, parse_timeframe, rsi
from services.worker.strategies.scalping import Scalping, ScalpingParameters, decide

BTC = "BTC-PERPETUAL"
ETH = "ETH-USD"


def config(
    type_: str = "hold",
    instruments: tuple[str, ...] = (BTC,),
    risk: dict[str, Any] | None = None,
    **parameters: Any,
) -> StrategyConfig:
    return StrategyConfig.model_validate(
        {
            "name": "test",
            "type": type_,
            "parameters": parameters,
            "riskManagement": risk or {},
            "instruments": instruments,
        }
    )


def paper(
    facts: list[BrokerFact] | None = None, state_file: Path | None = None, instruments=(BTC,)
) -> PaperBroker:
    return PaperBroker(
        seed="t",
        instruments=instruments,
        state_file=state_file,
        settings=PaperSettings(volatility=0.0, spread=0.0),
        sink=facts.append if facts is not None else (lambda fact: None),
    )


# -- RSI and candles ------------------------------------------------------------------------


# Period 3 over closes 10 11 12 11 10 11 13, i.e. changes +1 +1 -1 -1 +1 +2:
#   seed:   gain (1+1+0)/3 = 2/3       loss (0+0+1)/3 = 1/3     RS 2     RSI 66.67
#   -1:     gain (2/3*2+0)/3 = 4/9     loss (1/3*2+1)/3 = 5/9   RS 0.8   RSI 44.44
#   +1:     gain (4/9*2+1)/3 = 17/27   loss (5/9*2+0)/3 = 10/27 RS 1.7   RSI 62.96
#   +2:     gain (17/27*2+2)/3 = 88/81 loss (10/27*2)/3 = 20/81 RS 4.4   RSI 81.48
HAND_SERIES = [10, 11, 12, 11, 10, 11, 13]


@pytest.mark.parametrize(
    ("length", "expected"),
    [(4, 100 - 100 / 3), (5, 100 - 100 / 1.8), (6, 100 - 100 / 2.7), (7, 100 - 100 / 5.4)],
)
def test_rsi_matches_the_hand_computed_wilder_series(length: int, expected: float) -> None:
    assert rsi(HAND_SERIES[:length], period=3) == pytest.approx(expected)


def test_rsi_needs_period_plus_one_closes() -> None:
    assert rsi(HAND_SERIES[:3], period=3) is None
    assert rsi([], period=14) is None


@pytest.mark.parametrize(
    ("closes", "expected"),
    [([1, 2, 3, 4, 5], 100.0), ([5, 4, 3, 2, 1], 0.0), ([3, 3, 3, 3, 3], 50.0)],
)
def test_rsi_extremes(closes: list[float], expected: float) -> None:
    assert rsi(closes, period=3) == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1), ("5s", 5), ("1m", 60), ("15m", 900), ("4h", 14_400), ("1d", 86_400), ("0.5s", 0.5)],
)
def test_parse_timeframe(text: str, seconds: float) -> None:
    assert parse_timeframe(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "m", "1w", "0s", "-1m", "one minute"])
def test_parse_timeframe_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="timeframe"):
        parse_timeframe(text)


def test_candles_close_on_the_first_tick_of_a_later_bucket() -> None:
    candles = Candles(width=1.0)
    assert not candles.add(0.1, 10)
    assert not candles.add(0.9, 11)
    assert candles.add(1.2, 12)
    assert list(candles.closes) == [11]
    assert candles.add(3.5, 13), "an empty bucket in between makes no candle"
    assert list(candles.closes) == [11, 12]


def test_candles_keep_only_the_latest() -> None:
    candles = Candles(width=1.0, keep=3)
    for second in range(10):
        candles.add(second, second)
    assert list(candles.closes) == [6, 7, 8]


# -- scalping signals -----------------------------------------------------------------------

PARAMS = ScalpingParameters(oversold=30, overbought=70)
RISK = RiskManagement(stop_loss_percent=2, take_profit_percent=3)
LONG = Position(instrument=BTC, side="long", amount=1, entry_price=100)
SHORT = Position(instrument=BTC, side="short", amount=1, entry_price=100)


@pytest.mark.parametrize(
    ("position", "mark", "strength", "expected"),
    [
        (None, 100, None, None),  # between candles, flat: nothing
        (None, 100, 25, "long"),  # oversold
        (None, 100, 75, "short"),  # overbought
        (None, 100, 50, None),
        (None, 100, 30, None),  # thresholds are strict
        (LONG, 100, 50, None),
        (LONG, 100, 25, None),  # already long: oversold again does not add
        (LONG, 100, 75, "exit"),  # opposite extreme
        (LONG, 98, None, "exit"),  # stop-loss: -2 %
        (LONG, 98.5, None, None),
        (LONG, 103, None, "exit"),  # take-profit: +3 %
        (SHORT, 100, 25, "exit"),
        (SHORT, 100, 75, None),
        (SHORT, 102, None, "exit"),  # a short loses when the price rises
        (SHORT, 97, None, "exit"),
        (SHORT, 101, 50, None),
    ],
)
def test_scalping_decisions(
    position: Position | None, mark: float, strength: float | None, expected: str | None
) -> None:
    assert decide(position, mark, strength, PARAMS, RISK) == expected


def test_scalping_parameters_validate() -> None:
    with pytest.raises(ValueError, match="oversold"):
        ScalpingParameters(oversold=70, overbought=30)
    with pytest.raises(ValueError, match="timeframe"):
        ScalpingParameters(timeframe="soon")
    assert ScalpingParameters.model_validate({"rsiPeriod": 7}).rsi_period == 7


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def drive(
    strategy: Scalping,
    broker: PaperBroker,
    clock: Clock,
    instrument: str,
    prices: list[tuple[float, float]],
) -> None:
    for at, price in prices:
        clock.now = at
        broker.set_mark(instrument, price)
        await strategy.on_tick()


async def test_scalping_enters_long_when_oversold_capped_then_takes_profit() -> None:
    facts: list[BrokerFact] = []
    broker = paper(facts, instruments=("X-USD",))
    clock = Clock()
    strategy = Scalping(
        config(
            "scalping",
            ("X-USD",),
            risk={"maxPositionSize": 2},
            timeframe="1s",
            rsiPeriod=3,
            amount=5,
        ),
        broker,
        clock=clock,
    )
    assert strategy.tick_interval == pytest.approx(0.2)
    await strategy.start()  # candle 0 opens at 100
    await drive(strategy, broker, clock, "X-USD", [(1, 99), (2, 98), (3, 97)])
    assert await broker.positions() == [], "three closes are not enough for RSI(3)"
    await drive(strategy, broker, clock, "X-USD", [(4, 96)])  # closes 100 99 98 97: RSI 0
    assert await broker.positions() == [
        Position(instrument="X-USD", side="long", amount=2, entry_price=96)
    ]
    await drive(strategy, broker, clock, "X-USD", [(4.5, 98)])  # +2.1 %: hold on
    assert len(await broker.positions()) == 1
    await drive(strategy, broker, clock, "X-USD", [(4.7, 99)])  # +3.1 %: take profit mid-candle
    assert await broker.positions() == []
    [trade] = [fact for fact in facts if isinstance(fact, ClosedTrade)]
    assert (trade.side, trade.amount, trade.exit_price) == ("long", 2, 99)


async def test_scalping_shorts_when_overbought_and_stops_out() -> None:
    broker = paper(instruments=("X-USD",))
    clock = Clock()
    strategy = Scalping(
        config("scalping", ("X-USD",), timeframe="5s", rsiPeriod=3), broker, clock=clock
    )
    await strategy.start()
    await drive(strategy, broker, clock, "X-USD", [(5, 101), (10, 102), (15, 103), (20, 104)])
    assert await broker.positions() == [
        Position(instrument="X-USD", side="short", amount=1, entry_price=104)
    ]
    await drive(strategy, broker, clock, "X-USD", [(21, 106.2)])  # +2.1 % against the short
    assert await broker.positions() == []


async def test_scalping_exits_on_the_opposite_signal() -> None:
    broker = paper(instruments=("X-USD",))
    clock = Clock()
    strategy = Scalping(
        config(
            "scalping",
            ("X-USD",),
            risk={"takeProfitPercent": 50, "stopLossPercent": 50},
            timeframe="1s",
            rsiPeriod=3,
        ),
        broker,
        clock=clock,
    )
    await strategy.start()
    await drive(strategy, broker, clock, "X-USD", [(1, 99), (2, 98), (3, 97), (4, 96)])
    assert [p.side for p in await broker.positions()] == ["long"]
    await drive(strategy, broker, clock, "X-USD", [(5, 97), (6, 98), (7, 99)])
    assert [p.side for p in await broker.positions()] == ["long"], (
        "closes up to 98: RSI(3) below 70"
    )
    await drive(strategy, broker, clock, "X-USD", [(8, 100)])  # closes up to 99: RSI(3) 70.4
    assert await broker.positions() == []


# -- hold -----------------------------------------------------------------------------------


def test_order_towards() -> None:
    assert order_towards(None, 1.0) == ("buy", 1.0)
    assert order_towards(None, -2.0) == ("sell", 2.0)
    assert order_towards(LONG, 1.0) is None
    assert order_towards(LONG, 3.0) == ("buy", 2.0)
    assert order_towards(SHORT, 1.0) == ("buy", 2.0)
    assert order_towards(LONG, 0.0) == ("sell", 1.0)


async def test_hold_opens_the_target_on_every_instrument() -> None:
    broker = paper(instruments=(BTC, ETH))
    await Hold(config(instruments=(BTC, ETH), amount=0.5), broker).start()
    assert {(p.instrument, p.side, p.amount) for p in await broker.positions()} == {
        (BTC, "long", 0.5),
        (ETH, "long", 0.5),
    }


async def test_hold_defaults_to_one_long_and_respects_side_and_cap() -> None:
    broker = paper()
    await Hold(config(), broker).start()
    assert [(p.side, p.amount) for p in await broker.positions()] == [("long", 1.0)]
    broker = paper()
    await Hold(config(risk={"maxPositionSize": 2}, side="short", amount=5), broker).start()
    assert [(p.side, p.amount) for p in await broker.positions()] == [("short", 2.0)]


async def test_hold_restart_with_the_position_in_place_orders_nothing(tmp_path: Path) -> None:
    state = tmp_path / "worker.json"
    await Hold(config(amount=0.5), paper(state_file=state)).start()
    facts: list[BrokerFact] = []
    restarted = paper(facts, state_file=state)
    await Hold(config(amount=0.5), restarted).start()
    assert facts == []
    assert [p.amount for p in await restarted.positions()] == [0.5]


async def test_hold_restart_tops_up_a_partial_position_and_turns_a_wrong_one(
    tmp_path: Path,
) -> None:
    state = tmp_path / "worker.json"
    broker = paper(state_file=state, instruments=(BTC, ETH))
    await broker.market_order(BTC, "buy", 0.25)
    await broker.market_order(ETH, "sell", 1)
    restarted = paper(state_file=state, instruments=(BTC, ETH))
    await Hold(config(instruments=(BTC, ETH)), restarted).start()
    assert {(p.instrument, p.side, p.amount) for p in await restarted.positions()} == {
        (BTC, "long", 1.0),
        (ETH, "long", 1.0),
    }


def test_hold_rejects_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        Hold(config(amount=-1), paper())
    with pytest.raises(ValueError):
        Hold(config(side="sideways"), paper())


# -- loading --------------------------------------------------------------------------------


def test_strategies_load_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_strategy("hold") is Hold
    assert load_strategy("scalping") is Scalping
    monkeypatch.setenv("RUNNER_ENABLE_CHAOS", "1")
    assert load_strategy("chaos") is Chaos
    assert {"hold", "scalping", "chaos"} <= available_strategies()


def test_fault_drills_are_offered_and_run_only_where_enabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RUNNER_ENABLE_CHAOS", raising=False)
    with pytest.raises(UnknownStrategy, match="fault drill"):
        load_strategy("chaos")
    assert "chaos" not in available_strategies()
    assert "chaos" in available_strategies(drills=True)
    assert "chaos" not in available_strategies(drills=False)


def test_unknown_strategy_names_the_known_ones() -> None:
    with pytest.raises(UnknownStrategy, match=r"'martingale'.*hold"):
        load_strategy("martingale")


def test_builtins_load_without_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strategies_base, "entry_points", lambda **_: ())
    assert load_strategy("hold") is Hold
    assert available_strategies(drills=True) == set(BUILTIN_STRATEGIES)


def test_entry_point_that_is_not_a_strategy_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class EntryPoint:
        name = "rogue"

        def load(self) -> object:
            return object

    monkeypatch.setattr(strategies_base, "entry_points", lambda **_: (EntryPoint(),))
    with pytest.raises(UnknownStrategy, match="not name a Strategy"):
        load_strategy("rogue")
    assert issubclass(Hold, Strategy)


def test_only_strategies_with_an_on_tick_of_their_own_are_woken_for_ticks() -> None:
    """Hold trades once; Chaos (a Hold) and Scalping act on every tick."""
    broker = paper()
    assert not Hold(config(), broker).acts_on_ticks
    assert Chaos(config("chaos"), broker).acts_on_ticks
    assert Scalping(config("scalping"), broker).acts_on_ticks
