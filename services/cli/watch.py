"""`runner status --watch`: the status table kept live, redrawn after the events that change it
(read from the gateway's event stream, not by polling), with the latest events under it."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from runner_client import RunnerClient, RunnerError
from services.cli.client import status_table

SHOWN_EVENTS = 8
SETTLE = 0.15  # seconds: one status read for a burst of events


async def watch_status(base_url: str, token: str, console: Console, *, user: str | None,
                       limit: int | None, offset: int) -> None:
    """Until Ctrl-C."""
    recent: deque[str] = deque(maxlen=SHOWN_EVENTS)
    changed = asyncio.Event()
    async with RunnerClient(base_url, token) as client:

        async def draw() -> Group:
            answer = await client.call("GET", "/runner/status", params={
                k: v for k, v in (("userId", user), ("limit", limit),
                                  ("offset", offset if limit else None)) if v is not None})
            lines = Text("\n".join(recent) or "(waiting for events)", style="dim")
            return Group(status_table(answer, "Runners (live)", page=answer.get("page")),
                         Text("latest events:"), lines)

        async def follow() -> None:
            async for event in client.events(user_id=user):
                worker = event.worker_id or event.user_id or ""
                recent.appendleft(f"{event.occurred_at:%H:%M:%S} {event.type} {worker}")
                changed.set()

        following = asyncio.ensure_future(follow())
        try:
            with Live(await draw(), console=console, auto_refresh=False) as live:
                while True:
                    waiting = asyncio.ensure_future(changed.wait())
                    await asyncio.wait({waiting, following}, return_when=asyncio.FIRST_COMPLETED)
                    if following.done():
                        waiting.cancel()
                        following.result()  # raises what ended the stream
                        return
                    await asyncio.sleep(SETTLE)
                    changed.clear()
                    live.update(await draw(), refresh=True)
        except RunnerError as exc:
            console.print(f"[red]error:[/] {exc}")
        finally:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, RunnerError):
                await following


