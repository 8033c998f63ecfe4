"""Hold: take a fixed position on every instrument and keep it. The deterministic baseline for
tests and demos."""

from __future__ import annotations

import contextlib

from pydantic import Field

from events.values import Side, StrategyConfig
from services.worker.brokers.base import Broker, OrderRefused
from services.worker.strategies.base import (
    Strategy,
    StrategyParameters,
    order_towards,
    signed_target,
)


class HoldParameters(StrategyParameters):
    amount: float = Field(default=1.0, gt=0)
    side: Side = "long"


class Hold(Strategy):
    """At start, brings each instrument's position to `side` × min(`amount`, maxPositionSize).

    Idempotent across restarts: a restored position already at the target places no order (one
    that differs is topped up or trimmed, never doubled). An order refused for good leaves that
    instrument as it is (the refusal is reported); the others are still brought to the target.
    """

    parameters_model: type[HoldParameters] = HoldParameters

    def __init__(self, config: StrategyConfig, broker: Broker) -> None:
        super().__init__(config, broker)
        self.parameters = self.parameters_model.model_validate(config.parameters)

    @property
    def target(self) -> float:
        amount = min(self.parameters.amount, self.config.risk_management.max_position_size)
        return signed_target(self.parameters.side, amount)

    async def start(self) -> None:
        held = {position.instrument: position for position in await self.broker.positions()}
        for instrument in self.config.instruments:
            order = order_towards(held.get(instrument), self.target)
            if order is not None:
                side, amount = order
                with contextlib.suppress(OrderRefused):  # reported; the rest still trade
                    await self.broker.market_order(instrument, side, amount)
