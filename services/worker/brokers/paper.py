"""A simulated exchange: seeded random-walk prices, taker/maker fees, net positions, and an
account that survives a worker restart (a real exchange keeps positions when a bot crashes).

Accounting choices:
- one net position per instrument; a fill against it closes first, the rest opens the other way
  (a flip) at the fill price;
- `TradeClosed.realized_pnl` is the gross P&L of the closed amount minus the part of the closing
  fill's fee that closed it (pro rata on a flip); the opening fee was already reported on the
  opening `OrderFilled`. The account's own `realized_pnl` is cash-like: every gross close minus
  every fee, opening ones included.
- limit orders rest until a tick's mark crosses them (buy: mark <= price, sell: mark >= price)
  and then fill at their own price as maker; a limit placed through the market also waits for
  the next tick.
"""

from __future__ import annotations

import math
import os
import random
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from events.values import Fill, OrderSide, Position, StrategyConfig
from services.worker.brokers.base import (
    AMOUNT_EPSILON,
    Broker,
    BrokerError,
    BrokerFact,
    ClosedTrade,
    Credentials,
    EventSink,
    OpenOrder,
    check_amount,
    closing_side,
    direction,
    discard,
)

TAKER_FEE = 0.0005
MAKER_FEE = 0.0002
DEFAULT_SPREAD = 0.0002  # full bid/ask spread as a fraction of the mark
DEFAULT_VOLATILITY = 0.001  # standard deviation of the log return per tick
# Ticks that only move the marks are written every this many ticks (and at close), not each
# time: a thousand idle workers rewriting their files every second keep the disk busy for the
# whole machine. A restart from an older file replays the same deterministic walk.
MARKS_SAVE_EVERY = 30
STARTING_PRICES = {"BTC": 50_000.0, "ETH": 3_000.0, "SOL": 150.0}
OTHER_STARTING_PRICE = 100.0


def base_asset(instrument: str) -> str:
    """`BTC-PERPETUAL`, `ETH-USD`, `SOL/USDT:USDT` -> `BTC`, `ETH`, `SOL`."""
    return re.split(r"[-/:_ ]", instrument.strip(), maxsplit=1)[0].upper()


def starting_price(instrument: str) -> float:
    return STARTING_PRICES.get(base_asset(instrument), OTHER_STARTING_PRICE)


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class PaperFaults(_Camel):
    """Failure injection for drills and tests (`parameters.paperFaults`)."""

    reject_orders: bool = False


class PaperSettings(BaseModel):
    """The paper exchange's knobs, read from the strategy's `parameters`."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    volatility: float = Field(default=DEFAULT_VOLATILITY, ge=0, le=0.5, alias="paperVolatility")
    spread: float = Field(default=DEFAULT_SPREAD, ge=0, le=0.5, alias="paperSpread")
    faults: PaperFaults = Field(default_factory=PaperFaults, alias="paperFaults")


class PaperAccount(BaseModel):
    """Everything the state file holds; rewritten atomically after every change."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    order_seq: int = 0
    positions: dict[str, Position] = Field(default_factory=dict)
    orders: dict[str, OpenOrder] = Field(default_factory=dict)
    marks: dict[str, float] = Field(default_factory=dict)
    ticks: dict[str, int] = Field(default_factory=dict)
    realized_pnl: float = 0.0
    fees_paid: float = 0.0


