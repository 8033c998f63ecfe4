"""A real exchange account through ccxt (`ccxt.async_support`): `deribit`, `deribit-testnet`,
and the other exchanges of the catalogue (catalogue.py says how well each is supported).

Orders survive failures: each carries a client order id (Deribit's `label`) from the worker's
journal (journal.py), written to disk before the order leaves, and looked up before any re-send
after a transient failure, so an order is never placed twice (aiohttp's own silent resend is
refused: `ResendGuard`); a permanent refusal raises `OrderRefused`. The exchange is the source of
truth for positions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import certifi
from ccxt.base import errors as ccxt_errors

from events.values import Fill, OrderSide, Position, StrategyConfig
from services.worker.brokers.base import (
    AMOUNT_EPSILON,
    Broker,
    BrokerError,
    BrokerFact,
    BrokerUnavailable,
    ClosedTrade,
    Credentials,
    CredentialsRejected,
    EventSink,
    OpenOrder,
    OrderRefused,
    Refusal,
    check_amount,
    direction,
    discard,
)
from services.worker.brokers.catalogue import BrokerSpec, parse_broker_id
from services.worker.brokers.journal import Intent, Journal

log = logging.getLogger(__name__)

T = TypeVar("T")

REQUEST_TIMEOUT_MS = 5_000  # one HTTP call; ccxt's default (10 s) outlasts a stop's grace
RESEND_MEMORY = 256  # order calls remembered by the resend guard
KEY_REJECTED = "exchange rejected the API key"


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between attempts of one call: `first`, doubling, at most `cap`, `attempts` in
    all, and never past `budget` seconds from the first."""

    attempts: int = 6
    first: float = 0.2
    cap: float = 2.0
    budget: float = 12.0

    def delay(self, attempt: int) -> float:
        return min(self.first * 2**attempt, self.cap)


def is_transient(error: BaseException) -> bool:
    """Network trouble, timeouts, rate limits, exchange busy or in maintenance: worth retrying."""
    return isinstance(error, ccxt_errors.OperationFailed)


def is_key_rejected(error: BaseException) -> bool:
    return isinstance(error, ccxt_errors.AuthenticationError) and not isinstance(
        error, ccxt_errors.PermissionDenied)


def exchange_reason(error: BaseException) -> str:
    """The exchange's own words for a refusal: its error message, without the JSON around."""
    text = str(error)
    for marker in ('"message": "', '"message":"'):
        if marker in text:
            return text.split(marker, 1)[1].split('"', 1)[0] or type(error).__name__
    return text or type(error).__name__


class ResendGuard:
    """An aiohttp client middleware refusing aiohttp's own silent resend of an order-placing
    GET: the resend would carry the same signed URL and headers as the call before it, so a
    repeat of those is the resend. Refused, it fails the call (ccxt: ExchangeNotAvailable) and
    the adapter looks the label up before sending anything again."""

    def __init__(self, paths: tuple[str, ...]) -> None:
        self.paths = paths
        self.sent: OrderedDict[tuple[str, str], None] = OrderedDict()

    async def __call__(self, request: aiohttp.ClientRequest,
                       handler: Callable[[aiohttp.ClientRequest],
                                         Awaitable[aiohttp.ClientResponse]]
                       ) -> aiohttp.ClientResponse:
        if self.paths and request.method == "GET" and request.url.path.endswith(self.paths):
            key = (str(request.url), request.headers.get("Authorization", ""))
            if key in self.sent:
                raise aiohttp.ClientConnectionError(
                    "connection lost during an order call; not resent (its label is looked up)")
            self.sent[key] = None
            while len(self.sent) > RESEND_MEMORY:
                self.sent.popitem(last=False)
        return await handler(request)


