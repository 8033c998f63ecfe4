"""The strategy interface and how a strategy is found by name."""

from __future__ import annotations

import functools
import os
from importlib import import_module
from importlib.metadata import entry_points
from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from events.values import OrderSide, Position, StrategyConfig
from services.worker.brokers.base import AMOUNT_EPSILON, Broker, Refusal, direction

ENTRY_POINT_GROUP = "runner.strategies"

# Used when the package's entry points are not installed (e.g. running from a source tree).
BUILTIN_STRATEGIES = {
    "hold": "services.worker.strategies.hold:Hold",
    "scalping": "services.worker.strategies.scalping:Scalping",
    "chaos": "services.worker.strategies.chaos:Chaos",
}


# Fault drills: for exercising the system, never for users. Offered and run only where
# RUNNER_ENABLE_CHAOS=1 (a worker-host passes its own setting on to its workers).
FAULT_DRILLS = frozenset({"chaos"})
ENV_ENABLE_CHAOS = "RUNNER_ENABLE_CHAOS"


def drills_enabled() -> bool:
    return os.environ.get(ENV_ENABLE_CHAOS, "").strip().lower() in ("1", "true", "yes")


class UnknownStrategy(LookupError):
    """No strategy is registered under this name."""


class StrategyParameters(BaseModel):
    """Base of each strategy's `parameters` model: the seed's camelCase keys; keys meant for
    someone else (the paper broker's `paper*`) are ignored."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", alias_generator=to_camel, populate_by_name=True
    )


class Strategy:
    """One strategy trading one account: the runtime calls `start()` once, then `on_tick()`
    every `tick_interval` seconds after moving the market data; a stop cancels it at any
    `await`, and an exception ends the worker with exit code 1, except `OrderRefused` (already
    reported, `on_order_refused` told), after which it goes on. The runtime enforces
    `riskManagement` itself (services/worker/risk.py; `on_forced_close` tells of its closes)."""

    tick_interval: float = 1.0
    # the model of `config.parameters` (its JSON schema is what `GET /strategies` shows)
    parameters_model: type[StrategyParameters] = StrategyParameters

    @property
    def acts_on_ticks(self) -> bool:
        """Whether this strategy has an `on_tick` of its own (else ticks need not wake it)."""
        return type(self).on_tick is not Strategy.on_tick

    def __init__(self, config: StrategyConfig, broker: Broker) -> None:
        self.config = config
        self.broker = broker

    async def start(self) -> None:
        """Called once before the first tick (also after a restart, with positions restored)."""

    async def on_tick(self) -> None:
        """Called every `tick_interval` seconds after the market data moved."""

    async def on_order_refused(self, refusal: Refusal) -> None:
        """An order of this strategy was refused for good (`refusal.by`: "exchange" or
        "risk"); the call that placed it raises OrderRefused next."""

    async def on_forced_close(self, instrument: str, rule: str, detail: str) -> None:
        """The runtime closed this strategy's position on `instrument` at market (`rule`:
        "stop_loss" or "take_profit")."""


def order_towards(held: Position | None, target: float) -> tuple[OrderSide, float] | None:
    """The market order taking the position on one instrument from `held` to the signed
    `target` (positive long, negative short), or None when it is already there."""
    current = direction(held.side) * held.amount if held else 0.0
    change = target - current
    if abs(change) <= AMOUNT_EPSILON:
        return None
    return ("buy" if change > 0 else "sell"), abs(change)


def signed_target(side: Literal["long", "short"], amount: float) -> float:
    return direction(side) * amount


def load_strategy(name: str) -> type[Strategy]:
    """The strategy class registered as `name` (entry point first, then the built-ins); a fault
    drill only where they are enabled."""
    if name in FAULT_DRILLS and not drills_enabled():
        raise UnknownStrategy(f"strategy {name!r} is a fault drill, not offered here "
                              f"({ENV_ENABLE_CHAOS}=1 enables it)")
    return find_strategy(name)


@functools.cache
def find_strategy(name: str) -> type[Strategy]:
    """`load_strategy` without the drills' gate; cached, so a fork-server that loaded a class
    once spares every forked worker the entry-point scan."""
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if found:
        cls = next(iter(found)).load()
    elif name in BUILTIN_STRATEGIES:
        module, attribute = BUILTIN_STRATEGIES[name].split(":")
        cls = getattr(import_module(module), attribute)
    else:
        known = ", ".join(sorted(available_strategies()))
        raise UnknownStrategy(f"unknown strategy {name!r} (available: {known})")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise UnknownStrategy(f"strategy {name!r} does not name a Strategy subclass")
    return cls


def available_strategies(drills: bool | None = None) -> set[str]:
    """Every strategy name a worker can run (what the gateway validates `config.type` against);
    the fault drills only when `drills` (default: RUNNER_ENABLE_CHAOS)."""
    names = set(BUILTIN_STRATEGIES) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return names if (drills_enabled() if drills is None else drills) else names - FAULT_DRILLS
