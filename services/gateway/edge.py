"""The gateway's HTTP edge: bodies bounded before they are read, JSON bounded before FastAPI
parses it, and every unexpected error a JSON answer without a trace.

A pure ASGI middleware, so a body over the limit is refused (413) from its `Content-Length`
before a byte is read, or cut off at the limit when streamed; a JSON body must be valid JSON with
finite numbers, within `max_depth` and `max_items` (422), before FastAPI parses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# Methods whose requests carry no body unless a header announces one.
BODILESS = frozenset({"GET", "HEAD", "OPTIONS"})


# What follows a streamed body cut off at the limit is read and dropped, this much at most,
# before the answer: a connection closed with unread data is reset (RST), and a reset can
# destroy the answer before the client reads it.
DRAIN_BYTES = 1 << 20
DRAIN_SECONDS = 1.0


class BodyRefused(ValueError):
    """A request body the edge will not pass on; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str, *, unread: bool = False) -> None:
        super().__init__(message)
        self.status, self.unread = status, unread


def check_json(body: bytes, *, max_depth: int, max_items: int) -> None:
    """Refuses (BodyRefused, 422) a body that is not JSON, holds NaN, Infinity or a number too
    large for a double, nests deeper than `max_depth`, or has more than `max_items` object keys
    and array items in all. Walks without recursion, so no depth can exhaust the stack."""
    try:
        document = orjson.loads(body)  # refuses NaN, Infinity, 1e999; stops at depth 1024
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
        if "depth limit" in reason:
            raise BodyRefused(422, f"body: JSON nested deeper than {max_depth} levels") from None
        if "infinity" in reason.lower() or _non_finite_at(body, exc.pos):
            raise BodyRefused(422, "body: NaN and Infinity are not JSON numbers; "
                                   "send finite numbers only") from None
        raise BodyRefused(422, f"body: not valid JSON ({reason.split(':')[0]} at byte "
                               f"{exc.pos})") from None
    items = 0
    level: list[tuple[Any, int]] = [(document, 1)]
    while level:
        value, depth = level.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > max_depth:
            raise BodyRefused(422, f"body: JSON nested deeper than {max_depth} levels")
        items += len(children)
        if items > max_items:
            raise BodyRefused(422, f"body: more than {max_items} keys and array items")
        level.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))


def _non_finite_at(body: bytes, position: int) -> bool:
    """Whether the unexpected text at `position` is NaN or (-)Infinity."""
    return body[position:position + 9].lstrip(b"-").startswith((b"NaN", b"Infinity"))


def _is_json(headers: Headers) -> bool:
    """Whether FastAPI would parse this body as JSON: no content type, or a JSON one."""
    content_type = headers.get("content-type")
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/")
                                          and kind.endswith("+json"))


class Edge:
    """The middleware: `max_body` bytes at most, JSON checked by `check_json`, and an
    exception the app did not answer turned into a 500 `{success: false, error}` (logged with
    its trace and an id the answer names)."""

    def __init__(self, app: ASGIApp, *, max_body: int, max_depth: int, max_items: int) -> None:
        self.app = app
        self.max_body, self.max_depth, self.max_items = max_body, max_depth, max_items

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            try:
                bounded = await self._bounded(scope, receive)
            except BodyRefused as refused:
                if refused.unread:
                    await _drain(receive)
                await _answer(send, refused.status, str(refused))
                return
            if bounded is None:
                return  # the client went away while sending its body: nobody to answer
            await self.app(scope, bounded, tracking)
        except ClientDisconnect:
            log.debug("client went away during %s %s", scope.get("method"), scope.get("path"))
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("unexpected error answering %s %s (incident %s)",
                          scope.get("method"), scope.get("path"), incident)
            if not started:
                await _answer(send, 500, f"internal error (incident {incident}); the gateway's "
                                         "log has the details")

    async def _bounded(self, scope: Scope, receive: Receive) -> Receive | None:
        """The request's `receive`, its body read (at most `max_body` bytes) and checked; the
        original when no body is announced; None when the client went away meanwhile."""
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise BodyRefused(400, "Content-Length: not a number")
            if int(length) > self.max_body:
                raise BodyRefused(413, f"body larger than {self.max_body} bytes")
        elif scope["method"] in BODILESS and "transfer-encoding" not in headers:
            return receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise BodyRefused(413, f"body larger than {self.max_body} bytes",
                                  unread=message.get("more_body", False))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(headers):
            check_json(body, max_depth=self.max_depth, max_items=self.max_items)
        return _replay(body, receive)


async def _drain(receive: Receive) -> None:
    """Reads and drops the rest of a body, `DRAIN_BYTES` and `DRAIN_SECONDS` at most."""
    dropped = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            while dropped < DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                dropped += len(message.get("body", b""))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` giving the read body in one message, then the original's messages (a
    disconnect, while a response streams)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _answer(send: Send, status: int, error: str) -> None:
    body = orjson.dumps({"success": False, "error": error})
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *([(b"connection", b"close")] if status == 413 else [])]})
    await send({"type": "http.response.body", "body": body})
