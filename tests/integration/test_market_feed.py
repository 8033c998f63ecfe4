"""The per-host market-data feed against the local Deribit: one public connection per exchange
(ccxt.pro's WebSocket, or REST polling), its prices fanned out; a host relays them to its workers
over their control channels (`FeedRelay`), and a worker marks its positions with them."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.worker import protocol
from services.worker.protocol import Price, Stop, Subscribe
from services.worker_host.feed import MarketFeed
from services.worker_host.feed_relay import FeedRelay
from services.worker_host.spawner import WorkerProcess
from tests.exchanges.deribit import LocalDeribit
from tests.integration.test_worker_exchange import on, strategy
from tests.integration.worker_processes import API_KEY, API_SECRET, Spawn, reports

BTC, ETH = "BTC-PERPETUAL", "ETH-PERPETUAL"
KEY = ("deribit", BTC)


class Subscriber:
    """A raw client of the feed's socket, as a host is."""

    def __init__(self) -> None:
        self.marks: dict[tuple[str, str], dict[str, Any]] = {}
        self.changed = asyncio.Event()

    async def start(self, path: Path, *keys: tuple[str, str]) -> None:
        reader, self.writer = await asyncio.open_unix_connection(str(path))
        self.writer.write(json.dumps({"subscribe": [list(k) for k in keys or (KEY,)]}).encode()
                          + b"\n")
        self.task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            price = json.loads(line)
            self.marks[(price["source"], price["instrument"])] = price
            self.changed.set()

    async def until(self, key: tuple[str, str], mark: float) -> dict[str, Any]:
        async with asyncio.timeout(10):
            while (price := self.marks.get(key)) is None or price["mark"] != mark:
                self.changed.clear()
                await self.changed.wait()
        return price

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture(params=["websocket", "polling"])
async def feed(request, deribit: LocalDeribit, tmp_path: Path) -> AsyncIterator[MarketFeed]:
    feed = MarketFeed(tmp_path / "feed.sock", {"deribit": deribit.url}, poll_interval=0.05,
                      websocket=request.param == "websocket")
    await feed.start()
    yield feed
    await feed.close()


async def test_every_subscriber_gets_the_price_and_each_change_over_one_connection(
        feed: MarketFeed, deribit: LocalDeribit) -> None:
    subscribers = [Subscriber() for _ in range(20)]
    for subscriber in subscribers:
        await subscriber.start(feed.path, KEY, ("deribit", ETH))
    for subscriber in subscribers:
        await subscriber.until(KEY, 50_000)
        await subscriber.until(("deribit", ETH), 3_000)
    deribit.set_price(BTC, 50_250)
    for subscriber in subscribers:
        price = await subscriber.until(KEY, 50_250)
    assert (price["bid"], price["ask"]) == (50_249.5, 50_250.5)
    assert len(feed.exchanges) == 1 and feed.subscriber_count() == 20
    assert deribit.connections_from(os.getpid()) == 1, "one connection, not one a subscriber"
    if feed.websocket:
        assert deribit.calls["ws/ticker"] == 2 and deribit.calls["public/ticker"] == 0
    late = Subscriber()  # the latest price at once on subscribing
    await late.start(feed.path)
    await late.until(KEY, 50_250)
    for subscriber in [*subscribers, late]:
        await subscriber.close()


async def channel(worker_id: str) -> tuple[WorkerProcess, socket.socket]:
    """A worker as its host holds it (its channel's host end), and the worker's end."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    return WorkerProcess(worker_id, f"j-{worker_id}", "u", 0, None, reader, writer), theirs  # type: ignore[arg-type]


async def relayed(end: socket.socket, mark: float) -> Price:
    """The first `Price` of `mark` a worker end receives."""
    loop = asyncio.get_running_loop()
    buffered = b""
    async with asyncio.timeout(60):
        while True:
            buffered += await loop.sock_recv(end, 1 << 16)
            lines = buffered.split(b"\n")
            buffered = lines.pop()
            for line in lines:
                price = protocol.decode(line)
                if isinstance(price, Price) and price.mark == mark:
                    return price


async def test_a_host_relays_its_feed_processes_prices_to_the_subscribed_workers(
        deribit: LocalDeribit, tmp_path: Path) -> None:
    """The relay starts the feed as a process of its own at the first subscription, and writes
    each price to every worker subscribed to it (none to the others); a dead feed is started
    again."""
    relay = FeedRelay({"deribit": deribit.url}, tmp_path / "feed.log")
    (btc, btc_end), (eth, eth_end) = await channel("w-btc"), await channel("w-eth")
    try:
        relay.subscribe(btc, [KEY])
        relay.subscribe(eth, [("deribit", ETH)])
        assert (await relayed(btc_end, 50_000)).instrument == BTC
        assert (await relayed(eth_end, 3_000)).instrument == ETH
        deribit.set_price(BTC, 50_500)
        await relayed(btc_end, 50_500)
        relay.forget("w-btc")
        assert relay.process is not None
        relay.process.kill()  # the feed dies: started again, the subscriptions with it
        deribit.set_price(ETH, 3_100)
        await relayed(eth_end, 3_100)
    finally:
        await relay.close()
        for worker, end in ((btc, btc_end), (eth, eth_end)):
            worker.writer.close()
            end.close()


async def test_the_feed_as_its_own_process(deribit: LocalDeribit, tmp_path: Path) -> None:
    path = tmp_path / "feed.sock"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.worker_host.feed", str(path),
        "--urls", json.dumps({"deribit": deribit.url}), stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 20) == b"ready\n"
        subscriber = Subscriber()
        await subscriber.start(path)
        await subscriber.until(KEY, 50_000)
        deribit.set_price(BTC, 49_000)
        await subscriber.until(KEY, 49_000)
        await subscriber.close()
    finally:
        process.terminate()
        await process.wait()


async def test_a_worker_subscribes_and_marks_with_the_prices_its_host_relays(
        spawn: Spawn, deribit: LocalDeribit) -> None:
    """It asks its host for its instruments' prices, and uses those fresh enough (the test plays
    the host); with none, it asks the exchange."""
    deribit.add_account(API_KEY, API_SECRET)
    worker = await spawn(strategy(amount=20), **on(deribit))
    lines = await worker.until(lambda line: isinstance(line, Subscribe))
    assert lines[-1].keys == (KEY,)
    await worker.until(lambda line: bool(reports(worker.received, "PositionChanged")))
    asked = deribit.calls["public/ticker"]
    await worker.send(Price(source="deribit", instrument=BTC, bid=51_199.5, ask=51_200.5,
                            mark=51_200, at=time.time()))
    await worker.until(lambda line: bool(getattr(line, "positions", None))
                       and line.positions[0].mark_price == 51_200)
    assert deribit.calls["public/ticker"] <= asked + 1, "marks from its host, not the exchange"
    await worker.send(Stop())
    assert await worker.exit_code() == 0
