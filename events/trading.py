"""What a worker's trading did (stream `job-<job_id>`)."""

from __future__ import annotations

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
