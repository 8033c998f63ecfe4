"""What a pure decision asks its shell to do besides saving state and emitting: durable timers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class SetTimer:
    """Fire `kind` with `data` at `due_at` (replacing the timer of the same key)."""

    key: str
    kind: str
    due_at: datetime
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CancelTimer:
    key: str


Timer = SetTimer | CancelTimer
