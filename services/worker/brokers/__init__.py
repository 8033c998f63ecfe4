"""Broker adapters by id. A worker's `BROKER_ID` picks one; `paper` is the simulated exchange."""

from __future__ import annotations

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
from services.worker.brokers.paper import PaperBroker

BROKERS: dict[str, type[Broker]] = {"paper": PaperBroker}


def open_broker(
    broker_id: str,
    *,
    worker_id: str,
    config: StrategyConfig,
    credentials: Credentials | None = None,
    state_file: Path | None = None,
    seed: str | None = None,
    sink: EventSink = discard,
) -> Broker:
    """Open the account `broker_id` names; an id without an adapter raises UnknownBroker."""
    try:
        adapter = BROKERS[broker_id]
    except KeyError:
        known = ", ".join(sorted(BROKERS))
        raise UnknownBroker(f"unknown broker {broker_id!r} (available: {known})") from None
    return adapter.open(
        worker_id=worker_id,
        config=config,
        credentials=credentials or Credentials(),
        state_file=state_file,
        seed=seed,
        sink=sink,
    )


__all__ = [
    "BROKERS",
    "Broker",
    "BrokerError",
    "ClosedTrade",
    "Credentials",
    "EventSink",
    "OpenOrder",
    "PaperBroker",
    "UnknownBroker",
    "open_broker",
]
