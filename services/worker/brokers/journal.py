"""A worker's order journal on a real exchange: the client order ids it has used, the orders
sent whose outcome is not yet known, and the positions it last saw. Kept in the worker's state
file (`RUNNER_WORKER_STATE`) and written (fsync'd) before an order leaves, so a restarted worker
continues the sequence and settles what its predecessor had in flight instead of sending it again.

Labels are `<worker>.<lineage>.<sequence>` (at most 64 characters, Deribit's limit): the
sequence counts on across restarts on one host; the lineage, drawn when the journal is created,
keeps a worker restarted on another host (no journal there) from reusing a label its earlier run
already gave an order.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from events.values import OrderSide
from services.worker.brokers.base import BrokerError

LABEL_MAX = 64
LINEAGE_CHARS = 6


class Intent(BaseModel):
    """An order as sent, under its label."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str
    instrument: str
    side: OrderSide
    amount: float
    order_type: Literal["market", "limit"] = "market"
    price: float | None = None
    reduce_only: bool = False


class JournalState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    lineage: str = Field(default_factory=lambda: secrets.token_hex(LINEAGE_CHARS // 2))
    sequence: int = 0
    pending: dict[str, Intent] = Field(default_factory=dict)
    seen: dict[str, float] = Field(default_factory=dict)  # instrument → signed amount


def label_prefix(worker_id: str) -> str:
    """The part of every label that names the worker (hashed when the id is long)."""
    if len(worker_id) <= LABEL_MAX - 2 * LINEAGE_CHARS:
        return worker_id
    return "w" + hashlib.sha256(worker_id.encode()).hexdigest()[:20]


class Journal:
    """The journal of one worker; `path` None keeps it in memory only (tests, no host)."""

    def __init__(self, worker_id: str, path: Path | None) -> None:
        self.prefix = label_prefix(worker_id)
        self.path = path
        self.state = self._load()

    def next_label(self) -> str:
        self.state.sequence += 1
        return f"{self.prefix}.{self.state.lineage}.{self.state.sequence}"

    def is_ours(self, label: str | None) -> bool:
        return bool(label) and label.startswith(f"{self.prefix}.")  # type: ignore[union-attr]

    def sending(self, intent: Intent) -> None:
        """Recorded (durably) before the order leaves."""
        self.state.pending[intent.label] = intent
        self.save()

    def settled(self, label: str) -> None:
        if self.state.pending.pop(label, None) is not None:
            self.save()

    def saw(self, instrument: str, signed_amount: float) -> None:
        """The exchange showed this position (kept for the next start's comparison)."""
        if self.state.seen.get(instrument, 0.0) != signed_amount:
            if signed_amount:
                self.state.seen[instrument] = signed_amount
            else:
                self.state.seen.pop(instrument, None)
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(temp, "wb") as out:
            out.write(self.state.model_dump_json().encode())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, self.path)

    def _load(self) -> JournalState:
        if self.path is None or not self.path.exists():
            return JournalState()
        try:
            return JournalState.model_validate_json(self.path.read_bytes())
        except (OSError, ValidationError) as exc:
            # Trading on without knowing which labels were used could place an order twice.
            raise BrokerError(f"order journal {self.path} is unreadable: {exc}") from None
