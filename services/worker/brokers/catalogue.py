"""Which broker ids exist and how well each is supported, without importing ccxt.

Forms of `brokerId`:
- `paper`: the offline, deterministic simulator;
- `<exchange>`: a real account on a ccxt exchange, `<exchange>-testnet` its sandbox;
- `paper-<exchange>`: a paper account priced by that exchange's public market data (no keys).

Support levels (README's table): `verified` (deribit, tested against its wire API), `unverified`
(another ccxt exchange listed in `exchanges.json`, which `python -m
services.worker.brokers.catalogue` rewrites from the installed ccxt); anything else is refused.
The gateway checks ids here and leaves importing ccxt, which is heavy, to the worker.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

from services.worker.brokers.base import UnknownBroker

CATALOGUE_FILE = Path(__file__).with_name("exchanges.json")
TESTNET_SUFFIX = "-testnet"
PAPER = "paper"  # the offline simulator
PAPER_PREFIX = "paper-"
# The unified ccxt calls the adapter makes (the client must have each of them).
REQUIRED_CALLS = ("fetchBalance", "createOrder", "cancelOrder", "fetchOpenOrders",
                  "fetchPositions", "fetchTicker")
VERIFIED = frozenset({"deribit"})


class Support(StrEnum):
    VERIFIED = "verified"
    UNVERIFIED = "unverified"


@dataclass(frozen=True)
class BrokerSpec:
    """A parsed broker id: which adapter, which exchange, which environment."""

    broker_id: str
    kind: Literal["paper", "exchange", "live-paper"]
    exchange: str | None = None
    testnet: bool = False

    @property
    def support(self) -> Support:
        return Support.VERIFIED if self.exchange in VERIFIED or self.exchange is None else (
            Support.UNVERIFIED)


@functools.cache
def exchanges() -> dict[str, bool]:
    """ccxt exchange id → whether it has a sandbox, for the exchanges the adapter can drive."""
    return json.loads(CATALOGUE_FILE.read_text())


def parse_broker_id(broker_id: str) -> BrokerSpec:
    """The spec of `broker_id`; UnknownBroker (naming it) when no adapter serves it."""
    if broker_id == PAPER:
        return BrokerSpec(broker_id, "paper")
    known = exchanges()
    if broker_id.startswith(PAPER_PREFIX):
        exchange = broker_id.removeprefix(PAPER_PREFIX)
        if exchange in known:
            return BrokerSpec(broker_id, "live-paper", exchange)
    elif broker_id.endswith(TESTNET_SUFFIX):
        exchange = broker_id.removesuffix(TESTNET_SUFFIX)
        if known.get(exchange):
            return BrokerSpec(broker_id, "exchange", exchange, testnet=True)
        if exchange in known:
            raise UnknownBroker(f"unknown broker {broker_id!r}: {exchange} has no testnet in ccxt")
    elif broker_id in known:
        return BrokerSpec(broker_id, "exchange", broker_id)
    raise UnknownBroker(
        f"unknown broker {broker_id!r} (available: paper, deribit, deribit-testnet, "
        f"paper-deribit, and the ccxt exchanges in the README's support table)")


def generate() -> dict[str, bool]:
    """The catalogue from the installed ccxt (imports all of it)."""
    import ccxt.async_support as ccxt

    found = {}
    for exchange_id in ccxt.exchanges:
        client = getattr(ccxt, exchange_id)()
        if all(client.has.get(call) for call in REQUIRED_CALLS):
            found[exchange_id] = bool(client.urls.get("test"))
    return dict(sorted(found.items()))


if __name__ == "__main__":
    CATALOGUE_FILE.write_text(json.dumps(generate(), indent=0) + "\n")
    print(f"wrote {CATALOGUE_FILE} ({len(exchanges.__wrapped__())} exchanges)", file=sys.stderr)
