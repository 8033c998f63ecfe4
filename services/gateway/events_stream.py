"""`GET /events`: the caller's events as Server-Sent Events.

- Frames: `id:` the log position, `event:` the type, `data:` the envelope as JSON (sealed
  credentials withheld); a comment line every `RUNNER_SSE_KEEPALIVE` seconds while idle.
- Scope: a user's token streams that user's events, the admin's everyone's (or one user's with
  `?userId=`); `?type=` (repeatable, or comma-separated), `?workerId=` and `?jobId=` narrow it.
- Start: after `Last-Event-ID`, else after `?after=`, else at the present; history then live,
  every position once, in order (`log_tail`).
- End: with `?follow=false`, `event: end` at the position the log had when it began; a client
  that reads too slowly is cut with `event: dropped` naming the last id it got (it resumes there).
"""

# no `from __future__ import annotations`: the route's parameters are annotated with the
# caller dependency passed in, which FastAPI could not resolve from a string
from typing import Annotated, Any

import anyio
import orjson
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from events import REGISTRY
from events.queries import HeadQuery, LogQuery
from services.bus import Bus, RpcError
from services.gateway.log_tail import Dropped, EventFilter, LogEntry, LogTail
from services.gateway.models import failed
from services.settings import Settings
from services.topology import MONITOR_RPC

MAX_POSITION = 2**63 - 1  # a log position is a 64-bit integer in every store
RETRY_MS = 2000  # how soon an EventSource reconnects after a cut
KEEP_ALIVE = b": keep-alive\n\n"
# The scope extension holding the HTTP server's own `send` (`with_server_send`).
SERVER_SEND = "runner.server_send"


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


def _frames(batch: list[LogEntry]) -> bytes:
    return b"".join([entry.frame for entry in batch])


def with_server_send(app: ASGIApp) -> ASGIApp:
    """`app` as the HTTP server runs it: an event stream's scope carries the server's own
    `send`, so a stream's frames (after its start, which the middlewares see) go to the socket
    without passing every middleware's wrapper; none of them looks at a body's frames."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/events":
            scope["extensions"] = {**(scope.get("extensions") or {}), SERVER_SEND: {"send": send}}
        await app(scope, receive, send)

    return serve


class EventStreamResponse(Response):
    """The `text/event-stream` of a tail's entries for one caller: a `retry:` line, history
    then live, a keep-alive for each quiet spell, and a last frame saying why it ended
    (`dropped`, `error`, `end`). Each batch is written straight to `send` as the subscriber
    hands it over; a client's disconnect ends it."""

    media_type = "text/event-stream"

    def __init__(self, tail: LogTail, wanted: EventFilter, after: int | None, *,
                 follow: bool) -> None:
        self.tail, self.wanted, self.after, self.follow = tail, wanted, after, follow
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server_send = (scope.get("extensions") or {}).get(SERVER_SEND, {}).get("send", send)
        try:
            # the stream runs in a task of its own, whose every wake-up resumes a few frames
            # only (not the request's, one for each middleware)
            async with anyio.create_task_group() as group:
                group.start_soon(self._stream_to_end, send, server_send, group.cancel_scope)
                await self._until_disconnected(receive, group.cancel_scope)
        except BaseExceptionGroup as failed_in:  # one task's error, as it would come alone
            if len(failed_in.exceptions) == 1:
                raise failed_in.exceptions[0] from None
            raise

    @staticmethod
    async def _until_disconnected(receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _stream_to_end(self, start: Send, send: Send, scope: anyio.CancelScope) -> None:
        await self._stream(start, send)
        scope.cancel()

    async def _stream(self, start: Send, send: Send) -> None:
        """`start`: the send the middlewares see (the answer's start goes through them);
        `send`: the one for the body."""
        await start({"type": "http.response.start", "status": self.status_code,
                     "headers": self.raw_headers})
        last = self.after
        await send({"type": "http.response.body", "more_body": True,
                    "body": b"retry: %d\n: events%s\n\n" % (
                        RETRY_MS, b"" if last is None else b" after %d" % last)})
        stream = self.tail.open(self.wanted, self.after, follow=self.follow)
        try:
            async for batch in stream.history():
                if batch:
                    last = batch[-1].position
                    await send({"type": "http.response.body", "body": _frames(batch),
                                "more_body": True})
                elif self.follow:
                    await send({"type": "http.response.body", "body": KEEP_ALIVE,
                                "more_body": True})
            if stream.subscriber is not None:
                take = stream.subscriber.take
                while True:
                    batch = await take()
                    if batch:
                        last = batch[-1].position
                        await send({"type": "http.response.body", "body": _frames(batch),
                                    "more_body": True})
                    else:
                        await send({"type": "http.response.body", "body": KEEP_ALIVE,
                                    "more_body": True})
        except Dropped as exc:
            ending = b"event: dropped\ndata: %s\n\n" % orjson.dumps(
                {"error": f"{exc}: resume after the last id received", "lastEventId": last})
        except RpcError as exc:
            ending = b"event: error\ndata: %s\n\n" % orjson.dumps(
                {"error": f"event log unavailable: {exc}", "lastEventId": last})
        else:
            ending = b"event: end\ndata: %s\n\n" % orjson.dumps({"lastEventId": last})
        finally:
            stream.close()
        await send({"type": "http.response.body", "body": ending, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def add_routes(app: FastAPI, tail: LogTail, settings: Settings, who: Any) -> None:
    """Mount `GET /events` (`who`: the dependency naming the caller)."""

    @app.exception_handler(StreamRefused)
    async def _refused(_: Request, exc: StreamRefused) -> JSONResponse:
        return JSONResponse(failed(str(exc)), status_code=exc.status)

    @app.get(
        "/events",
        response_class=EventStreamResponse,
        status_code=200,
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
    ) -> EventStreamResponse:
        """The caller's events as Server-Sent Events, history then live (see the module)."""
        wanted = event_filter(userId, caller.admin, caller.user_id, types, workerId, jobId)
        start = start_position(last_event_id, after)
        return EventStreamResponse(tail, wanted, start, follow=follow)
