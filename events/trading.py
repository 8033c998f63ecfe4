"""What a worker's trading did (stream `job-<job_id>`)."""

from __future__ import annotations

from typing import Literal

from events.base import Event
from events.values import Id, OrderSide, Side


class _TradingEvent(Event):
    category = "trading"
    job_id: Id
    worker_id: Id


class OrderFilled(_TradingEvent):
    order_id: str
    instrument: str
    side: OrderSide
    amount: float
    price: float
    fee: float = 0.0


class PositionChanged(_TradingEvent):
    """The position on `instrument` is now this (amount 0 means flat)."""

    instrument: str
    side: Side
    amount: float
    entry_price: float


class TradeClosed(_TradingEvent):
    instrument: str
    side: Side
    amount: float
    entry_price: float
    exit_price: float
    realized_pnl: float


class OrderRejected(_TradingEvent):
    """The exchange refused an order for good (insufficient funds, invalid amount, ...): it was
    not placed, and retrying it as it is cannot help. `reason` is the exchange's."""

    instrument: str
    side: OrderSide
    amount: float
    order_type: Literal["market", "limit"] = "market"
    reason: str


class RiskLimitHit(_TradingEvent):
    """The runtime enforced a risk limit: an order refused before it reached the exchange
    (`action` "refused") or a position closed at market (`action` "closed"). `limit` and
    `value` are the rule's figures (e.g. maxPositionSize and the position the order would have
    made; the stop price and the mark)."""

    rule: Literal["max_position_size", "order_rate", "stop_loss", "take_profit"]
    action: Literal["refused", "closed"]
    instrument: str
    limit: float
    value: float
    detail: str = ""
