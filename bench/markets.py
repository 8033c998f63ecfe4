"""Real markets: a live-exchange worker's memory and start, and the host's market-data feed,
against the local Deribit of the tests (tests/exchanges/deribit.py) through the real ccxt client.

(a) memory: unique memory (USS) of an idle `hold` worker on a Deribit account after its first
    fill, forked by the fork-server (ccxt preloaded there; target ≤ 25 MiB); beside it the same
    worker exec'd (it imports ccxt itself) and a forked paper worker.
(b) start → ready: spawn request → Hello of such a worker (its credentials checked: markets,
    balance and positions read from the exchange), p50, against the same calls' own round trips:
    the same four signed calls, one after the other, over raw aiohttp (target ≤ 100 ms beyond).
(c) feed: N workers' subscriptions to one instrument through the host's feed relay (its feed
    a process of its own, ccxt.pro's WebSocket to the exchange; each price a line on the
    worker's control channel); a price set on the exchange → every subscriber has
    it, p99 (target ≤ 20 ms); and the feed's connections to the exchange while it serves them
    (target 1 per exchange).

    .venv/bin/python -m bench.markets [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
from rich.console import Console

from bench.report import Figure, at_most, percentile, table
from bench.spawn import MiB, uss
from services.worker import protocol
from services.worker_host.feed_relay import FeedRelay
from services.worker_host.fork_spawner import ForkSpawner
from services.worker_host.spawner import (
    ExecSpawner,
    SpawnRequest,
    WorkerProcess,
    worker_environment,
)
from tests.exchanges.deribit import LocalDeribit

SECRET = "bench-secret"
HOLD = json.dumps({"name": "bench", "type": "hold", "parameters": {"amount": 10}})
BTC = "BTC-PERPETUAL"

# The subscribers of (c): one process holding every worker's end of its control channel,
# printing when each got a mark.
SUBSCRIBERS = r"""
import asyncio, json, socket, sys, time
async def one(fd, marks):
    reader, _ = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    while line := await reader.readline():
        marks.append((json.loads(line)["mark"], time.monotonic()))
async def main(fds, last):
    got = [[] for _ in fds]
    tasks = [asyncio.create_task(one(fd, marks)) for fd, marks in zip(fds, got)]
    while not all(got):
        if any(task.done() for task in tasks):
            raise SystemExit(f"a subscriber failed: {next(t for t in tasks if t.done())}")
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    while not all(marks[-1][0] == last for marks in got):
        await asyncio.sleep(0.01)
    print(json.dumps(got), flush=True)
import uvloop
uvloop.run(main([int(fd) for fd in sys.argv[2:]], float(sys.argv[1])))
"""


@dataclass
class Subscriber:
    """A worker as the feed relay sees it: its id and the host's end of its control channel."""

    worker_id: str
    channel: socket.socket

    def send_encoded(self, line: bytes) -> None:
        self.channel.send(line)


def request(exchange: LocalDeribit, workdir: Path, key: str) -> SpawnRequest:
    env = worker_environment(
        worker_id=key, job_id="job", user_id="bench", strategy_id="bench", broker_id="deribit",
        config_json=HOLD, heartbeat_interval=5.0,
        broker_urls=json.dumps({"deribit": exchange.url}))
    return SpawnRequest(key, "job", "bench", 0, env, workdir / key, 30.0,
                        credentials={"apiKey": key, "apiSecret": SECRET})


async def first_fill(worker: WorkerProcess) -> None:
    async with asyncio.timeout(30):
        while True:
            line = protocol.decode(await worker.reader.readline())
            if isinstance(line, protocol.Report) and line.event == "OrderFilled":
                return


async def idle_uss(spawner: ForkSpawner | ExecSpawner, exchange: LocalDeribit, workdir: Path,
                   count: int, broker: str = "deribit") -> float:
    """Median USS of `count` idle workers after their first fill (all alive at once)."""
    workers = []
    for _ in range(count):
        key = f"mem-{len(exchange.accounts)}"
        exchange.add_account(key, SECRET)
        spawn = request(exchange, workdir, key)
        if broker != "deribit":
            spawn = replace(spawn, env=spawn.env | {protocol.ENV_BROKER_ID: broker})
        worker = await spawner.spawn(spawn)
        await first_fill(worker)
        workers.append(worker)
    await asyncio.sleep(1.0)  # past the first beat
    sizes = [uss(worker.pid) / MiB for worker in workers]
    for worker in workers:
        worker.signal(9)
        await worker.wait()
    return statistics.median(sizes)


async def start_to_hello(spawner: ForkSpawner, exchange: LocalDeribit, workdir: Path,
                         count: int) -> float:
    latencies = []
    for _ in range(count + 1):
        key = f"start-{len(exchange.accounts)}"
        exchange.add_account(key, SECRET)
        started = time.perf_counter()
        worker = await spawner.spawn(request(exchange, workdir, key))
        latencies.append((time.perf_counter() - started) * 1000)
        worker.signal(9)
        await worker.wait()
    return statistics.median(latencies[1:])  # the first waits for the fork-server's preload


