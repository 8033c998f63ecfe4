"""Trading strategies a worker can run, found by name through the `runner.strategies` entry
points (so users can add their own) with the built-ins as a fallback."""

from services.worker.strategies.base import (
    BUILTIN_STRATEGIES,
    ENTRY_POINT_GROUP,
    Strategy,
    UnknownStrategy,
    available_strategies,
    load_strategy,
)

__all__ = [
    "BUILTIN_STRATEGIES",
    "ENTRY_POINT_GROUP",
    "Strategy",
    "UnknownStrategy",
    "available_strategies",
    "load_strategy",
]
