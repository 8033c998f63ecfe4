"""The worker process: one strategy on one broker account, driven over the control channel.

Exit paths (what the host can rely on):
- `Stop(flatten=True)`: the strategy is cancelled, open orders cancelled, every position closed
  at market; a `PositionsFlattened` or `FlattenFailed` report follows the fills' reports; exit 0.
- `Stop(flatten=False)`, SIGTERM or SIGINT: the strategy is cancelled, positions and resting
  orders are left as they are; exit 0.
- EOF on the channel (the host is gone): exit `EXIT_HOST_GONE` (3), positions untouched.
- The host's lease runs out (see `protocol`): exit `EXIT_LEASE_LAPSED` (4), positions untouched;
  the strategy makes no further tick once the lease has lapsed.
- The strategy (or the market data feeding it) raises: the traceback goes to stderr; exit 1.
- The environment cannot be used (a variable missing or malformed, invalid CONFIG, unknown
  broker or strategy, invalid parameters): one line on stderr, no Hello; exit `EXIT_BAD_CONFIG`
  (2). Restarting cannot help.
- The exchange rejects the credentials (checked before Hello, by reading the balance): a
  `CannotStart` line ("exchange rejected the API key", permanent), exit
  `EXIT_CREDENTIALS_REJECTED` (5). An exchange unreachable at start: `CannotStart`, exit 1.

The worker reports the positions its account holds after its Hello (the exchange is the source
of truth), trades through `GuardedBroker` (risk.py), and takes its credentials from the first
line on the control channel, never the environment, scrubbing them from every log line.
`RUNNER_WORKER_MODE=flatten` is a flatten-only run: connect, read, Hello, close all, report, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop
from pydantic import ValidationError

from events.base import Event
from events.jobs import FlattenFailed, PositionsFlattened
from events.trading import (
    OrderFilled,
    OrderRejected,
    PositionChanged,
    RiskLimitHit,
    TradeClosed,
)
from events.values import Fill, Position, PositionMark, StrategyConfig
from services.worker import protocol
from services.worker.brokers import open_broker
from services.worker.brokers.base import (
    Broker,
    BrokerError,
    BrokerFact,
    BrokerUnavailable,
    ClosedTrade,
    Credentials,
    CredentialsRejected,
    OrderRefused,
    Refusal,
    closing_side,
    mark_position,
)
from services.worker.flatten import DEFAULT_FLATTEN_TIMEOUT, flatten
from services.worker.prices import FeedPrices
from services.worker.protocol import Beat, CannotStart, Hello, Lease, Report, Stop
from services.worker.risk import GuardedBroker, Hit, exit_due
from services.worker.strategies.base import Strategy, load_strategy

log = logging.getLogger("services.worker")

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_BAD_CONFIG = 2
EXIT_HOST_GONE = protocol.EXIT_HOST_GONE
EXIT_LEASE_LAPSED = protocol.EXIT_LEASE_LAPSED
EXIT_CREDENTIALS_REJECTED = protocol.EXIT_CREDENTIALS_REJECTED

MODES = ("trade", "flatten")

DEFAULT_HEARTBEAT_INTERVAL = 5.0
LEASE_ANSWER_TIMEOUT = 10.0  # seconds the host may take to answer the Hello with its lease
REDACTED = "[redacted]"
MIN_REDACTED = 4


class BadEnvironment(ValueError):
    """The worker's environment is missing or malformed (message names variables, not values
    of secrets)."""


@dataclass(frozen=True)
class WorkerEnv:
    """Everything a worker reads from its environment, parsed once."""

    user_id: str
    strategy_id: str
    broker_id: str
    worker_id: str
    job_id: str
    config: StrategyConfig
    control_fd: int | None
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    state_file: Path | None = None
    paper_seed: str | None = None
    lease_until: float | None = None  # time.monotonic(); None: not run by a host
    broker_urls: Mapping[str, str] = field(default_factory=dict)
    mode: str = "trade"
    flatten_timeout: float = DEFAULT_FLATTEN_TIMEOUT
    control_socket: str | None = None  # a container worker's channel: its host's socket

    @classmethod
    def parse(cls, env: Mapping[str, str]) -> WorkerEnv:
        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise BadEnvironment(f"{name} is not set")
            return value

        try:
            config = StrategyConfig.model_validate_json(required(protocol.ENV_CONFIG))
        except ValidationError as exc:
            # Described by location and reason only: never echo the raw environment.
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'CONFIG'}: {error['msg']}"
                for error in exc.errors(include_input=False, include_url=False)
            )
            raise BadEnvironment(
                f"{protocol.ENV_CONFIG} is not a valid strategy config: {problems}"
            ) from None
        control_socket = env.get(protocol.ENV_CONTROL_SOCKET, "").strip() or None
        try:
            control_fd = None if control_socket else int(required(protocol.ENV_CONTROL_FD))
        except ValueError:
            raise BadEnvironment(
                f"{protocol.ENV_CONTROL_FD} is not a file descriptor number"
            ) from None
        try:
            interval = float(env.get(protocol.ENV_HEARTBEAT_INTERVAL) or DEFAULT_HEARTBEAT_INTERVAL)
        except ValueError:
            raise BadEnvironment(
                f"{protocol.ENV_HEARTBEAT_INTERVAL} is not a number of seconds"
            ) from None
        if not 0 < interval < 3600:
            raise BadEnvironment(
                f"{protocol.ENV_HEARTBEAT_INTERVAL} must be between 0 and 3600 seconds"
            )
        state_file = env.get(protocol.ENV_STATE_FILE, "").strip()
        lease_until = env.get(protocol.ENV_LEASE_UNTIL, "").strip()
        try:
            lease = float(lease_until) if lease_until else None
        except ValueError:
            raise BadEnvironment(f"{protocol.ENV_LEASE_UNTIL} is not a monotonic time") from None
        mode = env.get(protocol.ENV_WORKER_MODE, "").strip() or "trade"
        if mode not in MODES:
            raise BadEnvironment(f"{protocol.ENV_WORKER_MODE} must be one of {', '.join(MODES)}")
        try:
            flatten_timeout = float(env.get(protocol.ENV_FLATTEN_TIMEOUT) or
                                    DEFAULT_FLATTEN_TIMEOUT)
        except ValueError:
            raise BadEnvironment(
                f"{protocol.ENV_FLATTEN_TIMEOUT} is not a number of seconds") from None
        if not 0 < flatten_timeout < 3600:
            raise BadEnvironment(
                f"{protocol.ENV_FLATTEN_TIMEOUT} must be between 0 and 3600 seconds")
        return cls(
            user_id=required(protocol.ENV_USER_ID),
            strategy_id=required(protocol.ENV_STRATEGY_ID),
            broker_id=required(protocol.ENV_BROKER_ID),
            worker_id=required(protocol.ENV_WORKER_ID),
            job_id=required(protocol.ENV_JOB_ID),
            config=config,
            control_fd=control_fd,
            heartbeat_interval=interval,
            state_file=Path(state_file) if state_file else None,
            paper_seed=env.get(protocol.ENV_PAPER_SEED) or None,
            lease_until=lease,
            broker_urls=broker_urls(env.get(protocol.ENV_BROKER_URLS, "")),
            mode=mode,
            flatten_timeout=flatten_timeout,
            control_socket=control_socket,
        )


def broker_urls(raw: str) -> dict[str, str]:
    """RUNNER_BROKER_URLS: a JSON object of exchange (or broker) id → API base URL."""
    if not raw.strip():
        return {}
    try:
        urls = json.loads(raw)
    except ValueError:
        urls = None
    if not (isinstance(urls, dict) and all(
            isinstance(k, str) and isinstance(v, str) and v.startswith(("http://", "https://"))
            for k, v in urls.items())):
        raise BadEnvironment(f"{protocol.ENV_BROKER_URLS} must be a JSON object of id → "
                             "http(s) base URL, e.g. {\"deribit\": \"http://127.0.0.1:9000\"}")
    return urls


class Redactor:
    """`text -> text` with every credential it has learnt replaced by a marker.

    Values shorter than `MIN_REDACTED` are left alone: they cannot be told apart from ordinary
    text (an API key of "k" would blank every k in the log) and are no real secret anyway.
    """

    def __init__(self) -> None:
        self._secrets: list[str] = []

    def learn(self, credentials: Credentials) -> None:
        self._secrets += [
            s for s in (credentials.api_key, credentials.api_secret) if len(s) >= MIN_REDACTED
        ]

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


def redactor(credentials: Credentials) -> Redactor:
    redact = Redactor()
    redact.learn(credentials)
    return redact


class _RedactingFormatter(logging.Formatter):
    def __init__(self, fmt: str, redact: Callable[[str], str]) -> None:
        super().__init__(fmt)
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


def configure_logging(label: str, redact: Callable[[str], str]) -> None:
    """Logs go to stderr (the host points it at a file); stdout stays unused."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _RedactingFormatter(f"%(asctime)s %(levelname)s {label} %(name)s: %(message)s", redact)
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def trading_event(fact: BrokerFact, *, job_id: str, worker_id: str) -> Event:
    """The trading event a broker fact is reported as."""
    ids = {"job_id": job_id, "worker_id": worker_id}
    if isinstance(fact, Fill):
        return OrderFilled(**ids, **fact.model_dump())
    if isinstance(fact, ClosedTrade):
        return TradeClosed(**ids, **fact.model_dump())
    if isinstance(fact, Position):
        return PositionChanged(**ids, **fact.model_dump())
    raise TypeError(f"not a broker fact: {type(fact).__name__}")


