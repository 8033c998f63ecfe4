"""The worker runtime's pure parts: environment parsing, reports, flatten, secret hygiene."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from events import REGISTRY
from events.jobs import FlattenFailed, PositionsFlattened
from events.values import Fill, Position, StrategyConfig
from services.worker import protocol
from services.worker.brokers import BROKERS
from services.worker.brokers.base import BrokerError, BrokerFact, ClosedTrade, Credentials
from services.worker.brokers.paper import PaperBroker, PaperFaults, PaperSettings
from services.worker.flatten import flatten
from services.worker.runtime import (
    EXIT_BAD_CONFIG,
    EXIT_OK,
    LEASE_LAPSED,
    BadEnvironment,
    HostLease,
    MarketClock,
    WorkerEnv,
    WorkerRuntime,
    redactor,
    report_of,
    run_worker,
    trading_event,
)
from services.worker.strategies.hold import Hold

BTC = "BTC-PERPETUAL"
ETH = "ETH-USD"
KEY = "key-AKIA-7731"
SECRET = "secret-zq9-FFFF"


def environment(**overrides: str) -> dict[str, str]:
    env = {
        "USER_ID": "user-1",
        "STRATEGY_ID": "btc-hold",
        "BROKER_ID": "paper",
        "CONFIG": json.dumps(
            {"name": "t", "type": "hold", "riskManagement": {"maxPositionSize": 5}}
        ),
        "RUNNER_WORKER_ID": "worker-1",
        "RUNNER_JOB_ID": "job-1",
        "RUNNER_CONTROL_FD": "7",
        "RUNNER_HEARTBEAT_INTERVAL": "0.5",
    }
    env.update(overrides)
    return env


def test_environment_is_parsed() -> None:
    env = WorkerEnv.parse(environment(RUNNER_WORKER_STATE="/tmp/x.json", RUNNER_PAPER_SEED="9"))
    assert (env.user_id, env.strategy_id, env.broker_id) == ("user-1", "btc-hold", "paper")
    assert (env.worker_id, env.job_id, env.control_fd) == ("worker-1", "job-1", 7)
    assert env.heartbeat_interval == 0.5
    assert env.config.risk_management.max_position_size == 5
    assert str(env.state_file) == "/tmp/x.json"
    assert env.paper_seed == "9"


def test_credentials_are_never_read_from_the_environment() -> None:
    """The seed's API_KEY and API_SECRET come over the channel (protocol.Credentials) only."""
    env = WorkerEnv.parse(environment(API_KEY=KEY, API_SECRET=SECRET))
    assert KEY not in repr(env) and SECRET not in repr(env)
    assert not hasattr(env, "credentials")


def test_exchange_environment_is_parsed() -> None:
    env = WorkerEnv.parse(environment(
        RUNNER_BROKER_URLS='{"deribit": "http://127.0.0.1:9000"}', RUNNER_WORKER_MODE="flatten",
        RUNNER_FLATTEN_TIMEOUT="4.5"))
    assert env.broker_urls == {"deribit": "http://127.0.0.1:9000"}
    assert (env.mode, env.flatten_timeout) == ("flatten", 4.5)


def test_environment_defaults() -> None:
    env = WorkerEnv.parse(environment(RUNNER_HEARTBEAT_INTERVAL=""))
    assert env.heartbeat_interval == 5.0
    assert env.state_file is None
    assert env.paper_seed is None


