"""The market prices a worker gets from its host's feed (services/worker_host/feed_relay.py):
the latest bid, ask and mark of each instrument it subscribed to, as `Price` lines on its control
channel. A quote older than `max_age` seconds is not given (the feed is gone, or the market is
quiet): the broker then asks the exchange itself."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services.worker import protocol

MAX_AGE = 10.0  # seconds a relayed price is used before the exchange is asked instead


@dataclass(frozen=True)
class Quote:
    bid: float
    ask: float
    mark: float
    at: float  # the feed's time.time() when the price came


class FeedPrices:
    def __init__(self, max_age: float = MAX_AGE,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_age, self.clock = max_age, clock
        self.quotes: dict[tuple[str, str], Quote] = {}

    def update(self, price: protocol.Price) -> None:
        self.quotes[(price.source, price.instrument)] = Quote(price.bid, price.ask, price.mark,
                                                              price.at)

    def latest(self, source: str, instrument: str) -> Quote | None:
        quote = self.quotes.get((source, instrument))
        if quote is None or self.clock() - quote.at > self.max_age:
            return None
        return quote
