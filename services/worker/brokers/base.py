"""The broker adapter interface a strategy trades through (ccxt-shaped, async).

Every fill, position change and closed trade is handed to the `sink` the runtime supplies, in
that order per fill, so the runtime can report each one to the host as it happens.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from events.values import Fill, OrderSide, Position, PositionMark, Side

if TYPE_CHECKING:
    from events.values import StrategyConfig
    from services.worker.prices import FeedPrices

# Amounts below this are float dust: a position this small is flat.
AMOUNT_EPSILON = 1e-9


class BrokerError(Exception):
    """The exchange refused an order or a query (its message never carries credentials)."""


class UnknownBroker(LookupError):
    """No adapter is registered under this broker id."""


class CredentialsRejected(BrokerError):
    """The exchange rejected the account's API key: restarting cannot help."""


class BrokerUnavailable(BrokerError):
    """The exchange could not be reached (or kept answering "busy") within the retry budget."""


class Refusal(BaseModel):
    """An order that was not placed, and why: refused for good by the exchange (`by`
    "exchange": insufficient funds, invalid amount, ...) or by the runtime's risk limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instrument: str
    side: OrderSide
    amount: float
    order_type: Literal["market", "limit"] = "market"
    reason: str
    by: Literal["exchange", "risk"] = "exchange"


class OrderRefused(BrokerError):
    """An order was refused for good (see `refusal`); it is already reported, and the strategy
    told (`Strategy.on_order_refused`). A strategy may catch it and go on."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(f"{refusal.side} {refusal.amount:g} {refusal.instrument} refused by "
                         f"the {refusal.by}: {refusal.reason}")
        self.refusal = refusal


class OpenOrder(BaseModel):
    """A resting limit order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    order_id: str
    instrument: str
    side: OrderSide
    amount: float
    price: float


class ClosedTrade(BaseModel):
    """A (partial) close of a position: the part of a fill that reduced it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instrument: str
    side: Side
    amount: float
    entry_price: float
    exit_price: float
    realized_pnl: float


# A position with amount 0 is the "now flat" change on that instrument.
BrokerFact = Fill | Position | ClosedTrade
EventSink = Callable[[BrokerFact], None]


def discard(_: BrokerFact) -> None:
    """The sink of a broker nobody listens to."""


@dataclass(frozen=True)
class Credentials:
    """API credentials; never shown by `repr`, so they cannot leak through a log line."""

    api_key: str = field(default="", repr=False)
    api_secret: str = field(default="", repr=False)


def direction(side: Side) -> int:
    return 1 if side == "long" else -1


def closing_side(position: Position) -> OrderSide:
    return "sell" if position.side == "long" else "buy"


def unrealized_pnl(position: Position, mark: float) -> float:
    return (mark - position.entry_price) * position.amount * direction(position.side)


def mark_position(position: Position, mark: float, pnl: float | None = None) -> PositionMark:
    """The position at `mark`; its P&L linear in price unless the broker gives it (`pnl`)."""
    return PositionMark(
        instrument=position.instrument,
        side=position.side,
        amount=position.amount,
        entry_price=position.entry_price,
        mark_price=mark,
        unrealized_pnl=unrealized_pnl(position, mark) if pnl is None else pnl,
    )


def check_amount(amount: float) -> None:
    if not (math.isfinite(amount) and amount > 0):
        raise BrokerError(f"order amount must be a positive number, got {amount!r}")


class Broker(ABC):
    """One trading account. Methods are async because real exchanges are network calls.

    `live_market`: its prices move on their own (an exchange), so a strategy that does not act
    on ticks need not step them (the simulator's `MarketClock`).
    """

    live_market: bool = False
    prices: FeedPrices | None = None  # the host's market-data feed, when the runtime has one

    def __init__(self, sink: EventSink = discard) -> None:
        self.sink = sink

    def price_keys(self) -> list[tuple[str, str]]:
        """The (source, instrument) prices this account would take from the host's feed."""
        return []

    async def connect(self) -> None:
        """Reach the account before the worker says hello: check its credentials (raise
        CredentialsRejected) and settle what a previous run left in flight. Nothing to do for
        an account without a remote side."""
        return None

    def pnl(self, position: Position, price: float) -> float:
        """The P&L of `position` at `price`, in the account's currency (linear by default)."""
        return unrealized_pnl(position, price)

    def known_positions(self) -> list[Position]:
        """The positions the account showed last, without asking it (what a flatten that could
        not read them reports as still open)."""
        return []

    def at_start(self, positions: list[Position]) -> list[Position]:
        """What a starting worker reports: the open `positions`, and a flat one (amount 0) for
        each instrument an earlier run saw open that is flat now (closed meanwhile)."""
        return positions

    @classmethod
    @abstractmethod
    def open(
        cls,
        *,
        worker_id: str,
        config: StrategyConfig,
        credentials: Credentials,
        state_file: Path | None,
        seed: str | None,
        sink: EventSink,
    ) -> Broker:
        """Connect the account a worker trades on, from the worker's environment."""

    @abstractmethod
    async def market_order(
        self, instrument: str, side: OrderSide, amount: float, reduce_only: bool = False
    ) -> Fill:
        """Fill now at the market. `reduce_only` caps the amount at the open position and
        refuses an order that would open or grow one."""

    @abstractmethod
    async def limit_order(
        self, instrument: str, side: OrderSide, amount: float, price: float
    ) -> str:
        """Rest an order at `price`; returns its id. It fills once the market crosses it."""

    @abstractmethod
    async def cancel(self, order_id: str) -> None:
        """Cancel a resting order (unknown or already filled ids raise BrokerError)."""

    @abstractmethod
    async def cancel_all(self) -> int:
        """Cancel every resting order; returns how many were cancelled."""

    @abstractmethod
    async def open_orders(self) -> list[OpenOrder]:
        """The resting orders, oldest first."""

    @abstractmethod
    async def positions(self) -> list[Position]:
        """The open (non-flat) positions, one per instrument."""

    @abstractmethod
    async def mark(self, instrument: str) -> float:
        """The current mark price of `instrument`."""

    @abstractmethod
    async def tick(self) -> None:
        """Advance market data one step (a live exchange polls; the paper one simulates)."""

    @abstractmethod
    async def close(self) -> None:
        """Release the adapter's connections."""
