"""Request/reply calls between services: each request is a model, each refusal a typed error.

Queries travel on a service's RPC queue (`services.topology`), never through the event log; the
AMQP `type` property names the model, and the server validates the body against it before its
handler runs. A handler refuses with `Invalid`, `NotFound` or `Conflict`; the caller gets the
same exception type back, with the server's message.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from events.envelope import Envelope

QUERIES: dict[str, type[Query]] = {}


class Query(BaseModel):
    """Base of every request/reply call."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            QUERIES[cls.__name__] = cls

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__


class DecideStart(Query):
    """Entitlement: decide a StartRunner now; the reply is the decision's envelope (JobAccepted
    or JobRejected), sent once it has committed."""

    envelope: Envelope


class CheckEntitlement(Query):
    """Entitlement: a user's tier, limit and usage (`{isEntitled, tier, maxWorkers, …}`)."""

    user_id: str = Field(min_length=1, max_length=200)


class SlotQuery(Query):
    """Entitlement: whether a job still holds a slot; with a `wait`, answered once it is freed
    or when the wait is over (read-your-writes for a stop, so a start right after it counts)."""

    job_id: str = Field(min_length=1, max_length=200)
    wait: float = Field(default=0.0, ge=0, le=5)


class StatusQuery(Query):
    """Monitor: the status document of a user's workers (all workers when `user_id` is None),
    or one page of it; answers once the `known` workers show, or after `wait` seconds."""

    user_id: str | None = None
    offset: int = Field(default=0, ge=0)
    limit: int | None = Field(default=None, ge=1)
    known: tuple[str, ...] = ()
    wait: float = Field(default=0.0, ge=0, le=5)


class WorkerQuery(Query):
    """Monitor: one worker's status entry, once the log shows it (`known`) or shows it ended,
    or after `wait` seconds."""

    worker_id: str = Field(min_length=1, max_length=200)
    until: Literal["known", "ended"] = "known"
    wait: float = Field(default=0.0, ge=0, le=5)


class LogQuery(Query):
    """Monitor: a page of the event log after position `after`; with a `wait`, answered once
    the log has something after it, or when the wait is over (a long poll)."""

    after: int = Field(default=0, ge=0)
    limit: int = Field(default=1000, ge=1, le=1000)
    wait: float = Field(default=0.0, ge=0, le=5)


class HeadQuery(Query):
    """Monitor: the position of the log's last recorded envelope (`{position}`)."""


class HostsQuery(Query):
    """Monitor: the worker-hosts it knows, with their liveness."""


class QueryRefused(Exception):
    """The service refused the call; `code` says how, the message says why (no internals)."""

    code: ClassVar[str] = "refused"


class Invalid(QueryRefused, ValueError):
    code = "invalid"


class NotFound(QueryRefused, LookupError):
    code = "not_found"


class Conflict(QueryRefused):
    code = "conflict"


REFUSALS: dict[str, type[QueryRefused]] = {
    kind.code: kind for kind in (QueryRefused, Invalid, NotFound, Conflict)
}
