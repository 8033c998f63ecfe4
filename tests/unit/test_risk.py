"""The runtime's risk limits, table-style: pre-trade checks and stop-loss / take-profit."""

from __future__ import annotations

import pytest

from events.values import Position, RiskManagement
from services.worker.risk import ORDER_RATE_WINDOW, exit_due, pre_trade

LIMITS = RiskManagement(max_position_size=100, stop_loss_percent=2, take_profit_percent=3,
                        max_orders_per_minute=3)
BTC = "BTC-PERPETUAL"


def held(side: str, amount: float, entry: float = 50_000) -> Position:
    return Position(instrument=BTC, side=side, amount=amount, entry_price=entry)


@pytest.mark.parametrize(("position", "side", "amount", "rule", "value"), [
    (None, "buy", 100, None, None),
    (None, "buy", 1_000, "max_position_size", 1_000),
    (held("long", 60), "buy", 50, "max_position_size", 110),
    (held("long", 60), "sell", 50, None, None),
    (held("long", 60), "sell", 150, None, None),  # flips to a short of 90: within the limit
    (held("long", 60), "sell", 200, "max_position_size", 140),  # a short of 140
    (held("short", 150), "buy", 30, None, None),  # shrinks a position over the limit
    (held("short", 150), "buy", 300, "max_position_size", 150),  # flips past it
])
def test_position_after_the_order_is_within_max_position_size(
        position: Position | None, side: str, amount: float, rule: str | None,
        value: float | None) -> None:
    hit = pre_trade(LIMITS, position, BTC, side, amount, recent=(), now=0.0)
    assert (hit.rule, hit.value) == (rule, value) if hit else rule is None
    if hit:
        assert hit.limit == 100 and "maxPositionSize 100" in hit.detail


def test_order_rate_is_bounded_per_minute() -> None:
    recent = [100.0, 110.0, 120.0]
    hit = pre_trade(LIMITS, None, BTC, "buy", 1, recent=recent, now=125.0)
    assert hit is not None and (hit.rule, hit.limit, hit.value) == ("order_rate", 3, 4)
    later = 100.0 + ORDER_RATE_WINDOW + 0.1  # the first has left the window
    assert pre_trade(LIMITS, None, BTC, "buy", 1, recent=recent, now=later) is None


@pytest.mark.parametrize(("position", "mark", "rule", "limit"), [
    (held("long", 10), 49_500, None, None),
    (held("long", 10), 49_000, "stop_loss", 49_000),
    (held("long", 10), 48_000, "stop_loss", 49_000),
    (held("long", 10), 51_500, "take_profit", 51_500),
    (held("short", 10), 51_000, "stop_loss", 51_000),
    (held("short", 10), 48_500, "take_profit", 48_500),
    (held("short", 10), 50_900, None, None),
    (held("long", 0), 1, None, None),
])
def test_stop_loss_and_take_profit_are_percentages_of_the_entry(
        position: Position, mark: float, rule: str | None, limit: float | None) -> None:
    hit = exit_due(LIMITS, position, mark)
    if rule is None:
        assert hit is None
    else:
        assert hit is not None and (hit.rule, hit.value) == (rule, mark)
        assert hit.limit == pytest.approx(limit)
