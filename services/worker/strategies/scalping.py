"""Scalping: mean reversion on the RSI of short candles, with percent stop-loss/take-profit."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from pydantic import Field, model_validator

from events.values import Position, RiskManagement, StrategyConfig
from services.worker.brokers.base import Broker, closing_side, direction
from services.worker.strategies.base import Strategy, StrategyParameters
from services.worker.strategies.indicators import Candles, parse_timeframe, rsi

Signal = Literal["long", "short", "exit"]


class ScalpingParameters(StrategyParameters):
    timeframe: str = "1m"
    rsi_period: int = Field(default=14, ge=2, le=500)
    oversold: float = Field(default=30.0, ge=0, le=100)
    overbought: float = Field(default=70.0, ge=0, le=100)
    amount: float = Field(default=1.0, gt=0)
    tick_interval: float | None = Field(default=None, gt=0, le=60)

    @model_validator(mode="after")
    def _coherent(self) -> ScalpingParameters:
        parse_timeframe(self.timeframe)
        if self.oversold >= self.overbought:
            raise ValueError("oversold must be below overbought")
        return self


def move_percent(position: Position, mark: float) -> float:
    """How far the mark has moved in the position's favour, in percent of its entry."""
    return (mark - position.entry_price) / position.entry_price * 100 * direction(position.side)


def decide(
    position: Position | None,
    mark: float,
    strength: float | None,
    parameters: ScalpingParameters,
    risk: RiskManagement,
) -> Signal | None:
    """What to do on one instrument now; `strength` is the RSI of a candle that just closed
    (None between candles), so risk exits are checked every tick, RSI signals once per candle.
    Flat: oversold -> long, overbought -> short; in a position: exit on the stop-loss or
    take-profit (percent from entry) or on the opposite extreme."""
    if position is None:
        if strength is None:
            return None
        if strength < parameters.oversold:
            return "long"
        if strength > parameters.overbought:
            return "short"
        return None
    moved = move_percent(position, mark)
    if moved <= -risk.stop_loss_percent or moved >= risk.take_profit_percent:
        return "exit"
    if strength is not None:
        if position.side == "long" and strength > parameters.overbought:
            return "exit"
        if position.side == "short" and strength < parameters.oversold:
            return "exit"
    return None


class Scalping(Strategy):
    """Trades each instrument on its own; positions are never larger than maxPositionSize."""

    parameters_model: type[ScalpingParameters] = ScalpingParameters

    def __init__(
        self,
        config: StrategyConfig,
        broker: Broker,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config, broker)
        self.parameters = self.parameters_model.model_validate(config.parameters)
        self.clock = clock
        width = parse_timeframe(self.parameters.timeframe)
        # Several ticks per candle, but never a busy loop nor a sleepy one.
        self.tick_interval = self.parameters.tick_interval or min(max(width / 5, 0.05), 1.0)
        keep = max(10 * self.parameters.rsi_period, 250)
        self.candles = {instrument: Candles(width, keep) for instrument in config.instruments}

    @property
    def amount(self) -> float:
        return min(self.parameters.amount, self.config.risk_management.max_position_size)

    async def start(self) -> None:
        await self._observe()

    async def on_tick(self) -> None:
        await self._observe()

    async def _observe(self) -> None:
        now = self.clock()
        held = {position.instrument: position for position in await self.broker.positions()}
        for instrument, candles in self.candles.items():
            mark = await self.broker.mark(instrument)
            closed = candles.add(now, mark)
            strength = rsi(candles.closes, self.parameters.rsi_period) if closed else None
            position = held.get(instrument)
            signal = decide(position, mark, strength, self.parameters, self.config.risk_management)
            if signal == "long":
                await self.broker.market_order(instrument, "buy", self.amount)
            elif signal == "short":
                await self.broker.market_order(instrument, "sell", self.amount)
            elif signal == "exit" and position is not None:
                await self.broker.market_order(
                    instrument, closing_side(position), position.amount, reduce_only=True
                )
