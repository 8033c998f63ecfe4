"""Greedy: ignores `riskManagement` entirely. At start it buys each amount of `buys` in turn
(an amount over `maxPositionSize` is refused by the runtime) and it never closes anything."""

from __future__ import annotations

import contextlib
import logging

from pydantic import Field

from events.values import StrategyConfig
from services.worker.brokers.base import Broker, OrderRefused, Refusal
from services.worker.strategies.base import Strategy, StrategyParameters

log = logging.getLogger(__name__)


class GreedyParameters(StrategyParameters):
    buys: list[float] = Field(default_factory=lambda: [1_000.0])


class Greedy(Strategy):
    def __init__(self, config: StrategyConfig, broker: Broker) -> None:
        super().__init__(config, broker)
        self.parameters = GreedyParameters.model_validate(config.parameters)

    async def start(self) -> None:
        for amount in self.parameters.buys:
            with contextlib.suppress(OrderRefused):
                await self.broker.market_order(self.config.instruments[0], "buy", amount)

    async def on_order_refused(self, refusal: Refusal) -> None:
        log.info("greedy was told: %s %g refused by the %s", refusal.side, refusal.amount,
                 refusal.by)

    async def on_forced_close(self, instrument: str, rule: str, detail: str) -> None:
        log.info("greedy was told: %s closed by %s", instrument, rule)
