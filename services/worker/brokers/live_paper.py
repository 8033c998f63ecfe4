"""`paper-<exchange>` (e.g. `paper-deribit`): a paper account priced by a real exchange's public
market data, with that exchange's fees; no keys, no orders leave the process.

Market orders fill at the exchange's ask (buy) or bid (sell) as taker, a limit order at its own
price as maker once the exchange's price crosses it; the accounting is the offline paper broker's
(paper.py): amounts in the base currency, P&L linear in the quote currency, whatever the contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events.values import Fill, OrderSide, StrategyConfig
from services.worker.brokers.base import BrokerError, Credentials, EventSink
from services.worker.brokers.catalogue import BrokerSpec, parse_broker_id
from services.worker.brokers.exchange import ExchangeBroker, RetryPolicy, make_client
from services.worker.brokers.journal import Journal
from services.worker.brokers.paper import MAKER_FEE, TAKER_FEE, PaperBroker, PaperSettings


@dataclass(frozen=True)
class Quote:
    bid: float
    ask: float
    mark: float


def quote_of(ticker: Mapping[str, Any]) -> Quote:
    """Bid, ask and mark from a ccxt ticker (a missing side is the other, or the last price)."""
    last = ticker.get("markPrice") or ticker.get("last") or ticker.get("close")
    bid = ticker.get("bid") or last or ticker.get("ask")
    ask = ticker.get("ask") or last or bid
    if not (bid and ask):
        raise BrokerError(f"no price for {ticker.get('symbol')}")
    return Quote(float(bid), float(ask), float(last or (bid + ask) / 2))


class LivePaperBroker(PaperBroker):
    live_market = True

    def __init__(self, client: Any, *, spec: BrokerSpec, instruments: tuple[str, ...],
                 state_file: Path | None, settings: PaperSettings, sink: EventSink) -> None:
        super().__init__(seed="live", instruments=(), state_file=state_file, settings=settings,
                         sink=sink)
        # The exchange adapter, for its public half only: markets, tickers, retries, session.
        self.exchange = ExchangeBroker(client, spec=spec, instruments=instruments,
                                       journal=Journal("paper", None),
                                       retry=RetryPolicy(budget=5.0))
        self.instruments = instruments
        self.quotes: dict[str, Quote] = {}

    @classmethod
    def open(cls, *, worker_id: str, config: StrategyConfig, credentials: Credentials,
             state_file: Path | None, seed: str | None, sink: EventSink,
             urls: Mapping[str, str] | None = None, broker_id: str = "") -> LivePaperBroker:
        spec = parse_broker_id(broker_id)
        exchange = BrokerSpec(spec.exchange or "", "exchange", spec.exchange)
        settings = PaperSettings.model_validate(config.parameters)
        return cls(make_client(exchange, None, urls or {}), spec=exchange,
                   instruments=tuple(config.instruments), state_file=state_file,
                   settings=settings, sink=sink)

    async def connect(self) -> None:
        """The exchange's markets and a first quote of every instrument."""
        await self.exchange.load_markets()
        for instrument in self.instruments:
            await self._quote(instrument)

    def fee_rate(self, instrument: str, maker: bool) -> float:
        market = self.exchange.markets.get(instrument) or {}
        rate = market.get("maker" if maker else "taker")
        if rate is None:
            return MAKER_FEE if maker else TAKER_FEE
        return float(rate)

    def price_keys(self) -> list[tuple[str, str]]:
        return self.exchange.price_keys()

    async def _quote(self, instrument: str) -> Quote:
        fed = self.prices.latest(self.exchange.source, instrument) if self.prices else None
        if fed is not None:
            quote = Quote(fed.bid, fed.ask, fed.mark)
        else:
            quote = quote_of(await self.exchange.ticker(instrument))
        self.quotes[instrument] = quote
        self.account.marks[instrument] = quote.mark
        return quote

    def _market(self, instrument: str) -> float:
        if instrument not in self.account.marks:
            raise BrokerError(f"no price for {instrument} yet")
        return self.account.marks[instrument]

    async def market_order(self, instrument: str, side: OrderSide, amount: float,
                           reduce_only: bool = False) -> Fill:
        self._admit(amount)
        quote = await self._quote(instrument)
        if reduce_only:
            amount = self._reducing(instrument, side, amount)
        price = quote.ask if side == "buy" else quote.bid
        return self._execute(instrument, side, amount, price, self.fee_rate(instrument, False))

    async def limit_order(self, instrument: str, side: OrderSide, amount: float,
                          price: float) -> str:
        await self._quote(instrument)
        return await super().limit_order(instrument, side, amount, price)

    async def mark(self, instrument: str) -> float:
        return (await self._quote(instrument)).mark

    async def tick(self) -> None:
        """Fresh quotes; a resting order the exchange's price crossed fills at its own price."""
        for instrument in self.instruments:
            await self._quote(instrument)
        for order in list(self.account.orders.values()):
            quote = self.quotes.get(order.instrument)
            if quote is None:
                continue
            if (order.side == "buy" and quote.ask <= order.price) or (
                    order.side == "sell" and quote.bid >= order.price):
                del self.account.orders[order.order_id]
                self._execute(order.instrument, order.side, order.amount, order.price,
                              self.fee_rate(order.instrument, True), order.order_id)

    async def close(self) -> None:
        await self.exchange.close()
        await super().close()
