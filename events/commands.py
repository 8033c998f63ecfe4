"""Commands: requests that one service handles and may refuse."""

from __future__ import annotations

from pydantic import Field

from events.base import Command
from events.values import Id, StrategyConfig, Tier


class StartRunner(Command):
    """Start `config` for the envelope's user; ids are chosen by the caller so retries dedupe."""

    job_id: Id
    worker_id: Id
    strategy_id: str
    broker_id: str
    credentials_sealed: str
    config: StrategyConfig
    flatten_on_stop: bool = True


class StopRunner(Command):
    """Stop a worker (terminate, optionally flattening first)."""

    worker_id: Id
    flatten: bool = False
    reason: str = "stopped by user"


class UpgradeEntitlement(Command):
    """Put a user on `tier` for `days` from now (fractional days allowed)."""

    tier: Tier
    days: float = Field(gt=0, le=3660)
