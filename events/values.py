"""Value objects carried inside messages (no identity of their own)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

# A job's, worker's or host's id: one safe path component (a worker's directory, a host's store
# are named by them), no leading dot or dash, no slash.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]

Tier = Literal["free", "basic", "pro", "enterprise"]
Side = Literal["long", "short"]
OrderSide = Literal["buy", "sell"]


class JobStatus(StrEnum):
    """The seed's job/worker status values."""

    QUEUED = "queued"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"
    CRASHED = "crashed"


class RejectReason(StrEnum):
    WORKER_LIMIT = "worker_limit"
    ENTITLEMENT_EXPIRED = "entitlement_expired"
    CIRCUIT_OPEN = "circuit_open"
    INVALID_REQUEST = "invalid_request"


class CrashReason(StrEnum):
    EXITED = "exited"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    HOST_LOST = "host_lost"
    SPAWN_FAILED = "spawn_failed"


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _CamelValue(BaseModel):
    """Value whose outside (HTTP, worker CONFIG) spelling is the seed's camelCase."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )


class RiskManagement(_CamelValue):
    max_position_size: float = Field(default=100.0, gt=0, le=1e9)
    stop_loss_percent: float = Field(default=2.0, gt=0, le=100)
    take_profit_percent: float = Field(default=3.0, gt=0, le=1000)
    max_orders_per_minute: int = Field(default=60, ge=1, le=6000)


class StrategyConfig(_CamelValue):
    """The seed's `config`: which strategy, its parameters, its risk limits, its instruments."""

    name: str = Field(min_length=1, max_length=100)
    type: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_\-]*$")
    parameters: dict[str, Any] = Field(default_factory=dict)
    risk_management: RiskManagement = Field(default_factory=RiskManagement)
    instruments: tuple[str, ...] = Field(default=("BTC-PERPETUAL",), min_length=1, max_length=20)
    # the container image it runs in (container workers; None: the host's default worker image);
    # the gateway refuses one not on RUNNER_CONTAINER_IMAGES
    image: str | None = Field(default=None, min_length=1, max_length=255,
                              pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")


class Fill(_Value):
    order_id: str
    instrument: str
    side: OrderSide
    amount: float
    price: float
    fee: float = 0.0


class Position(_Value):
    instrument: str
    side: Side
    amount: float
    entry_price: float


class PositionMark(_Value):
    """A position with its current mark, as a heartbeat reports it."""

    instrument: str
    side: Side
    amount: float
    entry_price: float
    mark_price: float
    unrealized_pnl: float
