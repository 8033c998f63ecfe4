"""Risk limits the runtime enforces whatever the strategy's code does (`riskManagement`).

- Before every order of the strategy (`pre_trade`): the position it would leave on its
  instrument is at most `maxPositionSize` (an order that only shrinks a position always
  passes), and the strategy has placed fewer than `maxOrdersPerMinute` orders in the last
  minute.
- On every heartbeat's marks (`exit_due`): a position whose mark has crossed its stop-loss or
  take-profit price (a percentage of its entry price) is closed at market.

Both are pure; `GuardedBroker` applies `pre_trade` to the broker the strategy is given.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from events.values import Fill, OrderSide, Position, RiskManagement
from services.worker.brokers.base import (
    AMOUNT_EPSILON,
    Broker,
    OpenOrder,
    OrderRefused,
    Refusal,
    direction,
)

ORDER_RATE_WINDOW = 60.0  # seconds `maxOrdersPerMinute` counts over

Rule = Literal["max_position_size", "order_rate", "stop_loss", "take_profit"]


@dataclass(frozen=True)
class Hit:
    """A limit reached: the rule, the instrument, its figures (the limit and the value that
    reached it) and a sentence saying so."""

    rule: Rule
    instrument: str
    limit: float
    value: float
    detail: str


def signed(position: Position | None) -> float:
    return direction(position.side) * position.amount if position else 0.0


def pre_trade(limits: RiskManagement, held: Position | None, instrument: str, side: OrderSide,
              amount: float, recent: Sequence[float], now: float) -> Hit | None:
    """The limit an order of the strategy would break, if any. `recent`: when its earlier
    orders were placed (same clock as `now`)."""
    current = signed(held)
    after = current + (amount if side == "buy" else -amount)
    grows = abs(after) > abs(current) + AMOUNT_EPSILON or after * current < 0
    if grows and abs(after) > limits.max_position_size + AMOUNT_EPSILON:
        return Hit("max_position_size", instrument, limits.max_position_size, abs(after),
                   f"{side} {amount:g} would make the position {abs(after):g}, over "
                   f"maxPositionSize {limits.max_position_size:g}")
    placed = sum(1 for at in recent if now - at < ORDER_RATE_WINDOW)
    if placed >= limits.max_orders_per_minute:
        return Hit("order_rate", instrument, limits.max_orders_per_minute, placed + 1,
                   f"{placed} orders in the last minute already (maxOrdersPerMinute "
                   f"{limits.max_orders_per_minute})")
    return None


def exit_due(limits: RiskManagement, position: Position, mark: float) -> Hit | None:
    """The stop-loss or take-profit `position` has reached at `mark`, if any."""
    if position.amount <= AMOUNT_EPSILON or position.entry_price <= 0:
        return None
    entry, sign = position.entry_price, direction(position.side)
    stop = entry * (1 - sign * limits.stop_loss_percent / 100)
    take = entry * (1 + sign * limits.take_profit_percent / 100)
    if (mark - stop) * sign <= 0:
        return Hit("stop_loss", position.instrument, stop, mark,
                   f"mark {mark:g} crossed the stop-loss {stop:g} "
                   f"({limits.stop_loss_percent:g}% from entry {entry:g})")
    if (mark - take) * sign >= 0:
        return Hit("take_profit", position.instrument, take, mark,
                   f"mark {mark:g} crossed the take-profit {take:g} "
                   f"({limits.take_profit_percent:g}% from entry {entry:g})")
    return None


OnRefused = Callable[[Refusal, Hit | None], Awaitable[None]]


class GuardedBroker(Broker):
    """The broker a strategy trades through: each order passes `pre_trade` first; a refusal
    (the limit's, or the exchange's for good) goes to `on_refused` (which reports it and tells
    the strategy) and raises OrderRefused. Everything else is the account's own."""

    live_market = False  # replaced per instance by the account's

    def __init__(self, account: Broker, limits: RiskManagement, on_refused: OnRefused,
                 clock: Callable[[], float]) -> None:
        super().__init__(account.sink)
        self.account = account
        self.live_market = account.live_market
        self.limits = limits
        self.on_refused = on_refused
        self.clock = clock
        self.placed: deque[float] = deque(maxlen=max(limits.max_orders_per_minute, 1))

    @classmethod
    def open(cls, **_: object) -> Broker:  # type: ignore[override]
        raise TypeError("a GuardedBroker wraps an open account; it is not opened by id")

    async def _admit(self, instrument: str, side: OrderSide, amount: float,
                     order_type: Literal["market", "limit"], reduce_only: bool) -> None:
        held = {p.instrument: p for p in await self.account.positions()}.get(instrument)
        now = self.clock()
        hit = None if reduce_only else pre_trade(self.limits, held, instrument, side, amount,
                                                 self.placed, now)
        if hit is not None:
            refusal = Refusal(instrument=instrument, side=side, amount=amount,
                              order_type=order_type, reason=hit.detail, by="risk")
            await self.on_refused(refusal, hit)
            raise OrderRefused(refusal)
        self.placed.append(now)

    async def market_order(self, instrument: str, side: OrderSide, amount: float,
                           reduce_only: bool = False) -> Fill:
        await self._admit(instrument, side, amount, "market", reduce_only)
        try:
            return await self.account.market_order(instrument, side, amount, reduce_only)
        except OrderRefused as refused:
            await self.on_refused(refused.refusal, None)
            raise

    async def limit_order(self, instrument: str, side: OrderSide, amount: float,
                          price: float) -> str:
        await self._admit(instrument, side, amount, "limit", False)
        try:
            return await self.account.limit_order(instrument, side, amount, price)
        except OrderRefused as refused:
            await self.on_refused(refused.refusal, None)
            raise

    async def cancel(self, order_id: str) -> None:
        await self.account.cancel(order_id)

    async def cancel_all(self) -> int:
        return await self.account.cancel_all()

    async def open_orders(self) -> list[OpenOrder]:
        return await self.account.open_orders()

    async def positions(self) -> list[Position]:
        return await self.account.positions()

    async def mark(self, instrument: str) -> float:
        return await self.account.mark(instrument)

    async def tick(self) -> None:
        await self.account.tick()

    async def close(self) -> None:
        await self.account.close()

    def pnl(self, position: Position, price: float) -> float:
        return self.account.pnl(position, price)

    def known_positions(self) -> list[Position]:
        return self.account.known_positions()

    def at_start(self, positions: list[Position]) -> list[Position]:
        return self.account.at_start(positions)