class PaperBroker(Broker):
    """Seeded and deterministic: the same seed, orders and ticks give the same fills.

    Each instrument's walk is a `random.Random` seeded from (seed, instrument, tick number at
    which this process took it over), so a restarted worker carries on from its last mark along
    a path that is again reproducible.
    """

    def __init__(
        self,
        *,
        seed: str,
        instruments: tuple[str, ...] | list[str] = (),
        state_file: Path | None = None,
        settings: PaperSettings | None = None,
        sink: EventSink = discard,
    ) -> None:
        super().__init__(sink)
        self.seed = seed
        self.settings = settings or PaperSettings()
        self.state_file = state_file
        self.account = self._load()
        self._walks: dict[str, random.Random] = {}
        self._unsaved_ticks = 0
        known = len(self.account.marks)
        for instrument in instruments:
            self._market(instrument)
        if len(self.account.marks) != known:
            # A new instrument's starting mark is reproducible (its walk starts at tick 0), so
            # it is written with the next change, not at once: no write, no fsync, before the
            # worker's hello.
            self._unsaved_ticks += 1

    @classmethod
    def open(
        cls,
        *,
        worker_id: str,
        config: StrategyConfig,
        credentials: Credentials,
        state_file: Path | None,
        seed: str | None,
        sink: EventSink,
    ) -> PaperBroker:
        try:
            settings = PaperSettings.model_validate(config.parameters)
        except ValidationError as exc:
            raise ValueError(f"invalid paper broker parameters: {exc}") from None
        return cls(
            seed=seed if seed is not None else worker_id,
            instruments=config.instruments,
            state_file=state_file,
            settings=settings,
            sink=sink,
        )

    # -- orders -------------------------------------------------------------------------------

    async def market_order(
        self, instrument: str, side: OrderSide, amount: float, reduce_only: bool = False
    ) -> Fill:
        self._admit(amount)
        mark = self._market(instrument)
        if reduce_only:
            amount = self._reducing(instrument, side, amount)
        half_spread = self.settings.spread / 2
        price = mark * (1 + half_spread) if side == "buy" else mark * (1 - half_spread)
        return self._execute(instrument, side, amount, price, TAKER_FEE)

    async def limit_order(
        self, instrument: str, side: OrderSide, amount: float, price: float
    ) -> str:
        self._admit(amount)
        if not (math.isfinite(price) and price > 0):
            raise BrokerError(f"limit price must be a positive number, got {price!r}")
        self._market(instrument)
        order = OpenOrder(
            order_id=self._next_order_id(),
            instrument=instrument,
            side=side,
            amount=amount,
            price=price,
        )
        self.account.orders[order.order_id] = order
        self._save(durable=True)
        return order.order_id

    async def cancel(self, order_id: str) -> None:
        if self.account.orders.pop(order_id, None) is None:
            raise BrokerError(f"no open order {order_id!r}")
        self._save(durable=True)

    async def cancel_all(self) -> int:
        cancelled = len(self.account.orders)
        if cancelled:
            self.account.orders.clear()
            self._save(durable=True)
        return cancelled

    # -- account and market -------------------------------------------------------------------

    async def positions(self) -> list[Position]:
        return list(self.account.positions.values())

    async def open_orders(self) -> list[OpenOrder]:
        return list(self.account.orders.values())

    def known_positions(self) -> list[Position]:
        return list(self.account.positions.values())

    async def mark(self, instrument: str) -> float:
        return self._market(instrument)

    async def tick(self) -> None:
        sigma = self.settings.volatility
        for instrument in list(self.account.marks):
            walk = self._walks.get(instrument) or self._walk(instrument)
            step = sigma * walk.gauss(0.0, 1.0) - sigma * sigma / 2  # a martingale in price
            self.account.marks[instrument] *= math.exp(step)
            self.account.ticks[instrument] = self.account.ticks.get(instrument, 0) + 1
        filled = False
        for order in list(self.account.orders.values()):
            mark = self.account.marks[order.instrument]
            if (order.side == "buy" and mark <= order.price) or (
                order.side == "sell" and mark >= order.price
            ):
                del self.account.orders[order.order_id]
                self._execute(
                    order.instrument,
                    order.side,
                    order.amount,
                    order.price,
                    MAKER_FEE,
                    order.order_id,
                )
                filled = True
        if not filled:
            # Only marks moved: losing them to a power cut costs nothing, so skip the fsync.
            self._unsaved_ticks += 1
            if self._unsaved_ticks >= MARKS_SAVE_EVERY:
                self._save(durable=False)

    async def close(self) -> None:
        """Write the latest marks; every other change is already on disk."""
        if self._unsaved_ticks:
            self._save(durable=False)

    def set_mark(self, instrument: str, price: float) -> None:
        """Move the simulated market (tests and demos); resting orders are checked next tick."""
        if not (math.isfinite(price) and price > 0):
            raise ValueError(f"mark must be a positive number, got {price!r}")
        self._market(instrument)
        self.account.marks[instrument] = price
        self._save(durable=False)

    # -- internals ----------------------------------------------------------------------------

    def _admit(self, amount: float) -> None:
        if self.settings.faults.reject_orders:
            raise BrokerError("paper exchange rejected the order (fault injection: rejectOrders)")
        check_amount(amount)

    def _reducing(self, instrument: str, side: OrderSide, amount: float) -> float:
        """`amount` of a reduce-only order, cut to the position it reduces; BrokerError when it
        would not reduce one."""
        held = self.account.positions.get(instrument)
        if held is None or closing_side(held) != side:
            raise BrokerError(f"reduce-only {side} on {instrument} would not reduce a position")
        return min(amount, held.amount)

    def _market(self, instrument: str) -> float:
        if instrument not in self.account.marks:
            self.account.marks[instrument] = starting_price(instrument)
            self.account.ticks[instrument] = 0
        if instrument not in self._walks:
            self._walk(instrument)
        return self.account.marks[instrument]

    def _walk(self, instrument: str) -> random.Random:
        ticks = self.account.ticks.get(instrument, 0)
        walk = self._walks[instrument] = random.Random(f"{self.seed}|{instrument}|{ticks}")
        return walk

    def _next_order_id(self) -> str:
        self.account.order_seq += 1
        return f"paper-{self.account.order_seq}"

    def _execute(
        self,
        instrument: str,
        side: OrderSide,
        amount: float,
        price: float,
        fee_rate: float,
        order_id: str | None = None,
    ) -> Fill:
        """Apply one fill to the account, persist it, then tell the sink (persisted first, so
        nothing reported can be forgotten by a restart)."""
        fee = amount * price * fee_rate
        fill = Fill(
            order_id=order_id or self._next_order_id(),
            instrument=instrument,
            side=side,
            amount=amount,
            price=price,
            fee=fee,
        )
        facts: list[BrokerFact] = [fill]
        fill_side = "long" if side == "buy" else "short"
        held = self.account.positions.get(instrument)
        gross = 0.0
        if held is None or held.side == fill_side:
            size = (held.amount if held else 0.0) + amount
            cost = (held.amount * held.entry_price if held else 0.0) + amount * price
            after = Position(
                instrument=instrument, side=fill_side, amount=size, entry_price=cost / size
            )
        else:
            closed = min(amount, held.amount)
            gross = (price - held.entry_price) * closed * direction(held.side)
            facts.append(
                ClosedTrade(
                    instrument=instrument,
                    side=held.side,
                    amount=closed,
                    entry_price=held.entry_price,
                    exit_price=price,
                    realized_pnl=gross - fee * closed / amount,
                )
            )
            left, opened = held.amount - closed, amount - closed
            if left > AMOUNT_EPSILON:
                after = held.model_copy(update={"amount": left})
            elif opened > AMOUNT_EPSILON:
                after = Position(
                    instrument=instrument, side=fill_side, amount=opened, entry_price=price
                )
            else:
                after = Position(instrument=instrument, side=held.side, amount=0.0, entry_price=0.0)
        if after.amount > AMOUNT_EPSILON:
            self.account.positions[instrument] = after
        else:
            self.account.positions.pop(instrument, None)
        self.account.realized_pnl += gross - fee
        self.account.fees_paid += fee
        self._save(durable=True)
        facts.append(after)
        for fact in facts:
            self.sink(fact)
        return fill

    def _load(self) -> PaperAccount:
        if self.state_file is None or not self.state_file.exists():
            return PaperAccount()
        try:
            return PaperAccount.model_validate_json(self.state_file.read_bytes())
        except (OSError, ValidationError) as exc:
            # Trading on without knowing the open positions would be worse than not starting.
            raise BrokerError(
                f"paper account state {self.state_file} is unreadable: {exc}"
            ) from None

    def _save(self, *, durable: bool) -> None:
        self._unsaved_ticks = 0
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        temp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
        with open(temp, "wb") as out:
            out.write(self.account.model_dump_json().encode())
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temp, self.state_file)