def test_credentials_never_show_in_repr() -> None:
    credentials = Credentials(api_key=KEY, api_secret=SECRET)
    line = protocol.Credentials(api_key=KEY, api_secret=SECRET)
    for shown in (repr(credentials), repr(line), str(line)):
        assert KEY not in shown and SECRET not in shown
    assert protocol.decode(protocol.encode(line)) == line


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"RUNNER_JOB_ID": ""}, "RUNNER_JOB_ID is not set"),
        ({"CONFIG": ""}, "CONFIG is not set"),
        ({"CONFIG": "{"}, "CONFIG is not a valid strategy config"),
        ({"CONFIG": json.dumps({"name": "t", "type": "Bad Type!"})}, "type"),
        ({"RUNNER_CONTROL_FD": "three"}, "RUNNER_CONTROL_FD"),
        ({"RUNNER_HEARTBEAT_INTERVAL": "-1"}, "RUNNER_HEARTBEAT_INTERVAL"),
        ({"RUNNER_HEARTBEAT_INTERVAL": "soon"}, "RUNNER_HEARTBEAT_INTERVAL"),
        ({"RUNNER_WORKER_MODE": "yolo"}, "RUNNER_WORKER_MODE must be one of trade, flatten"),
        ({"RUNNER_FLATTEN_TIMEOUT": "0"}, "RUNNER_FLATTEN_TIMEOUT"),
        ({"RUNNER_FLATTEN_TIMEOUT": "later"}, "RUNNER_FLATTEN_TIMEOUT"),
        ({"RUNNER_BROKER_URLS": "{"}, "RUNNER_BROKER_URLS"),
    ],
)
def test_bad_environment_names_the_variable(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(BadEnvironment, match=message):
        WorkerEnv.parse(environment(**overrides))


def test_invalid_config_is_described_without_echoing_it() -> None:
    leaky = json.dumps(
        {"name": "t", "type": "hold", "riskManagement": {"maxPositionSize": f"oops {SECRET}"}}
    )
    with pytest.raises(BadEnvironment) as caught:
        WorkerEnv.parse(environment(CONFIG=leaky))
    assert "maxPositionSize" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """run_worker takes over the root logger (as it must in its own process); put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_bad_environment_exits_2_and_logs_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_worker(environment(CONFIG="{")) == EXIT_BAD_CONFIG
    captured = capsys.readouterr()
    assert "CONFIG is not a valid strategy config" in captured.err
    assert captured.out == ""
    assert KEY not in captured.err and SECRET not in captured.err


def test_redactor_scrubs_both_credentials() -> None:
    redact = redactor(Credentials(api_key=KEY, api_secret=SECRET))
    assert redact(f"GET /?apiKey={KEY}&sig={SECRET}") == "GET /?apiKey=[redacted]&sig=[redacted]"
    assert redactor(Credentials())("nothing to hide") == "nothing to hide"
    assert redactor(Credentials(api_key="k"))("worker keeps the k") == "worker keeps the k"


@pytest.mark.parametrize(
    ("fact", "event"),
    [
        (
            Fill(order_id="o-1", instrument=BTC, side="buy", amount=1, price=50_000, fee=25),
            "OrderFilled",
        ),
        (Position(instrument=BTC, side="long", amount=1, entry_price=50_000), "PositionChanged"),
        (
            ClosedTrade(
                instrument=BTC,
                side="long",
                amount=1,
                entry_price=50_000,
                exit_price=51_000,
                realized_pnl=974.5,
            ),
            "TradeClosed",
        ),
    ],
)
def test_broker_facts_become_reports_that_validate_against_the_events(
    fact: BrokerFact, event: str
) -> None:
    report = report_of(trading_event(fact, job_id="job-1", worker_id="worker-1"))
    line = protocol.decode(protocol.encode(report))
    assert isinstance(line, protocol.Report)
    assert line.event == event
    model = REGISTRY[event].model_validate(line.payload)
    assert (model.job_id, model.worker_id) == ("job-1", "worker-1")
    assert line.payload == {
        "job_id": "job-1",
        "worker_id": "worker-1",
        **fact.model_dump(mode="json"),
    }


def paper(facts: list[BrokerFact]) -> PaperBroker:
    return PaperBroker(
        seed="t",
        instruments=(BTC, ETH),
        settings=PaperSettings(volatility=0, spread=0),
        sink=facts.append,
    )


async def test_flatten_closes_every_position_and_cancels_resting_orders() -> None:
    facts: list[BrokerFact] = []
    broker = paper(facts)
    await broker.market_order(BTC, "buy", 2)
    await broker.market_order(ETH, "sell", 3)
    await broker.limit_order(BTC, "buy", 1, 40_000)
    broker.set_mark(BTC, 51_000)
    facts.clear()

    outcome = await flatten(broker, job_id="job-1", worker_id="worker-1")

    assert isinstance(outcome, PositionsFlattened)
    assert outcome.count == 2
    assert [(fill.instrument, fill.side, fill.amount) for fill in outcome.fills] == [
        (BTC, "sell", 2),
        (ETH, "buy", 3),
    ]
    trades = [fact for fact in facts if isinstance(fact, ClosedTrade)]
    assert outcome.realized_pnl == pytest.approx(sum(trade.realized_pnl for trade in trades))
    assert outcome.realized_pnl == pytest.approx(2_000 - 2 * 51_000 * 0.0005 - 3 * 3_000 * 0.0005)
    assert await broker.positions() == []
    assert await broker.open_orders() == []
    assert broker.sink == facts.append, "the runtime's sink is back in place"


async def test_flatten_with_nothing_open_reports_zero() -> None:
    outcome = await flatten(paper([]), job_id="job-1", worker_id="worker-1")
    assert outcome == PositionsFlattened(job_id="job-1", worker_id="worker-1", count=0)


async def test_flatten_that_cannot_close_reports_what_remains() -> None:
    broker = paper([])
    await broker.market_order(BTC, "buy", 1)
    await broker.market_order(ETH, "buy", 1)
    broker.settings = PaperSettings(volatility=0, spread=0, faults=PaperFaults(reject_orders=True))

    outcome = await flatten(broker, job_id="job-1", worker_id="worker-1")

    assert isinstance(outcome, FlattenFailed)
    assert f"closing {BTC}" in outcome.error and f"closing {ETH}" in outcome.error
    assert "rejectOrders" in outcome.error
    assert {position.instrument for position in outcome.remaining} == {BTC, ETH}


class LeakyBroker(PaperBroker):
    """An adapter whose errors quote the API key, as careless exchange clients do."""

    api_key = ""

    @classmethod
    def open(cls, *, credentials: Credentials, **kwargs: Any) -> PaperBroker:  # type: ignore[override]
        cls.api_key = credentials.api_key
        return super().open(credentials=credentials, **kwargs)

    async def positions(self) -> list[Position]:
        return [Position(instrument=BTC, side="long", amount=1, entry_price=50_000)]

    async def market_order(self, *args: Any, **kwargs: Any) -> Fill:
        raise BrokerError(f"401 for apiKey={self.api_key}")


async def test_flatten_failure_never_carries_the_credentials_to_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(BROKERS, "leaky", LeakyBroker)
    host, child = socket.socketpair()
    env = WorkerEnv.parse(environment(BROKER_ID="leaky", RUNNER_CONTROL_FD=str(child.detach())))
    host.sendall(protocol.encode(protocol.Credentials(api_key=KEY, api_secret=SECRET)))
    running = asyncio.create_task(WorkerRuntime(env).run())
    reader, writer = await asyncio.open_unix_connection(sock=host)
    assert isinstance(protocol.decode(await reader.readline()), protocol.Hello)
    writer.write(protocol.encode(protocol.Stop(flatten=True)))
    lines = [protocol.decode(raw) async for raw in reader]
    assert await asyncio.wait_for(running, 5) == EXIT_OK
    [report] = [line for line in lines
                if isinstance(line, protocol.Report) and line.event == "FlattenFailed"]
    failed = FlattenFailed.model_validate(report.payload)
    assert failed.error == f"closing {BTC}: 401 for apiKey=[redacted]"
    assert KEY not in json.dumps(report.payload)
    writer.close()


def test_worker_process_imports_neither_the_bus_nor_the_database() -> None:
    """Hosts spawn workers by the hundred: the runtime must stay light."""
    probe = (
        "import sys, services.worker.runtime, services.worker.strategies.scalping, "
        "services.worker.strategies.chaos; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    heavy = {"aio_pika", "aiormq", "sqlalchemy", "sqlmodel", "fastapi"}
    assert heavy.isdisjoint(loaded)


class Counting:
    """A strategy and a broker in one that count their ticks."""

    tick_interval = 0.0
    acts_on_ticks = True

    def __init__(self) -> None:
        self.ticks = 0

    async def start(self) -> None:
        pass

    async def tick(self) -> None:
        self.ticks += 1

    async def on_tick(self) -> None:
        self.ticks += 1


@pytest.mark.parametrize(("left", "ticks"), [(-1.0, 0), (3600.0, None)])
async def test_no_strategy_tick_once_the_lease_has_lapsed(left: float, ticks: int | None) -> None:
    """A worker resumed after a long stall must not trade before its lease watcher settles."""
    runtime = WorkerRuntime(WorkerEnv.parse(environment(
        RUNNER_LEASE_UNTIL=repr(time.monotonic() + left))))
    counting = Counting()
    trading = asyncio.ensure_future(runtime._trade(counting, counting))  # type: ignore[arg-type]
    if ticks is None:  # a live lease: it keeps ticking
        await until(lambda: counting.ticks > 2, "ticks")
        assert not trading.done()
        trading.cancel()
    else:
        await asyncio.wait_for(trading, 5)
        assert counting.ticks == ticks


async def test_the_lease_is_confirmed_by_a_renewal_after_the_hello_only() -> None:
    """A worker runs nothing until its host answers the Hello with a renewal; a host that
    froze after the spawn never does."""
    assert await HostLease(None).confirmed(0.0)  # no host, no lease to wait for
    lease = HostLease(time.monotonic() + 60)
    lease.renew(time.monotonic() + 60)  # a renewal before the Hello
    lease.renewed.clear()  # the Hello
    assert not await lease.confirmed(0.05)
    asyncio.get_running_loop().call_soon(lease.renew, time.monotonic() + 60)
    assert await lease.confirmed(5)


async def test_a_lease_first_given_after_the_start_is_watched() -> None:
    lease, settled = HostLease(None), asyncio.get_running_loop().create_future()
    watching = asyncio.ensure_future(lease.watch(settled.set_result))
    await asyncio.sleep(0)  # one step of the loop: the watcher now waits for a lease
    assert not settled.done()
    lease.renew(time.monotonic() + 0.05)
    assert await asyncio.wait_for(settled, 5) is LEASE_LAPSED
    await watching


async def test_a_strategy_that_ignores_ticks_is_not_woken_for_them() -> None:
    """Hold trades once: after its start, nothing runs until the market is looked at."""
    runtime = WorkerRuntime(WorkerEnv.parse(environment()))
    broker = PaperBroker(seed="t", instruments=[BTC])
    hold = Hold(StrategyConfig(name="h", type="hold", instruments=[BTC]), broker)
    await asyncio.wait_for(runtime._trade(hold, broker), 1)  # returns: no tick loop
    assert [p.instrument for p in await broker.positions()] == [BTC]
    assert broker.account.ticks[BTC] == 0


async def test_the_market_clock_takes_the_steps_due_and_gives_the_same_marks() -> None:
    broker = PaperBroker(seed="t", instruments=[BTC])
    twin = PaperBroker(seed="t", instruments=[BTC])
    now = [100.0]
    clock = MarketClock(broker, interval=0.01, clock=lambda: now[0])
    await clock.catch_up()
    assert broker.account.ticks[BTC] == 0
    now[0] += 0.055
    await clock.catch_up()
    assert broker.account.ticks[BTC] == 5
    for _ in range(5):
        await twin.tick()
    assert await broker.mark(BTC) == await twin.mark(BTC)
    await clock.catch_up()  # only what fell due since: no step taken twice, none ahead of time
    assert broker.account.ticks[BTC] == clock.taken == 5
    now[0] += 0.01
    await clock.catch_up()
    assert broker.account.ticks[BTC] == 6


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)