async def raw_round_trips(exchange: LocalDeribit, count: int) -> float:
    """The start's four calls, signed as ccxt signs them, over raw aiohttp: p50 ms."""
    exchange.add_account("raw", SECRET)
    calls = ["public/get_currencies", "public/get_instruments?currency=BTC&kind=future",
             "private/get_account_summary?currency=BTC", "private/get_positions"]
    latencies = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.perf_counter()
            for call in calls:
                path = f"/api/v2/{call}"
                headers = {}
                if call.startswith("private/"):
                    ts = str(int(time.time() * 1000))
                    signed = f"{ts}\n{ts}\nGET\n{path}\n\n".encode()
                    sig = hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
                    headers["Authorization"] = (
                        f"deri-hmac-sha256 id=raw,ts={ts},sig={sig},nonce={ts}")
                async with session.get(exchange.url + path, headers=headers) as answer:
                    assert answer.status == 200, await answer.text()
                    await answer.read()
            latencies.append((time.perf_counter() - started) * 1000)
    return statistics.median(latencies)


async def feed_latency(exchange: LocalDeribit, workdir: Path, subscribers: int,
                       rounds: int) -> tuple[float, float, int]:
    """(p50 ms, p99 ms, connections to the exchange) for price → every subscriber, through
    the host's feed relay and its feed process."""
    relay = FeedRelay({"deribit": exchange.url}, workdir / "feed.log")
    pairs = [socket.socketpair() for _ in range(subscribers)]
    try:
        last = 50_000.0 + rounds
        fds = [theirs.fileno() for _, theirs in pairs]
        clients = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SUBSCRIBERS, str(last), *map(str, fds), pass_fds=fds,
            stdout=asyncio.subprocess.PIPE, limit=1 << 26)
        for number, (ours, _) in enumerate(pairs):
            relay.subscribe(Subscriber(f"w{number}", ours), [("deribit", BTC)])
        assert clients.stdout is not None
        assert await asyncio.wait_for(clients.stdout.readline(), 90) == b"ready\n"
        assert relay.process is not None
        connections = exchange.connections_from(relay.process.pid)
        sent: dict[float, float] = {}
        for step in range(rounds):
            await asyncio.sleep(0.05)
            price = 50_000.0 + step + 1
            sent[price] = time.monotonic()
            exchange.set_price(BTC, price)
        try:
            got = json.loads(await asyncio.wait_for(clients.stdout.readline(), 60))
        finally:
            if clients.returncode is None:
                clients.kill()
            await clients.wait()
        latencies = [(at - sent[mark]) * 1000 for marks in got for mark, at in marks
                     if mark in sent]
        # A subscriber gets every price the feed saw; ccxt.pro hands the feed the latest
        # ticker, so two prices closer than its read may come as one.
        return percentile(latencies, 50), percentile(latencies, 99), connections
    finally:
        await relay.close()
        for pair in pairs:
            for end in pair:
                end.close()
        exchange.set_price(BTC, 50_000.0)


async def run(quick: bool) -> list[Figure]:
    memory_n, start_n, subscribers, rounds = (3, 5, 200, 20) if quick else (8, 30, 200, 100)
    exchange = LocalDeribit()
    await exchange.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            forks = ForkSpawner(workdir / "fork")
            await forks.start()
            try:
                hello = await start_to_hello(forks, exchange, workdir, start_n)
                forked = await idle_uss(forks, exchange, workdir, memory_n)
                paper = await idle_uss(forks, exchange, workdir, memory_n, broker="paper")
            finally:
                await forks.close()
            execs = ExecSpawner()
            exec_uss = await idle_uss(execs, exchange, workdir, max(memory_n // 2, 1))
            round_trips = await raw_round_trips(exchange, start_n)
            p50, p99, connections = await feed_latency(exchange, workdir, subscribers, rounds)
    finally:
        await exchange.stop()
    beyond = hello - round_trips
    return [
        Figure("live-exchange worker USS, idle after its first fill (forked)", forked, "MiB",
               exec_uss, "the same worker exec'd (imports ccxt itself)", target="≤ 25 MiB",
               met=at_most(forked, 25), higher_is_better=False,
               note=f"a forked paper worker: {paper:.1f} MiB"),
        Figure("live-exchange worker start → ready (Hello, credentials checked), p50", hello,
               "ms", round_trips, "its four calls' own round trips (raw aiohttp)",
               target="≤ 100 ms beyond the round trips", met=at_most(beyond, 100),
               higher_is_better=False, note=f"{beyond:.0f} ms beyond, n={start_n}"),
        Figure(f"feed: price on the exchange → {subscribers} subscribers, p99", p99, "ms",
               target="≤ 20 ms", met=at_most(p99, 20), higher_is_better=False,
               note=f"p50 {p50:.1f} ms, {rounds} prices, ccxt.pro WebSocket"),
        Figure(f"feed: connections to the exchange serving {subscribers} subscribers",
               connections, "connections", target="1 per exchange", met=connections == 1,
               higher_is_better=False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    figures = asyncio.run(run(parser.parse_args().quick))
    Console().print(table(figures, "real markets"))


if __name__ == "__main__":
    main()
