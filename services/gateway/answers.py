"""The HTTP API's answers as models, for the OpenAPI document (`/docs`): the routes build their
JSON themselves (the status passes through from the monitor untouched), and these say its shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Answer(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    success: Literal[True] = True


class Failure(BaseModel):
    """Every error: `success` false and what went wrong (never the input, which may hold
    credentials)."""

    success: Literal[False] = False
    error: str


class Rejected(Failure):
    """A start the entitlement service refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    reason: str = Field(description="worker_limit, entitlement_expired, circuit_open, "
                                    "invalid_request")
    job_id: str
    retry_at: str | None = Field(None, description="when a circuit open now closes (ISO)")


class Started(Answer):
    job_id: str
    worker_id: str
    message: str


class Stopped(Answer):
    message: str
    flattened_positions: int


class Halted(Answer):
    """The kill switch's outcome: the runners stopped (with flatten), and any that were not."""

    message: str
    halted: list[str]
    failed: dict[str, str]
    flattened_positions: int


class Worker(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    worker_id: str
    job_id: str
    user_id: str
    strategy_id: str
    broker_id: str
    status: Literal["queued", "running", "stopped", "failed", "crashed"]
    pid: int | None
    host_id: str | None
    started_at: int | None = Field(description="epoch milliseconds")
    restart_count: int
    last_heartbeat: int | None = Field(description="epoch milliseconds")
    reason: str | None


class PositionEntry(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    instrument_name: str
    side: Literal["long", "short"]
    amount: float
    entry_price: float
    unrealized_pnl: float = Field(alias="unrealizedPnL")


class Stats(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    total_trades: int
    winning_trades: int
    losing_trades: int
    total_pnl: float = Field(alias="totalPnL")
    win_rate: float


class WorkerEntry(BaseModel):
    worker: Worker
    positions: list[PositionEntry]
    stats: Stats


class QueueStats(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    queued_jobs: int
    running_workers: int
    total_workers: int
    failed_jobs: int


class StatusPage(BaseModel):
    offset: int
    limit: int
    total: int


class Status(Answer):
    workers: list[WorkerEntry]
    queue_stats: QueueStats
    page: StatusPage | None = Field(None, description="with `limit` only")


class Upgraded(Answer):
    user_id: str
    tier: str
    max_workers: int
    expires_at: str


class Entitlement(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    is_entitled: bool
    tier: str
    max_workers: int
    current_workers: int
    expires_at: str | None


class UserCreated(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    user_id: str
    token: str = Field(description="the user's bearer token, shown once")
    expires_at: str | None = Field(None, description="when the token stops working (ISO); "
                                                     "never if null")


class TokenRotated(Answer):
    """A user's new token; the old one is refused from now on."""

    user_id: str
    token: str = Field(description="the user's new bearer token, shown once")
    expires_at: str | None = Field(None, description="when it stops working (ISO); never if "
                                                     "null")


class TokenRevoked(Answer):
    user_id: str
    message: str


class AdminTokenRotated(Answer):
    """The new admin token; the old one is refused from now on."""

    token: str = Field(description="the new admin token, shown once")
    path: str = Field(description="the file holding it, on the gateway's machine")


class Users(Answer):
    users: list[str]


class Host(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    host_id: str
    hostname: str | None
    capacity: int | None
    online_at: int | None
    last_seen: int | None
    lost: bool
    isolated: bool = Field(False, description="its workers run under uids of their own")
    isolation: str = Field("", description="how its workers are isolated (docs/SECURITY.md)")


class Hosts(Answer):
    hosts: list[Host]


class Me(Answer):
    user_id: str | None = Field(description="None for the admin")
    admin: bool


class Health(Answer):
    connected: bool


def failures(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI `responses` for error statuses, all `{success: false, error}`; with those any
    call may get: a token over its rate (429), an unexpected error (500). A 429 or a 503 (the
    broker unreachable, or a service not answering) says when to try again."""
    return {status: {"model": Failure} | (RETRY if status in (429, 503) else {})
            for status in (*statuses, 429, 500)}


def body_failures(*statuses: int) -> dict[int | str, dict[str, object]]:
    """`failures` of a call with a request body: also 413 (too large) and 422 (not JSON within
    the limits, or not the model)."""
    return failures(*statuses, 413, 422)


RETRY = {"headers": {"Retry-After": {
    "description": "seconds to wait before trying again", "schema": {"type": "integer"}}}}
