"""One market-data feed per host: one public connection per exchange, its prices fanned out to
the host's workers, so a hundred workers trading BTC-PERPETUAL do not each poll Deribit.

It watches tickers over ccxt.pro's WebSocket client where ccxt has one, else polls ccxt's REST
client; private calls stay in each worker. Its client is the host's `FeedRelay` (feed_relay.py),
over a Unix stream socket, JSON lines:
- relay → feed: `{"subscribe": [["deribit", "BTC-PERPETUAL"], ...]}` (the source is the
  exchange id, `-testnet` for its sandbox);
- feed → relay: `{"source", "instrument", "bid", "ask", "mark", "at"}` (`at`: the feed's
  `time.time()` when the price came), the latest at once on subscribing, then every change;
- a client that stops reading (its socket buffer past `SLOW_SUBSCRIBER_BYTES`) is dropped.

Run as a process of its own, so ccxt stays out of the host's process:
`python -m services.worker_host.feed PATH [--urls JSON] [--poll S]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from services.worker.brokers.catalogue import parse_broker_id
from services.worker.protocol import Price, encode

log = logging.getLogger(__name__)

SLOW_SUBSCRIBER_BYTES = 1 << 20
RETRY_DELAY = (0.5, 10.0)  # seconds: first, ceiling (doubling) after a failed watch or poll
LINE_MAX = 1 << 16


def price_of(source: str, instrument: str, ticker: Mapping[str, Any]) -> Price | None:
    last = ticker.get("markPrice") or ticker.get("last") or ticker.get("close")
    bid = ticker.get("bid") or last
    ask = ticker.get("ask") or last
    if not (bid and ask):
        return None
    return Price(source=source, instrument=instrument, bid=float(bid), ask=float(ask),
                 mark=float(last or (bid + ask) / 2), at=time.time())


def feed_client(source: str, urls: Mapping[str, str], websocket: bool) -> tuple[Any, bool]:
    """A public ccxt client for `source` (sandbox for `-testnet`, `urls` applied): ccxt.pro's
    when `websocket` and ccxt has one, else the REST client. Returns (client, is_websocket)."""
    from services.worker.brokers.exchange import override_urls

    spec = parse_broker_id(source)
    assert spec.exchange is not None
    cls = None
    if websocket:
        with contextlib.suppress(ImportError, AttributeError):
            cls = getattr(importlib.import_module(f"ccxt.pro.{spec.exchange}"), spec.exchange)
    is_websocket = cls is not None
    if cls is None:
        cls = getattr(importlib.import_module(f"ccxt.async_support.{spec.exchange}"),
                      spec.exchange)
    # One connection for all REST calls: the feed polls one instrument after the other. Over
    # a WebSocket, REST only loads the markets: that connection is not kept.
    connector = aiohttp.TCPConnector(limit=1, force_close=is_websocket)
    client = cls({"enableRateLimit": True, "session": aiohttp.ClientSession(connector=connector)})
    if spec.testnet:
        client.set_sandbox_mode(True)
    base = urls.get(source) or urls.get(spec.exchange)
    if base:
        client.urls["api"] = override_urls(client.urls["api"], base)
    return client, is_websocket


class ExchangeFeed:
    """One exchange's prices: one client, the instruments wanted, `publish` on every change."""

    def __init__(self, source: str, urls: Mapping[str, str], publish: Callable[[Price], None],
                 poll_interval: float, websocket: bool) -> None:
        self.source = source
        self.client, self.websocket = feed_client(source, urls, websocket)
        self.publish = publish
        self.poll_interval = poll_interval
        self.instruments: set[str] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.markets_loaded: asyncio.Task[Any] | None = None
        self.last: dict[str, tuple[float, float, float]] = {}

    def want(self, instrument: str) -> None:
        if instrument in self.instruments:
            return
        self.instruments.add(instrument)
        if self.websocket:
            self.tasks.append(asyncio.create_task(self._watch(instrument),
                                                  name=f"feed-{self.source}-{instrument}"))
        elif len(self.instruments) == 1:
            self.tasks.append(asyncio.create_task(self._poll(), name=f"feed-{self.source}"))

    async def _symbol(self, instrument: str) -> str:
        if self.markets_loaded is None:
            self.markets_loaded = asyncio.ensure_future(self.client.load_markets())
        await asyncio.shield(self.markets_loaded)
        return self.client.market(instrument)["symbol"]

    def _changed(self, instrument: str, ticker: Mapping[str, Any]) -> None:
        price = price_of(self.source, instrument, ticker)
        if price is None:
            return
        figures = (price.bid, price.ask, price.mark)
        if self.last.get(instrument) != figures:
            self.last[instrument] = figures
            self.publish(price)

    async def _watch(self, instrument: str) -> None:
        delay = RETRY_DELAY[0]
        while True:
            try:
                symbol = await self._symbol(instrument)
                while True:
                    self._changed(instrument, await self.client.watch_ticker(symbol))
                    delay = RETRY_DELAY[0]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.markets_loaded is not None and self.markets_loaded.done():
                    with contextlib.suppress(Exception):
                        if self.markets_loaded.exception() is not None:
                            self.markets_loaded = None
                log.warning("%s %s: %s; watching again in %.1fs", self.source, instrument,
                            type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY[1])

    async def _poll(self) -> None:
        delay = RETRY_DELAY[0]
        while True:
            try:
                for instrument in sorted(self.instruments):
                    symbol = await self._symbol(instrument)
                    self._changed(instrument, await self.client.fetch_ticker(symbol))
                delay = RETRY_DELAY[0]
                await asyncio.sleep(self.poll_interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.markets_loaded is not None and self.markets_loaded.done() and (
                        self.markets_loaded.exception() is not None):
                    self.markets_loaded = None
                log.warning("%s: %s; polling again in %.1fs", self.source, type(exc).__name__,
                            delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY[1])

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        session = self.client.session
        with contextlib.suppress(Exception):
            await self.client.close()
        if session is not None:
            await session.close()


@dataclass
class MarketFeed:
    """The host's feed: a Unix socket for its workers, an ExchangeFeed per source wanted."""

    path: Path
    urls: Mapping[str, str] = field(default_factory=dict)
    poll_interval: float = 1.0
    websocket: bool = True
    exchanges: dict[str, ExchangeFeed] = field(default_factory=dict)
    subscribers: dict[tuple[str, str], set[asyncio.StreamWriter]] = field(default_factory=dict)
    latest: dict[tuple[str, str], Price] = field(default_factory=dict)
    _server: asyncio.AbstractServer | None = None
    _clients: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                       limit=LINE_MAX)
        self.path.chmod(0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        for feed in self.exchanges.values():
            await feed.close()
        self.path.unlink(missing_ok=True)

    def subscriber_count(self) -> int:
        return len({w for writers in self.subscribers.values() for w in writers})

    def publish(self, price: Price) -> None:
        """The price to every worker subscribed to it (one encoding, written to each)."""
        key = (price.source, price.instrument)
        self.latest[key] = price
        line = encode(price)
        for writer in list(self.subscribers.get(key, ())):
            self._send(writer, line)

    def _send(self, writer: asyncio.StreamWriter, line: bytes) -> None:
        if writer.is_closing():
            return
        if writer.transport.get_write_buffer_size() > SLOW_SUBSCRIBER_BYTES:
            log.warning("dropping a subscriber that stopped reading")
            writer.close()
            return
        writer.write(line)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        keys: set[tuple[str, str]] = set()
        try:
            while line := await reader.readline():
                try:
                    wanted = [(str(s), str(i)) for s, i in json.loads(line)["subscribe"]]
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring an unreadable subscription (%d bytes)", len(line))
                    continue
                for key in wanted:
                    if not self._subscribe(key, writer):
                        continue
                    keys.add(key)
                    if (price := self.latest.get(key)) is not None:
                        self._send(writer, encode(price))
        except (ConnectionError, ValueError):
            pass
        finally:
            for key in keys:
                self.subscribers.get(key, set()).discard(writer)
            writer.close()
            self._clients.discard(task)

    def _subscribe(self, key: tuple[str, str], writer: asyncio.StreamWriter) -> bool:
        source, instrument = key
        feed = self.exchanges.get(source)
        if feed is None:
            try:
                feed = self.exchanges[source] = ExchangeFeed(
                    source, self.urls, self.publish, self.poll_interval, self.websocket)
            except (LookupError, ImportError, AttributeError) as exc:
                log.warning("no feed for %s: %s", source, exc)
                return False
        feed.want(instrument)
        self.subscribers.setdefault(key, set()).add(writer)
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description="a worker-host's market-data feed")
    parser.add_argument("path", type=Path, help="the Unix socket workers subscribe on")
    parser.add_argument("--urls", default="{}", help="RUNNER_BROKER_URLS (JSON)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
    parser.add_argument("--no-websocket", action="store_true", help="poll every exchange")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s feed: %(message)s")

    async def serve() -> None:
        feed = MarketFeed(args.path, json.loads(args.urls), args.poll, not args.no_websocket)
        await feed.start()
        print("ready", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await feed.close()

    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve())


if __name__ == "__main__":
    main()