def report_of(event: Event) -> Report:
    return Report(event=event.type_name(), payload=event.model_dump(mode="json"))


class Channel:
    """The worker's end of the control socket: JSON lines out.

    Writing to a host that has gone away is not an error here; the reader sees the EOF and the
    worker exits with EXIT_HOST_GONE.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def send(self, line: Hello | CannotStart | Beat | Report) -> None:
        if not self.writer.is_closing():
            self.writer.write(protocol.encode(line))

    async def flush(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def close(self) -> None:
        await self.flush()
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), timeout=1.0)


class _HostGone:
    """The control channel reached EOF."""


@dataclass(frozen=True)
class _Crashed:
    error: BaseException


class _LeaseLapsed:
    """The host's lease ran out before it was renewed."""


@dataclass(frozen=True)
class _Flattened:
    """A flatten-only run has finished."""

    event: PositionsFlattened | FlattenFailed


HOST_GONE = _HostGone()
LEASE_LAPSED = _LeaseLapsed()
Outcome = Stop | _HostGone | _LeaseLapsed | _Crashed | _Flattened


@dataclass
class HostLease:
    """Until when this worker may run (a `time.monotonic()` instant; None: no limit);
    `renewed` is set by each renewal."""

    until: float | None
    renewed: asyncio.Event = field(default_factory=asyncio.Event)

    def renew(self, until: float) -> None:
        self.until = until if self.until is None else max(self.until, until)
        self.renewed.set()

    async def confirmed(self, timeout: float) -> bool:
        """Whether it is renewed within `timeout` seconds (at once without a lease)."""
        if self.until is None:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.renewed.wait(), timeout)
        return self.renewed.is_set()

    def lapsed(self) -> bool:
        return self.until is not None and time.monotonic() >= self.until

    async def watch(self, settle: Callable[[Outcome], None]) -> None:
        """Settle LEASE_LAPSED once the lease runs out without renewal (a lease first given
        after the start, too)."""
        while True:
            if self.until is None:
                await self.renewed.wait()
            elif (left := self.until - time.monotonic()) <= 0:
                settle(LEASE_LAPSED)
                return
            else:
                await asyncio.sleep(left)


