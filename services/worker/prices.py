"""The host's market-data feed (services/worker_host/feed.py) as a worker sees it: the latest
bid, ask and mark of each instrument it subscribed to, kept current by a reader task.

While the feed connection is up, an exchange broker prices from it instead of asking the
exchange; while it is gone (the feed restarting, or this worker dropped), `latest` gives None
and the broker asks the exchange, and the connection is tried again every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RECONNECT = (1.0, 10.0)  # seconds: first wait, ceiling (doubling) between reconnections


@dataclass(frozen=True)
class Quote:
    bid: float
    ask: float
    mark: float
    at: float  # the feed's time.time() when the price came


class FeedPrices:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.quotes: dict[tuple[str, str], Quote] = {}
        self.connected = False
        self.changed = asyncio.Event()
        self._reading: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self, keys: list[tuple[str, str]]) -> bool:
        """Connect and subscribe to `keys` ((source, instrument)), and keep doing so; whether
        the feed answered now (if not, the broker asks the exchange until it does)."""
        if not keys:
            return False
        connected = await self._connect(keys)
        self._reading = asyncio.create_task(self._follow(keys, connected), name="feed")
        if not connected:
            log.warning("no market-data feed at %s yet: prices from the exchange", self.path)
        return connected

    def latest(self, source: str, instrument: str) -> Quote | None:
        return self.quotes.get((source, instrument)) if self.connected else None

    async def _connect(self, keys: list[tuple[str, str]]) -> asyncio.StreamReader | None:
        try:
            reader, self._writer = await asyncio.open_unix_connection(str(self.path))
        except OSError:
            return None
        self._writer.write(json.dumps({"subscribe": [list(key) for key in keys]}).encode()
                           + b"\n")
        self.connected = True
        return reader

    async def _follow(self, keys: list[tuple[str, str]],
                      reader: asyncio.StreamReader | None) -> None:
        delay = RECONNECT[0]
        while True:
            if reader is not None:
                await self._read(reader)
                delay = RECONNECT[0]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT[1])
            reader = await self._connect(keys)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                try:
                    price = json.loads(line)
                    key = (price["source"], price["instrument"])
                    self.quotes[key] = Quote(float(price["bid"]), float(price["ask"]),
                                             float(price["mark"]), float(price["at"]))
                except (ValueError, KeyError, TypeError):
                    continue
                self.changed.set()
        except (ConnectionError, ValueError):
            pass
        finally:
            self.connected = False
            self.quotes.clear()
            if self._writer is not None:
                self._writer.close()
            log.warning("market-data feed lost: prices from the exchange until it is back")

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        if self._writer is not None:
            self._writer.close()
