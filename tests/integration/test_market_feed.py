"""The per-host market-data feed against the local Deribit: one public connection per exchange
(ccxt.pro's WebSocket, or REST polling), its prices fanned out to many workers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.worker.prices import FeedPrices
from services.worker.protocol import Stop
from services.worker_host.feed import MarketFeed
from tests.exchanges.deribit import LocalDeribit
from tests.integration.test_worker_exchange import on, strategy
from tests.integration.worker_processes import Spawn, reports

BTC, ETH = "BTC-PERPETUAL", "ETH-PERPETUAL"
KEY = ("deribit", BTC)


async def until_price(prices: FeedPrices, key: tuple[str, str], mark: float) -> None:
    async with asyncio.timeout(5):
        while (quote := prices.quotes.get(key)) is None or quote.mark != mark:
            prices.changed.clear()
            await prices.changed.wait()


@pytest.fixture(params=["websocket", "polling"])
async def feed(request, deribit: LocalDeribit, tmp_path: Path) -> AsyncIterator[MarketFeed]:
    feed = MarketFeed(tmp_path / "feed.sock", {"deribit": deribit.url}, poll_interval=0.05,
                      websocket=request.param == "websocket")
    await feed.start()
    yield feed
    await feed.close()


async def workers(feed: MarketFeed, count: int, *keys: tuple[str, str]) -> list[FeedPrices]:
    subscribed = [FeedPrices(feed.path) for _ in range(count)]
    for prices in subscribed:
        assert await prices.start(list(keys or (KEY,)))
    return subscribed


async def test_every_subscriber_gets_the_price_and_each_change(
        feed: MarketFeed, deribit: LocalDeribit) -> None:
    subscribed = await workers(feed, 20, KEY, ("deribit", ETH))
    for prices in subscribed:
        await until_price(prices, KEY, 50_000)
        await until_price(prices, ("deribit", ETH), 3_000)
    deribit.set_price(BTC, 50_250)
    for prices in subscribed:
        await until_price(prices, KEY, 50_250)
    quote = subscribed[0].latest(*KEY)
    assert quote is not None and (quote.bid, quote.ask) == (50_249.5, 50_250.5)
    assert len(feed.exchanges) == 1 and feed.subscriber_count() == 20
    assert deribit.connections_from(os.getpid()) == 1, "one connection, not one a worker"
    if feed.websocket:
        assert deribit.calls["ws/ticker"] == 2 and deribit.calls["public/ticker"] == 0
    for prices in subscribed:
        await prices.close()


async def test_a_late_subscriber_gets_the_latest_price_at_once(
        feed: MarketFeed, deribit: LocalDeribit) -> None:
    [first] = await workers(feed, 1)
    await until_price(first, KEY, 50_000)
    [late] = await workers(feed, 1)
    await until_price(late, KEY, 50_000)
    await first.close()
    await late.close()


async def test_a_worker_asks_the_exchange_until_its_feed_is_back(
        deribit: LocalDeribit, tmp_path: Path) -> None:
    path = tmp_path / "feed.sock"
    prices = FeedPrices(path)
    assert not await prices.start([KEY])
    assert prices.latest(*KEY) is None
    feed = MarketFeed(path, {"deribit": deribit.url})
    await feed.start()
    try:
        await until_price(prices, KEY, 50_000)
        await feed.close()  # the feed goes away: no stale prices
        async with asyncio.timeout(5):
            while prices.latest(*KEY) is not None:
                await asyncio.sleep(0.02)
        feed = MarketFeed(path, {"deribit": deribit.url})
        await feed.start()
        deribit.set_price(BTC, 51_000)
        await until_price(prices, KEY, 51_000)
    finally:
        await prices.close()
        await feed.close()


async def test_the_feed_as_its_own_process(deribit: LocalDeribit, tmp_path: Path) -> None:
    path = tmp_path / "feed.sock"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.worker_host.feed", str(path),
        "--urls", json.dumps({"deribit": deribit.url}), stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 20) == b"ready\n"
        prices = FeedPrices(path)
        assert await prices.start([KEY])
        await until_price(prices, KEY, 50_000)
        deribit.set_price(BTC, 49_000)
        await until_price(prices, KEY, 49_000)
        await prices.close()
    finally:
        process.terminate()
        await process.wait()


async def test_a_worker_prices_from_the_hosts_feed(
        spawn: Spawn, deribit: LocalDeribit, tmp_path: Path) -> None:
    from tests.integration.worker_processes import API_KEY, API_SECRET

    deribit.add_account(API_KEY, API_SECRET)
    feed = MarketFeed(tmp_path / "feed.sock", {"deribit": deribit.url})
    await feed.start()
    try:
        worker = await spawn(strategy(amount=20),
                             **on(deribit, RUNNER_FEED_SOCKET=str(feed.path)))
        await worker.until(lambda line: bool(reports(worker.received, "PositionChanged")))
        deribit.set_price(BTC, 50_400)
        await worker.until(lambda line: getattr(line, "positions", None) is not None
                           and bool(line.positions) and line.positions[0].mark_price == 50_400)
        assert deribit.calls["public/ticker"] == 0, "marks from the feed, not from the worker"
        assert feed.subscriber_count() == 1
        await worker.send(Stop())
        assert await worker.exit_code() == 0
    finally:
        await feed.close()