class Dialect:
    """How an exchange names client order ids and finds orders by them (ccxt's unified way)."""

    resend_guarded: tuple[str, ...] = ()  # URL path endings of GET calls that place orders
    amounts_in_quote = False  # inverse contracts sized in the quote currency (not contracts)
    burst = 1  # calls (of ccxt's cost 1) the rate limiter lets through at once: ccxt's default

    def order_params(self, label: str) -> dict[str, Any]:
        return {"clientOrderId": label}

    def label_of(self, order: Mapping[str, Any]) -> str | None:
        return order.get("clientOrderId")

    def markets_params(self, instruments: tuple[str, ...]) -> dict[str, Any]:
        return {}

    async def find(self, client: Any, market: Mapping[str, Any], label: str) -> list[dict]:
        symbol = market["symbol"]
        found = [o for o in await client.fetch_open_orders(symbol) if self.label_of(o) == label]
        if not found and client.has.get("fetchClosedOrders"):
            found = [o for o in await client.fetch_closed_orders(symbol)
                     if self.label_of(o) == label]
        return found


class DeribitDialect(Dialect):
    """Deribit: the client order id is `label` (not unique there); every call is a GET;
    inverse contracts are sized in USD."""

    resend_guarded = ("/private/buy", "/private/sell", "/private/edit")
    amounts_in_quote = True
    # Deribit's credits allow a burst of 100 calls (then 20/s, ccxt's 50 ms a cost unit): a
    # worker's start (markets, balance, positions) need not queue behind the limiter.
    burst = 10

    def order_params(self, label: str) -> dict[str, Any]:
        return {"label": label}

    def label_of(self, order: Mapping[str, Any]) -> str | None:
        return (order.get("info") or {}).get("label") or None

    def markets_params(self, instruments: tuple[str, ...]) -> dict[str, Any]:
        """Only the instruments' currency and kind, when they share them (Deribit lists
        thousands of options otherwise)."""
        currencies = {deribit_currency(name) for name in instruments}
        kinds = {deribit_kind(name) for name in instruments}
        if len(currencies) == 1 and len(kinds) == 1:
            return {"currency": currencies.pop(), "kind": kinds.pop()}
        return {}

    async def find(self, client: Any, market: Mapping[str, Any], label: str) -> list[dict]:
        answer = await client.private_get_get_order_state_by_label(
            {"currency": market["settleId"], "label": label})
        return [client.parse_order(order, market) for order in answer.get("result") or []]


def deribit_currency(instrument: str) -> str:
    """`BTC-PERPETUAL` → BTC, `BTC_USDC-PERPETUAL` → USDC (Deribit's `currency` parameter)."""
    head = instrument.split("-", 1)[0]
    return head.split("_", 1)[1] if "_" in head else head


def deribit_kind(instrument: str) -> str:
    parts = instrument.split("-")
    if len(parts) == 1:
        return "spot"
    if len(parts) >= 4 and parts[-1] in ("C", "P"):
        return "option"
    return "future"


DIALECTS: dict[str, type[Dialect]] = {"deribit": DeribitDialect}


def override_urls(urls: Any, base: str) -> Any:
    """Every URL under `urls` (ccxt's `urls['api']`) moved to `base`: its host (and a path
    prefix, if `base` has one) replace theirs, their own paths stay; a WebSocket URL takes
    `base`'s scheme as ws or wss."""
    if isinstance(urls, dict):
        return {key: override_urls(value, base) for key, value in urls.items()}
    if isinstance(urls, str) and urls.startswith(("http://", "https://", "ws://", "wss://")):
        path = urlsplit(urls)
        tail = path.path + (f"?{path.query}" if path.query else "")
        target = base.rstrip("/")
        if path.scheme in ("ws", "wss"):
            target = "ws" + target.removeprefix("http")
        return target + tail
    return urls


def client_class(exchange: str) -> type:
    """ccxt's async client class for `exchange` (importing ccxt imports every exchange: its
    package `__init__` does; the fork-server preloads it so forked workers share those pages)."""
    module = importlib.import_module(f"ccxt.async_support.{exchange}")
    return getattr(module, exchange)


def make_client(spec: BrokerSpec, credentials: Credentials | None,
                urls: Mapping[str, str]) -> Any:
    """A ccxt client for `spec`: sandbox for `-testnet`, then `urls` (RUNNER_BROKER_URLS, by
    broker id or exchange id) applied over whichever API URLs that left; rate limiter on."""
    assert spec.exchange is not None
    burst = DIALECTS.get(spec.exchange, Dialect).burst
    config: dict[str, Any] = {"enableRateLimit": True, "timeout": REQUEST_TIMEOUT_MS,
                              "tokenBucket": {"capacity": burst, "tokens": burst},
                              "ssl_context": tls_context()}
    if credentials is not None:
        config |= {"apiKey": credentials.api_key, "secret": credentials.api_secret}
    client = client_class(spec.exchange)(config)
    if spec.testnet:
        client.set_sandbox_mode(True)
    base = urls.get(spec.broker_id) or urls.get(spec.exchange)
    if base:
        client.urls["api"] = override_urls(client.urls["api"], base)
    return client