@dataclass
class MarketClock:
    """The market's steps for a strategy that does not act on ticks (`acts_on_ticks` False),
    taken in one go whenever the market is looked at (a heartbeat's marks, a flatten) instead of
    every `interval`, so an idle worker sleeps between heartbeats; the seeded walk gives the same
    marks either way."""

    broker: Broker
    interval: float
    clock: Callable[[], float] = time.monotonic
    origin: float | None = None  # the clock's time at the start: now by default
    taken: int = 0

    def __post_init__(self) -> None:
        if self.origin is None:
            self.origin = self.clock()

    async def catch_up(self) -> None:
        due = int((self.clock() - self.origin) / self.interval)  # type: ignore[operator]
        while self.taken < due:
            self.taken += 1
            await self.broker.tick()


class WorkerRuntime:
    """Runs one worker until a stop, a lost host or a crash; `run()` returns the exit code.
    `redact` (the log's) learns the credentials when they come."""

    def __init__(self, env: WorkerEnv, redact: Redactor | None = None) -> None:
        self.env = env
        self.redact = redact or Redactor()
        self.lease = HostLease(env.lease_until)
        self.strategy: Strategy | None = None  # None in a flatten-only run
        self.prices: FeedPrices | None = None  # what its host's feed relays
        self.flattening = False

    async def run(self) -> int:
        env = self.env
        try:
            sock = self._channel_socket()
        except OSError as exc:
            log.error("control channel %s is unusable: %s",
                      env.control_socket or f"fd {env.control_fd}", exc)
            return EXIT_BAD_CONFIG
        # A strategy's own subprocesses must not hold the channel open after this process dies.
        sock.set_inheritable(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        channel = Channel(writer)
        try:
            return await self._serve(reader, channel)
        finally:
            await channel.close()

    def _channel_socket(self) -> socket.socket:
        """The worker's end of its channel: the descriptor it was given, or a connection to
        its host's socket (a container worker)."""
        if self.env.control_socket is None:
            return socket.socket(fileno=self.env.control_fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.env.control_socket)
        except OSError:
            sock.close()
            raise
        return sock

    async def _serve(self, reader: asyncio.StreamReader, channel: Channel) -> int:
        env = self.env

        def emit(event: Event) -> None:
            channel.send(report_of(event))

        def report(fact: BrokerFact) -> None:
            emit(trading_event(fact, job_id=env.job_id, worker_id=env.worker_id))

        credentials = await self._first_line(reader)
        if not isinstance(credentials, Credentials):
            return credentials
        try:
            broker = open_broker(
                env.broker_id,
                worker_id=env.worker_id,
                config=env.config,
                credentials=credentials,
                state_file=env.state_file,
                seed=env.paper_seed,
                sink=report,
                urls=env.broker_urls,
            )
            guarded = GuardedBroker(broker, env.config.risk_management,
                                    self._on_refused(emit), time.monotonic)
            if env.mode == "trade":
                self.strategy = load_strategy(env.config.type)(env.config, guarded)
        except (LookupError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            return EXIT_BAD_CONFIG
        try:
            return await self._run(broker, guarded, reader, channel, emit)
        finally:
            with contextlib.suppress(Exception):
                await broker.close()

    async def _run(self, broker: Broker, guarded: GuardedBroker, reader: asyncio.StreamReader,
                   channel: Channel, emit: Callable[[Event], None]) -> int:
        env, strategy = self.env, self.strategy
        reached = await self._connect(broker, channel)
        if isinstance(reached, int):
            return reached

        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[Outcome] = loop.create_future()

        def settle(result: Outcome) -> None:
            if not outcome.done():
                outcome.set_result(result)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, settle, Stop(flatten=False))

        self.lease.renewed.clear()  # the host answers the Hello with a renewal
        channel.send(Hello(pid=os.getpid()))
        for position in broker.at_start(reached):  # what the account really holds now
            broker.sink(position)
        if keys := broker.price_keys():  # its host relays its feed's prices of these
            self.prices = broker.prices = FeedPrices()
            channel.send(protocol.Subscribe(keys=tuple(keys)))
        await channel.flush()
        log.info(
            "started: %s %s (%s) on broker %s, instruments %s, holding %s",
            "flatten-only run of" if strategy is None else "strategy",
            env.strategy_id,
            env.config.type,
            env.broker_id,
            ",".join(env.config.instruments),
            ", ".join(f"{p.side} {p.amount:g} {p.instrument}" for p in reached) or "nothing",
        )

        listening = asyncio.create_task(self._listen(reader, settle), name="control")
        simulated = strategy is not None and not strategy.acts_on_ticks and not broker.live_market
        market = MarketClock(broker, strategy.tick_interval) if simulated else None
        running: list[asyncio.Task[Any]] = [listening]
        work: asyncio.Task[Any] | None = None
        # Nothing runs before the host answers the Hello with its lease as it is now.
        if await self._answered(outcome):
            # The first beat goes out before the strategy starts: it tells the host "alive".
            running.append(asyncio.create_task(self._beat(broker, channel, market, emit),
                                               name="heartbeat"))
            work = asyncio.create_task(self._flatten(broker) if strategy is None
                                       else self._trade(strategy, guarded), name="work")
            running += (work, asyncio.create_task(self.lease.watch(settle), name="lease"))

            def on_work_done(task: asyncio.Task[Any]) -> None:
                if task.cancelled():
                    return
                if (error := task.exception()) is not None:
                    settle(_Crashed(error))
                elif strategy is None:
                    settle(_Flattened(task.result()))

            work.add_done_callback(on_work_done)
        else:
            settle(LEASE_LAPSED)  # unless the host settled it first
        try:
            result = await outcome
            if work is not None and strategy is None and isinstance(result, Stop):
                # already flattening: finish it
                with contextlib.suppress(Exception):
                    result = _Flattened(await work)
            if work is not None and not isinstance(result, _Flattened):
                await _cancel(work)
            if isinstance(result, _Crashed):
                log.error("strategy %s crashed", env.config.type, exc_info=result.error)
                return EXIT_CRASHED
            if isinstance(result, _HostGone):
                log.warning("control channel closed: host gone, exiting without touching positions")
                return EXIT_HOST_GONE
            if isinstance(result, _LeaseLapsed):
                log.warning("the host's lease lapsed: exiting without touching positions")
                return EXIT_LEASE_LAPSED
            if isinstance(result, _Flattened):
                emit(result.event)
                log.info("flatten-only run: %s", result.event.type_name())
            elif result.flatten:
                if market is not None:  # close at today's prices, not the start's
                    try:
                        await market.catch_up()
                    except Exception:
                        log.warning("could not move the market before flattening", exc_info=True)
                event = await self._flatten(broker)
                emit(event)
                log.info("stop: %s", event.type_name())
            else:
                log.info("stop: positions left open")
            return EXIT_OK
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await _cancel(*running)

    async def _answered(self, outcome: asyncio.Future[Outcome]) -> bool:
        """Whether the host renewed the lease after the Hello (within LEASE_ANSWER_TIMEOUT)
        before anything settled the run."""
        confirming = asyncio.ensure_future(self.lease.confirmed(LEASE_ANSWER_TIMEOUT))
        await asyncio.wait((confirming, outcome), return_when=asyncio.FIRST_COMPLETED)
        await _cancel(confirming)
        return not (outcome.done() or confirming.cancelled()) and confirming.result()

    async def _connect(self, broker: Broker, channel: Channel) -> list[Position] | int:
        """The account reached and its positions read; or, when it cannot be, a CannotStart
        line sent and the exit code."""
        try:
            await broker.connect()
            return await broker.positions()
        except CredentialsRejected as exc:
            reason, permanent, code = str(exc), True, EXIT_CREDENTIALS_REJECTED
        except BrokerUnavailable as exc:
            reason, permanent, code = f"exchange unreachable: {exc}", False, EXIT_CRASHED
        except BrokerError as exc:
            reason, permanent, code = str(exc), True, EXIT_BAD_CONFIG
        except Exception as exc:
            log.warning("could not reach the account", exc_info=True)
            reason, permanent, code = f"could not reach the account: {exc}", False, EXIT_CRASHED
        reason = self.redact(reason)
        log.error("cannot start: %s", reason)
        channel.send(CannotStart(reason=reason, permanent=permanent))
        await channel.flush()
        return code

    def _on_refused(self, emit: Callable[[Event], None]) -> Callable[[Refusal, Hit | None],
                                                                     Awaitable[None]]:
        ids = {"job_id": self.env.job_id, "worker_id": self.env.worker_id}

        async def on_refused(refusal: Refusal, hit: Hit | None) -> None:
            """Report a refused order (RiskLimitHit or OrderRejected) and tell the strategy."""
            if hit is not None:
                emit(RiskLimitHit(**ids, rule=hit.rule, action="refused",
                                  instrument=hit.instrument, limit=hit.limit, value=hit.value,
                                  detail=hit.detail))
            else:
                emit(OrderRejected(**ids, instrument=refusal.instrument, side=refusal.side,
                                   amount=refusal.amount, order_type=refusal.order_type,
                                   reason=self.redact(refusal.reason)))
            log.warning("order refused by the %s: %s %g %s: %s", refusal.by, refusal.side,
                        refusal.amount, refusal.instrument, self.redact(refusal.reason))
            if self.strategy is not None:
                await self.strategy.on_order_refused(refusal)

        return on_refused

    async def _flatten(self, broker: Broker) -> PositionsFlattened | FlattenFailed:
        self.flattening = True  # the risk watch closes nothing from now on
        event = await flatten(broker, job_id=self.env.job_id, worker_id=self.env.worker_id,
                              timeout=self.env.flatten_timeout)
        if isinstance(event, FlattenFailed):
            # Adapter error text is free-form: it must not carry the credentials out.
            event = event.model_copy(update={"error": self.redact(event.error)})
        return event

    async def _trade(self, strategy: Strategy, broker: Broker) -> None:
        """The strategy's start, then its ticks. An order refused for good (`OrderRefused`) is
        reported and the strategy told already: it ends that call, not the worker."""
        with contextlib.suppress(OrderRefused):
            await strategy.start()
        if not strategy.acts_on_ticks:
            return  # its market moves by `MarketClock` when looked at (or on its own)
        while True:
            await asyncio.sleep(strategy.tick_interval)
            if self.lease.lapsed():  # e.g. resumed after a long stall: the watcher settles
                return
            await broker.tick()
            with contextlib.suppress(OrderRefused):
                await strategy.on_tick()

    async def _beat(self, broker: Broker, channel: Channel, market: MarketClock | None,
                    emit: Callable[[Event], None]) -> None:
        """A Beat at once (the host learns it is alive without waiting an interval), then every
        interval on a fixed cadence (a late one does not shift the next). Each beat's marks are
        then checked against the stop-loss and take-profit."""
        loop = asyncio.get_running_loop()
        interval = self.env.heartbeat_interval
        due = loop.time()
        marks: tuple[PositionMark, ...] = ()
        while True:
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            due = max(due + interval, loop.time())
            priced: list[tuple[Position, float]] = []
            try:
                if market is not None:
                    await market.catch_up()
                priced = [(p, await broker.mark(p.instrument)) for p in await broker.positions()]
                marks = tuple(mark_position(p, price, broker.pnl(p, price)) for p, price in priced)
            except Exception:
                # The heartbeat proves the worker is alive; stale marks beat a missing beat.
                log.warning("could not mark positions; repeating the last marks", exc_info=True)
            channel.send(Beat(at=datetime.now(UTC), positions=marks))
            await channel.flush()
            await self._enforce_exits(broker, priced, emit)

    async def _enforce_exits(self, broker: Broker, priced: list[tuple[Position, float]],
                             emit: Callable[[Event], None]) -> None:
        """Close at market each position past its stop-loss or take-profit (RiskLimitHit
        "closed"); a close that fails is tried again at the next beat."""
        limits = self.env.config.risk_management
        for position, price in priced:
            hit = exit_due(limits, position, price)
            if hit is None or self.flattening:
                continue
            log.warning("%s: %s; closing at market", position.instrument, hit.detail)
            try:
                await broker.market_order(position.instrument, closing_side(position),
                                          position.amount, reduce_only=True)
            except Exception:
                log.warning("could not close %s; trying again at the next beat",
                            position.instrument, exc_info=True)
                continue
            emit(RiskLimitHit(job_id=self.env.job_id, worker_id=self.env.worker_id,
                              rule=hit.rule, action="closed", instrument=hit.instrument,
                              limit=hit.limit, value=hit.value, detail=hit.detail))
            if self.strategy is not None:
                await self.strategy.on_forced_close(position.instrument, hit.rule, hit.detail)

    async def _first_line(self, reader: asyncio.StreamReader) -> Credentials | int:
        """The credentials, the host's first line (a lease may come before them); or the exit
        code when they never come: the host is gone (EOF), stopped it (0), or sent nonsense."""
        while True:
            if (raw := await _host_line(reader)) is None:
                log.warning("control channel closed before the credentials came: host gone")
                return EXIT_HOST_GONE
            try:
                line = protocol.decode(raw)
            except protocol.ProtocolViolation:
                line = None
            if isinstance(line, protocol.Credentials):
                credentials = Credentials(api_key=line.api_key, api_secret=line.api_secret)
                self.redact.learn(credentials)
                return credentials
            if isinstance(line, Lease):
                self.lease.renew(line.until)
            elif isinstance(line, Stop):
                log.info("stopped before it started")
                return EXIT_OK
            else:
                log.error("the host's first line was not the credentials")
                return EXIT_BAD_CONFIG

    async def _listen(
        self, reader: asyncio.StreamReader, settle: Callable[[Outcome], None]
    ) -> None:
        while True:
            if (raw := await _host_line(reader)) is None:
                settle(HOST_GONE)
                return
            try:
                line = protocol.decode(raw)
            except protocol.ProtocolViolation:
                log.warning("ignoring an unreadable control line (%d bytes)", len(raw))
                continue
            if isinstance(line, Stop):
                settle(line)
                return
            if isinstance(line, Lease):
                self.lease.renew(line.until)
                continue
            if isinstance(line, protocol.Price):
                if self.prices is not None:
                    self.prices.update(line)
                continue
            log.warning("ignoring an unexpected %r line from the host", line.type)


async def _host_line(reader: asyncio.StreamReader) -> bytes | None:
    """The host's next whole line on the control channel; None once it is closed."""
    try:
        raw = await reader.readline()
    except (ConnectionError, ValueError):
        return None
    return raw if raw.endswith(b"\n") else None


async def _cancel(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_worker(env: Mapping[str, str], confined: Sequence[str] = ()) -> int:
    """Run a worker from its environment until it stops; returns the process exit code.
    `confined`: the layers it was confined by (`services.worker.confinement`), for its log.

    Callable in a freshly forked child (a fork-server) as well as from `__main__`.
    """
    redact = Redactor()
    configure_logging(f"worker={env.get(protocol.ENV_WORKER_ID, '?')}", redact)
    if confined:
        log.info("confined: %s", "; ".join(confined))
    try:
        parsed = WorkerEnv.parse(env)
    except BadEnvironment as exc:
        log.error("bad worker environment: %s", exc)
        return EXIT_BAD_CONFIG
    try:
        return uvloop.run(WorkerRuntime(parsed, redact).run())
    except Exception:
        log.exception("worker runtime failed")
        return EXIT_CRASHED
