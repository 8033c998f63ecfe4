"""Reading a `text/event-stream` body (the WHATWG parsing rules that matter here)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event: its `id:` (None when the stream gave none), `event:` and `data:`."""

    id: str | None
    event: str
    data: str


async def parse(lines: AsyncIterable[str]) -> AsyncIterator[ServerSentEvent | None]:
    """Events from the stream's lines; None for each comment (a keep-alive)."""
    event, data, last_id = "", [], None
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield ServerSentEvent(last_id, event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            yield None
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