@functools.cache
def tls_context() -> ssl.SSLContext:
    """ccxt's TLS roots (certifi's), loaded once per process: the fork-server loads them for
    every worker it forks, which would otherwise each pay for loading them."""
    return ssl.create_default_context(cafile=certifi.where())


def http_session(dialect: Dialect) -> aiohttp.ClientSession:
    """The HTTP session ccxt uses (passed as its `session`): the shared TLS context and the
    resend guard."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls_context()),
                                 middlewares=(ResendGuard(dialect.resend_guarded),))


class ExchangeBroker(Broker):
    """One account on a ccxt exchange; amounts are in the exchange's order units (USD for
    Deribit's inverse perpetuals, in multiples of the contract size)."""

    live_market = True

    def __init__(self, client: Any, *, spec: BrokerSpec, instruments: tuple[str, ...],
                 journal: Journal, sink: EventSink = discard,
                 retry: RetryPolicy | None = None) -> None:
        super().__init__(sink)
        self.client = client
        self.spec = spec
        self.instruments = instruments
        self.journal = journal
        self.retry = retry or RetryPolicy()
        self.dialect = DIALECTS.get(spec.exchange or "", Dialect)()
        self.markets: dict[str, dict[str, Any]] = {}
        self.held: dict[str, Position] = {}  # the positions the exchange last showed
        self.resting: dict[str, OpenOrder] = {}  # our limit orders not yet seen filled
        self.seen_before: dict[str, float] = {}  # the positions an earlier run last saw
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def open(cls, *, worker_id: str, config: StrategyConfig, credentials: Credentials,
             state_file: Path | None, seed: str | None, sink: EventSink,
             urls: Mapping[str, str] | None = None, broker_id: str = "") -> ExchangeBroker:
        spec = parse_broker_id(broker_id)
        return cls(make_client(spec, credentials, urls or {}), spec=spec,
                   instruments=tuple(config.instruments), journal=Journal(worker_id, state_file),
                   sink=sink)

    # -- connecting ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Markets, then the balance (the credentials' check), then settle what a previous run
        left in flight; raises CredentialsRejected, BrokerUnavailable, or BrokerError naming an
        instrument the exchange does not list."""
        await self.load_markets()
        try:
            await self._call(lambda: self.client.fetch_balance(self._balance_params()),
                             "reading the balance")
        except ccxt_errors.AuthenticationError as exc:
            raise CredentialsRejected(KEY_REJECTED) from exc
        seen = dict(self.journal.state.seen)
        for intent in list(self.journal.state.pending.values()):
            seen = await self._settle_leftover(intent, seen)
        self.seen_before = seen
        self._warn_about_foreign_positions(seen, await self.positions())

    def at_start(self, positions: list[Position]) -> list[Position]:
        held = {p.instrument for p in positions}
        closed = [Position(instrument=name, side="long" if amount > 0 else "short", amount=0.0,
                           entry_price=0.0)
                  for name, amount in self.seen_before.items()
                  if amount and name not in held and name in self.instruments]
        return positions + closed

    async def load_markets(self) -> None:
        """The HTTP session and the instruments' markets (public calls only)."""
        if self._session is None:
            self._session = self.client.session = http_session(self.dialect)
        params = self.dialect.markets_params(self.instruments)
        await self._call(lambda: self.client.load_markets(False, params), "loading markets")
        for instrument in self.instruments:
            self.markets[instrument] = self._market(instrument)

    def _market(self, instrument: str) -> dict[str, Any]:
        found = self.client.markets_by_id.get(instrument) if self.client.markets_by_id else None
        if found:
            return found[0]
        if self.client.markets and instrument in self.client.markets:
            return self.client.markets[instrument]
        raise BrokerError(f"{self.spec.exchange} lists no instrument {instrument!r}")

    def _balance_params(self) -> dict[str, Any]:
        settle = {market.get("settle") for market in self.markets.values()} - {None}
        return {"code": settle.pop()} if len(settle) == 1 else {}

    async def _settle_leftover(self, intent: Intent, seen: dict[str, float]) -> dict[str, float]:
        """An order sent by an earlier run whose answer never came: report it if the exchange
        has it, else forget it (the strategy decides afresh from the positions). Returns `seen`
        (the positions the earlier run saw) with its fills counted as the runner's own."""
        orders = await self._call(
            lambda: self.dialect.find(self.client, self.markets[intent.instrument], intent.label),
            f"looking up order {intent.label}")
        for order in orders:
            log.info("order %s of an earlier run reached the exchange (%s)", intent.label,
                     order.get("status"))
            if order.get("status") == "open":
                self._remember_resting(intent, order)
            elif (order.get("filled") or 0) > 0:
                await self._report_fill(intent, order, before=None)
                sign = 1 if intent.side == "buy" else -1
                seen = seen | {intent.instrument: seen.get(intent.instrument, 0.0)
                               + sign * float(order["filled"])}
        self.journal.settled(intent.label)
        return seen

    def _warn_about_foreign_positions(self, seen: Mapping[str, float],
                                      positions: list[Position]) -> None:
        now = {p.instrument: direction(p.side) * p.amount for p in positions}
        for instrument in self.instruments:
            was, held = seen.get(instrument, 0.0), now.get(instrument, 0.0)
            if abs(was - held) > AMOUNT_EPSILON:
                log.warning(
                    "%s: the account holds %g where this runner last saw %g: a position not "
                    "opened by this runner (another runner or manual trading on this account?). "
                    "It is traded as this runner's own; use one sub-account per runner.",
                    instrument, held, was)

    # -- orders -------------------------------------------------------------------------------

    async def market_order(self, instrument: str, side: OrderSide, amount: float,
                           reduce_only: bool = False) -> Fill:
        check_amount(amount)
        before = self.held.get(instrument)
        intent = Intent(label=self.journal.next_label(), instrument=instrument, side=side,
                        amount=amount, reduce_only=reduce_only)
        order = await self._place(intent)
        if not (order.get("filled") or 0) > 0:
            self.journal.settled(intent.label)
            raise BrokerError(f"{side} {amount:g} {instrument} filled nothing "
                              f"(order {order.get('status')})")
        fill = await self._report_fill(intent, order, before=before)
        self.journal.settled(intent.label)
        return fill

    async def limit_order(self, instrument: str, side: OrderSide, amount: float,
                          price: float) -> str:
        check_amount(amount)
        before = self.held.get(instrument)
        intent = Intent(label=self.journal.next_label(), instrument=instrument, side=side,
                        amount=amount, order_type="limit", price=price)
        order = await self._place(intent)
        if order.get("status") == "open":
            self._remember_resting(intent, order)
        elif (order.get("filled") or 0) > 0:
            await self._report_fill(intent, order, before=before)
        self.journal.settled(intent.label)
        return str(order["id"])

    async def _place(self, intent: Intent) -> dict[str, Any]:
        """The order the exchange has under `intent`'s label: sent once, and after a transient
        failure looked up before it is sent again. OrderRefused when refused for good."""
        market = self.markets[intent.instrument]
        params = self.dialect.order_params(intent.label)
        if intent.reduce_only:
            params["reduceOnly"] = True
        self.journal.sending(intent)
        started = time.monotonic()
        for attempt in range(self.retry.attempts):
            try:
                if attempt:
                    found = await self.dialect.find(self.client, market, intent.label)
                    if found:
                        log.info("order %s is on the exchange already: not sent again",
                                 intent.label)
                        return found[0]
                return await self.client.create_order(
                    market["symbol"], intent.order_type, intent.side, intent.amount,
                    intent.price, params)
            except ccxt_errors.DuplicateOrderId:
                continue  # the exchange has it: the lookup on the next round finds it
            except Exception as exc:
                if is_key_rejected(exc):
                    raise CredentialsRejected(KEY_REJECTED) from exc
                if not is_transient(exc):
                    self.journal.settled(intent.label)
                    raise OrderRefused(Refusal(
                        instrument=intent.instrument, side=intent.side, amount=intent.amount,
                        order_type=intent.order_type, reason=exchange_reason(exc))) from exc
                delay = self._retry_delay(attempt, started, exc, f"order {intent.label}")
                if delay is None:
                    # Its fate is unknown: the journal keeps it, the next start settles it.
                    raise BrokerUnavailable(
                        f"order {intent.label}: {type(exc).__name__}") from exc
                await asyncio.sleep(delay)
        raise BrokerUnavailable(f"order {intent.label}: the exchange kept refusing it")

    def _retry_delay(self, attempt: int, started: float, exc: BaseException,
                     what: str) -> float | None:
        """How long to wait before the next attempt, or None when the budget is spent."""
        delay = self.retry.delay(attempt)
        if attempt + 1 >= self.retry.attempts or (
                time.monotonic() - started + delay > self.retry.budget):
            return None
        log.warning("%s: %s (%s); retrying in %.1fs", what, type(exc).__name__,
                    exchange_reason(exc)[:200], delay)
        return delay

    async def _call(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """A read (or an idempotent call), retried on transient failures with backoff."""
        started = time.monotonic()
        for attempt in range(self.retry.attempts):
            try:
                return await call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                delay = self._retry_delay(attempt, started, exc, what)
                if delay is None:
                    raise BrokerUnavailable(f"{what}: {type(exc).__name__}") from exc
                await asyncio.sleep(delay)
        raise BrokerUnavailable(what)

    async def _report_fill(self, intent: Intent, order: Mapping[str, Any],
                           before: Position | None) -> Fill:
        """Fill, the part of it that closed a position (ClosedTrade), and the position the
        exchange shows after it, to the sink."""
        filled = float(order.get("filled") or 0)
        price = float(order.get("average") or order.get("price") or 0)
        fee = float((order.get("fee") or {}).get("cost") or 0)
        fill = Fill(order_id=str(order["id"]), instrument=intent.instrument, side=intent.side,
                    amount=filled, price=price, fee=fee)
        facts: list[BrokerFact] = [fill]
        if before is not None and (before.side == "long") != (intent.side == "buy"):
            closed = min(filled, before.amount)
            part = before.model_copy(update={"amount": closed})
            facts.append(ClosedTrade(instrument=intent.instrument, side=before.side,
                                     amount=closed, entry_price=before.entry_price,
                                     exit_price=price,
                                     realized_pnl=self.pnl(part, price) - fee * closed / filled))
        try:
            after = await self._position(intent.instrument)
        except BrokerError:
            log.warning("position on %s not read after a fill", intent.instrument)
            after = None
        if after is not None:
            facts.append(after)
        for fact in facts:
            self.sink(fact)
        return fill

    def _remember_resting(self, intent: Intent, order: Mapping[str, Any]) -> None:
        self.resting[str(order["id"])] = OpenOrder(
            order_id=str(order["id"]), instrument=intent.instrument, side=intent.side,
            amount=intent.amount, price=float(intent.price or order.get("price") or 0))

    async def cancel(self, order_id: str) -> None:
        order = self.resting.get(order_id)
        symbol = self.markets[order.instrument]["symbol"] if order else None
        try:
            await self._call(lambda: self.client.cancel_order(order_id, symbol),
                             f"cancelling {order_id}")
        except ccxt_errors.OrderNotFound as exc:
            raise BrokerError(f"no open order {order_id!r}") from exc
        except ccxt_errors.InvalidOrder as exc:  # already filled or cancelled
            raise BrokerError(f"order {order_id!r} is not open: {exchange_reason(exc)}") from exc
        self.resting.pop(order_id, None)

    async def cancel_all(self) -> int:
        """Cancel this runner's resting orders on its instruments (others' are left alone)."""
        cancelled = 0
        for order in await self._open_orders(ours_only=True):
            with contextlib.suppress(BrokerError):  # filled meanwhile: `tick` reports it
                await self.cancel(order.order_id)
                cancelled += 1
        return cancelled

    async def open_orders(self) -> list[OpenOrder]:
        return await self._open_orders(ours_only=False)

    async def _open_orders(self, *, ours_only: bool) -> list[OpenOrder]:
        found: list[OpenOrder] = []
        for instrument, market in self.markets.items():
            orders = await self._call(lambda m=market: self.client.fetch_open_orders(m["symbol"]),
                                      f"reading open orders on {instrument}")
            for order in orders:
                if ours_only and not self.journal.is_ours(self.dialect.label_of(order)):
                    continue
                found.append(OpenOrder(
                    order_id=str(order["id"]), instrument=instrument, side=order["side"],
                    amount=float(order.get("remaining") or order.get("amount") or 0),
                    price=float(order.get("price") or 0)))
        return sorted(found, key=lambda order: order.order_id)

    # -- account and market -------------------------------------------------------------------

    async def positions(self) -> list[Position]:
        symbols = [market["symbol"] for market in self.markets.values()]
        raw = await self._call(lambda: self.client.fetch_positions(symbols), "reading positions")
        by_symbol = {market["symbol"]: name for name, market in self.markets.items()}
        held: dict[str, Position] = {}
        for entry in raw:
            instrument = by_symbol.get(entry.get("symbol"))
            amount = abs(float(entry.get("contracts") or 0))
            if instrument is None or amount <= AMOUNT_EPSILON:
                continue  # not ours, or flat (Deribit lists a flat position as "zero")
            held[instrument] = Position(instrument=instrument, side=entry["side"], amount=amount,
                                        entry_price=float(entry.get("entryPrice") or 0))
        self.held = held
        for instrument in self.instruments:
            position = held.get(instrument)
            self.journal.saw(instrument, direction(position.side) * position.amount
                             if position else 0.0)
        return [held[name] for name in self.instruments if name in held]

    def known_positions(self) -> list[Position]:
        return [self.held[name] for name in self.instruments if name in self.held]

    async def _position(self, instrument: str) -> Position:
        """The position on one instrument as the exchange shows it (amount 0: flat)."""
        await self.positions()
        return self.held.get(instrument) or Position(
            instrument=instrument, side="long", amount=0.0, entry_price=0.0)

    @property
    def source(self) -> str:
        """Whose prices these are: the exchange, or its sandbox."""
        return f"{self.spec.exchange}{'-testnet' if self.spec.testnet else ''}"

    def price_keys(self) -> list[tuple[str, str]]:
        return [(self.source, instrument) for instrument in self.instruments]

    async def ticker(self, instrument: str) -> dict[str, Any]:
        market = self.markets[instrument]
        return await self._call(lambda: self.client.fetch_ticker(market["symbol"]),
                                f"reading the price of {instrument}")

    async def mark(self, instrument: str) -> float:
        if self.prices is not None and (quote := self.prices.latest(self.source, instrument)):
            return quote.mark
        ticker = await self.ticker(instrument)
        for key in ("markPrice", "last", "close"):
            if ticker.get(key):
                return float(ticker[key])
        raise BrokerError(f"{self.spec.exchange} gave no price for {instrument}")

    def pnl(self, position: Position, price: float) -> float:
        """Linear contracts: price difference × amount × contract size, in the quote currency.
        Inverse ones: in the base (settlement) currency."""
        market = self.markets.get(position.instrument)
        if market is None or not position.entry_price or not price:
            return super().pnl(position, price)
        sign = direction(position.side)
        size = position.amount * (1.0 if self.dialect.amounts_in_quote
                                  else float(market.get("contractSize") or 1.0))
        if market.get("inverse"):
            return sign * size * (1 / position.entry_price - 1 / price)
        return sign * size * (price - position.entry_price)

    async def tick(self) -> None:
        """Report the fills of resting orders the exchange no longer lists as open."""
        if not self.resting:
            return
        still_open = {order.order_id for order in await self._open_orders(ours_only=True)}
        for order_id, order in list(self.resting.items()):
            if order_id in still_open:
                continue
            del self.resting[order_id]
            state = await self._call(
                lambda o=order: self.client.fetch_order(o.order_id,
                                                        self.markets[o.instrument]["symbol"]),
                f"reading order {order_id}")
            if (state.get("filled") or 0) > 0:
                intent = Intent(label="", instrument=order.instrument, side=order.side,
                                amount=order.amount, order_type="limit", price=order.price)
                await self._report_fill(intent, state, before=self.held.get(order.instrument))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()
        if self._session is not None:
            await self._session.close()
