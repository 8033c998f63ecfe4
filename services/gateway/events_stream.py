"""`GET /events`: the caller's events as Server-Sent Events.

Each event's `id:` is its position in the log, `event:` its type and `data:` its envelope as
JSON (sealed credentials withheld). A user's token streams that user's events only; the admin's
everyone's, or one user's with `?userId=`. `?type=` (repeatable, or comma-separated),
`?workerId=` and `?jobId=` narrow it. A stream starts after `Last-Event-ID` (a reconnecting
client's), else after `?after=`, else at the present; history then live, every position once, in
order (`log_tail`). `?follow=false` ends the stream at the position the log had when it began
(`event: end`). Idle streams carry a comment line every `RUNNER_SSE_KEEPALIVE` seconds; a client
that reads too slowly is cut with `event: dropped` naming the last id it got, from which it
resumes.
"""

# no `from __future__ import annotations`: the route's parameters are annotated with the
# caller dependency passed in, which FastAPI could not resolve from a string
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from events import REGISTRY
from events.queries import HeadQuery, LogQuery
from services.bus import Bus, RpcError
from services.gateway.log_tail import Dropped, EventFilter, LogTail
from services.gateway.models import failed
from services.settings import Settings
from services.topology import MONITOR_RPC

MAX_POSITION = 2**63 - 1  # a log position is a 64-bit integer in every store
RETRY_MS = 2000  # how soon an EventSource reconnects after a cut


def log_tail(bus: Bus, settings: Settings) -> LogTail:
    """A tail of the monitor's log over its RPC (a long poll of `log`, and `head`)."""

    # a broker outage pauses the tail (its streams stay open) until the bus is back
    async def fetch(after: int, limit: int, wait: float) -> list[dict[str, Any]]:
        await bus.until_connected()
        return await bus.request(MONITOR_RPC, LogQuery(after=after, limit=limit, wait=wait),
                                 timeout=wait + settings.request_timeout)

    async def head() -> int:
        await bus.until_connected()
        return int((await bus.request(MONITOR_RPC, HeadQuery()))["position"])

    return LogTail(fetch, head, keep=settings.sse_recent, max_pending=settings.sse_buffer,
                   idle=settings.sse_keepalive)


class StreamRefused(ValueError):
    """A request for a stream that cannot be served (bad id, unknown type, another's events)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status


def event_filter(user_id: str | None, admin: bool, caller_id: str | None, types: list[str],
                 worker_id: str | None, job_id: str | None) -> EventFilter:
    """What a caller may and wants to see; raises `StreamRefused`."""
    if not admin and user_id is not None and user_id != caller_id:
        raise StreamRefused(403, "userId does not match your token")
    names = {name.strip() for item in types for name in item.split(",") if name.strip()}
    unknown = sorted(names - REGISTRY.keys())
    if unknown:
        raise StreamRefused(422, f"type: unknown message type {unknown[0]!r}")
    return EventFilter(user_id=user_id if admin else caller_id, types=frozenset(names),
                       worker_id=worker_id, job_id=job_id)


def start_position(last_event_id: str | None, after: int | None) -> int | None:
    """Where a stream starts: after `Last-Event-ID` (a reconnect), else `after`, else now."""
    if last_event_id is not None and last_event_id.strip():
        try:
            position = int(last_event_id)
        except ValueError:
            raise StreamRefused(422, "Last-Event-ID: not a log position") from None
        if not 0 <= position <= MAX_POSITION:
            raise StreamRefused(422, "Last-Event-ID: not a log position")
        return position
    return after


async def sse_body(tail: LogTail, wanted: EventFilter, after: int | None, *,
                   follow: bool) -> AsyncIterator[bytes]:
    last = after
    yield b"retry: %d\n: events%s\n\n" % (
        RETRY_MS, b"" if after is None else b" after %d" % after)
    try:
        async for batch in tail.stream(wanted, after, follow=follow):
            if batch:
                last = batch[-1].position
                yield b"".join(entry.frame for entry in batch)
            elif follow:
                yield b": keep-alive\n\n"
    except Dropped as exc:
        yield b"event: dropped\ndata: %s\n\n" % orjson.dumps(
            {"error": f"{exc}: resume after the last id received", "lastEventId": last})
        return
    except RpcError as exc:
        yield b"event: error\ndata: %s\n\n" % orjson.dumps(
            {"error": f"event log unavailable: {exc}", "lastEventId": last})
        return
    yield b"event: end\ndata: %s\n\n" % orjson.dumps({"lastEventId": last})


def add_routes(app: FastAPI, tail: LogTail, settings: Settings, who: Any) -> None:
    """Mount `GET /events` (`who`: the dependency naming the caller)."""

    @app.exception_handler(StreamRefused)
    async def _refused(_: Request, exc: StreamRefused) -> JSONResponse:
        return JSONResponse(failed(str(exc)), status_code=exc.status)

    @app.get(
        "/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                         "description": "the event stream (`id:` log position, `event:` type, "
                                        "`data:` envelope JSON)"}},
    )
    async def events(
        caller: who,
        userId: Annotated[str | None, Query(description="admin: one user's events")] = None,
        types: Annotated[list[str], Query(alias="type",
                                          description="message types (repeatable)")] = [],  # noqa: B006
        workerId: str | None = None,
        jobId: str | None = None,
        after: Annotated[int | None, Query(ge=0, le=MAX_POSITION,
                                           description="start after this position")] = None,
        follow: Annotated[bool, Query(description="false: end at the present")] = True,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> StreamingResponse:
        """The caller's events as Server-Sent Events, history then live (see the module)."""
        wanted = event_filter(userId, caller.admin, caller.user_id, types, workerId, jobId)
        start = start_position(last_event_id, after)
        return StreamingResponse(
            sse_body(tail, wanted, start, follow=follow),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
