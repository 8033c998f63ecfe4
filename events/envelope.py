"""The one envelope every message travels and is logged in."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import orjson
from pydantic import BaseModel, ConfigDict, Field

from events.base import Message, model_for, upcast
from events.trading import PositionChanged, TradeClosed


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands datetimes back naive; every time in this system is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Envelope(BaseModel):
    """Versioned wrapper: identity, causality and the message payload.

    `correlation_id` is the job the message belongs to (or the request, for commands without a
    job); `causation_id` is the `event_id` of the message that caused this one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: UUID = Field(default_factory=uuid4)
    type: str
    version: int
    occurred_at: datetime = Field(default_factory=utcnow)
    correlation_id: str | None = None
    causation_id: UUID | None = None
    user_id: str | None = None
    stream: str
    payload: dict[str, Any]

    @classmethod
    def wrap(
        cls,
        message: Message,
        *,
        stream: str,
        user_id: str | None = None,
        correlation_id: str | None = None,
        causation: Envelope | None = None,
        occurred_at: datetime | None = None,
        event_id: UUID | None = None,
    ) -> Envelope:
        """Wrap a message; a `causation` envelope lends its correlation and user when not given."""
        return cls(
            event_id=event_id or uuid4(),
            type=message.type_name(),
            version=message.version,
            occurred_at=occurred_at or utcnow(),
            correlation_id=correlation_id or (causation.correlation_id if causation else None),
            causation_id=causation.event_id if causation else None,
            user_id=user_id if user_id is not None else (causation.user_id if causation else None),
            stream=stream,
            payload=message.model_dump(mode="json"),
        )

    @property
    def kind(self) -> str:
        return model_for(self.type).kind

    def message(self) -> Message:
        """The typed message, upcast from older versions. Raises on unknown or invalid payloads."""
        return _message(self.type, self.version, self.payload)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Envelope:
        return cls.model_validate_json(data)


def _message(type_name: str, version: int, payload: dict[str, Any]) -> Message:
    model = model_for(type_name)
    if version != model.version:
        payload = upcast(type_name, version, payload)
    return model.model_validate(payload)


class LoggedEnvelope:
    """An envelope read back from the log for folding only (never re-published): its message is
    validated and upcast as `Envelope.message` does, the envelope itself not again, since the
    log holds only envelopes validated when recorded and the hash chain vouches for them."""

    __slots__ = ("_occurred_at", "payload", "type", "user_id", "version")

    def __init__(self, type: str, version: int, user_id: str | None, occurred_at: str,
                 payload: dict[str, Any]) -> None:
        self.type = type
        self.version = version
        self.user_id = user_id
        self._occurred_at = occurred_at
        self.payload = payload

    @classmethod
    def from_json(cls, data: bytes | str) -> LoggedEnvelope:
        raw = orjson.loads(data)
        return cls(raw["type"], raw["version"], raw.get("user_id"), raw["occurred_at"],
                   raw["payload"])

    @classmethod
    def of(cls, envelope: Envelope | LoggedEnvelope) -> LoggedEnvelope:
        """What a fold reads of `envelope`, as logged."""
        if isinstance(envelope, LoggedEnvelope):
            return envelope
        return cls(envelope.type, envelope.version, envelope.user_id,
                   envelope.occurred_at.isoformat(), envelope.payload)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LoggedEnvelope):
            return NotImplemented
        return (self.type, self.version, self.user_id, self.occurred_at, self.payload) == (
            other.type, other.version, other.user_id, other.occurred_at, other.payload)

    __hash__ = None  # type: ignore[assignment]

    @property
    def occurred_at(self) -> datetime:
        return datetime.fromisoformat(self._occurred_at)

    def message(self) -> Message:
        if _PLAIN.get(self.type) == self.version:
            return SimpleNamespace(**self.payload)  # type: ignore[return-value]
        return _message(self.type, self.version, self.payload)


# Messages whose fields are all strings and floats (no enum, time or nested model), so that a
# recorded payload reads back as exactly the values validation would give: folded from the log,
# they are read as plain attributes, unvalidated. These are most of a busy log's folded events
# (the property test of the light decode holds the folds equal).
_PLAIN = {model.type_name(): model.version for model in (PositionChanged, TradeClosed)}
