"""Message base classes, the type registry and the upcaster chain.

Every message is a frozen pydantic model that registers itself by class name. A message's
`version` is bumped when its schema changes; an upcaster registered for the old version turns an
old logged payload into the new shape, so the log never has to be rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]


class UnknownMessageType(LookupError):
    """The message type is not in this build's catalogue."""


class Message(BaseModel):
    """Base of every command, event and telemetry message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ClassVar[str] = "message"
    category: ClassVar[str] = "misc"
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_") and cls.__module__ != __name__:
            existing = REGISTRY.get(cls.__name__)
            where = (cls.__module__, cls.__qualname__)
            if existing is not None and (existing.__module__, existing.__qualname__) != where:
                raise TypeError(
                    f"message type {cls.__name__} is defined twice "
                    f"({existing.__module__} and {cls.__module__})"
                )
            REGISTRY[cls.__name__] = cls

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__


class Command(Message):
    """A request (imperative): exactly one handler, may be rejected."""

    kind: ClassVar[str] = "command"
    category: ClassVar[str] = "command"


class Event(Message):
    """An immutable fact (past tense), appended to the log; any number of handlers."""

    kind: ClassVar[str] = "event"


class Telemetry(Message):
    """Transient observation (heartbeats): never logged, only its absence is an event."""

    kind: ClassVar[str] = "telemetry"
    category: ClassVar[str] = "telemetry"


REGISTRY: dict[str, type[Message]] = {}
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcaster(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register `fn(payload) -> payload` lifting `type_name` from `from_version` to the next."""

    def register(fn: Upcaster) -> Upcaster:
        UPCASTERS[(type_name, from_version)] = fn
        return fn

    return register


def model_for(type_name: str) -> type[Message]:
    try:
        return REGISTRY[type_name]
    except KeyError:
        raise UnknownMessageType(f"unknown message type {type_name!r}") from None


def upcast(type_name: str, version: int, payload: Payload) -> Payload:
    """Lift an old payload to the current version of its model, one registered step at a time."""
    current = model_for(type_name).version
    if version > current:
        raise UnknownMessageType(f"{type_name} v{version} is newer than this build (v{current})")
    while version < current:
        step = UPCASTERS.get((type_name, version))
        if step is None:
            raise UnknownMessageType(f"no upcaster for {type_name} v{version} -> v{version + 1}")
        payload = step(dict(payload))
        version += 1
    return payload
