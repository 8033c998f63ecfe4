"""Broker adapters by id. A worker's `BROKER_ID` picks one: `paper` is the simulated exchange;
an exchange id (`deribit`, `deribit-testnet`, `paper-deribit`, ... see catalogue.py) a ccxt
account, imported only then (ccxt is heavy)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from events.values import StrategyConfig
from services.worker.brokers.base import (
    Broker,
    BrokerError,
    ClosedTrade,
    Credentials,
    EventSink,
    OpenOrder,
    UnknownBroker,
    discard,
)
from services.worker.brokers.catalogue import BrokerSpec, parse_broker_id
from services.worker.brokers.paper import PaperBroker

BROKERS: dict[str, type[Broker]] = {"paper": PaperBroker}


def broker_spec(broker_id: str) -> BrokerSpec:
    """What `broker_id` names; UnknownBroker (naming it) when no adapter serves it. What the
    gateway checks a start against, without importing any adapter."""
    if broker_id in BROKERS:
        return BrokerSpec(broker_id, "paper")
    return parse_broker_id(broker_id)


def open_broker(
    broker_id: str,
    *,
    worker_id: str,
    config: StrategyConfig,
    credentials: Credentials | None = None,
    state_file: Path | None = None,
    seed: str | None = None,
    sink: EventSink = discard,
    urls: Mapping[str, str] | None = None,
) -> Broker:
    """Open the account `broker_id` names; an id without an adapter raises UnknownBroker.
    `urls` (RUNNER_BROKER_URLS) moves an exchange's API to another base URL."""
    common = dict(worker_id=worker_id, config=config, credentials=credentials or Credentials(),
                  state_file=state_file, seed=seed, sink=sink)
    if broker_id in BROKERS:
        return BROKERS[broker_id].open(**common)
    spec = parse_broker_id(broker_id)
    if spec.kind == "live-paper":
        from services.worker.brokers.live_paper import LivePaperBroker

        return LivePaperBroker.open(**common, urls=urls, broker_id=broker_id)
    from services.worker.brokers.exchange import ExchangeBroker

    return ExchangeBroker.open(**common, urls=urls, broker_id=broker_id)


__all__ = [
    "BROKERS",
    "Broker",
    "BrokerError",
    "BrokerSpec",
    "ClosedTrade",
    "Credentials",
    "EventSink",
    "OpenOrder",
    "PaperBroker",
    "UnknownBroker",
    "broker_spec",
    "open_broker",
]
