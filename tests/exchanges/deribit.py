"""A local Deribit for tests: API v2 over HTTP, as ccxt's real client calls it.

Every call is a GET to `/api/v2/<public|private>/<method>?<query>` answered with a JSON-RPC
envelope (`{"jsonrpc": "2.0", "result": …, "usIn", "usOut", "usDiff", "testnet"}`, or `"error":
{"code", "message"}`). Private calls must carry `Authorization: deri-hmac-sha256
id=<key>,ts=<ms>,sig=<hex>,nonce=<n>`, the signature an HMAC-SHA256 under the account's secret
over `ts\\nnonce\\nGET\\n<path?query>\\n\\n`; a bad one is answered HTTP 401, error 13004
`invalid_credentials`, as the real exchange does.

It keeps each account's balance, positions (inverse perpetuals sized in USD, in multiples of
the contract size), orders (labels are not unique: a second order with a label is placed, as on
Deribit) and trades, and fills market orders at the bid or ask around a price the test sets.

Public tickers are also served over Deribit's WebSocket JSON-RPC (`/ws/api/v2`,
`public/subscribe` to `ticker.<instrument>.<interval>`, notifications on every price change),
as ccxt.pro's client uses it.

Test controls: `set_price`, `fail_next` (rate limited, dropped connection before or after the
call was carried out, busy), `down`/`up`, an account's `equity` (insufficient funds), and
`orders_labelled` / `calls` / `public_peers` to count what reached it and over how many
connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

Fault = Literal["rate_limit", "drop", "lost_answer", "busy"]


class RpcError(Exception):
    """An error answer: JSON-RPC `code` and `message`, with its HTTP status."""

    def __init__(self, code: int, message: str, status: int = 400, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status, self.data = code, message, status, data


@dataclass
class Instrument:
    name: str
    base: str
    quote: str
    settlement: str
    contract_size: float
    min_trade_amount: float
    tick_size: float
    price: float
    spread: float  # bid to ask, in price units
    taker: float = 0.0005
    maker: float = 0.0
    kind: str = "future"
    settlement_period: str = "perpetual"

    @property
    def inverse(self) -> bool:
        return self.settlement != self.quote

    def _tick(self, price: float) -> float:
        return round(round(price / self.tick_size) * self.tick_size, 10)

    @property
    def bid(self) -> float:
        return self._tick(self.price - self.spread / 2)

    @property
    def ask(self) -> float:
        return self._tick(self.price + self.spread / 2)

    def notional(self, amount: float, price: float) -> float:
        """An amount's value in the settlement currency (what margin and fees are counted in)."""
        return amount / price if self.inverse else amount * price

    def pnl(self, amount: float, entry: float, exit: float) -> float:
        """P&L of a long `amount` (negative: short) from `entry` to `exit`, settlement currency."""
        if self.inverse:
            return amount * (1 / entry - 1 / exit)
        return amount * (exit - entry)


def default_instruments() -> list[Instrument]:
    return [
        Instrument("BTC-PERPETUAL", "BTC", "USD", "BTC", 10, 10, 0.5, 50_000.0, 1.0),
        Instrument("ETH-PERPETUAL", "ETH", "USD", "ETH", 1, 1, 0.05, 3_000.0, 0.1),
        Instrument("BTC_USDC-PERPETUAL", "BTC", "USDC", "USDC", 0.001, 0.001, 0.5, 50_000.0, 1.0,
                   taker=0.0005, maker=0.0),
    ]


@dataclass
class Holding:
    size: float = 0.0  # signed, in order units (USD for inverse perpetuals)
    average_price: float = 0.0
    realized: float = 0.0


@dataclass
class Account:
    key: str
    secret: str
    equity: dict[str, float]
    positions: dict[str, Holding] = field(default_factory=dict)
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)  # every order, by id
    trades: list[dict[str, Any]] = field(default_factory=list)


def _us() -> int:
    return time.time_ns() // 1000


def _ms() -> int:
    return time.time_ns() // 1_000_000


def _flag(value: str | None) -> bool:
    return (value or "").lower() == "true"


class LocalDeribit:
    """The exchange, its accounts and its test controls; `start()` serves it on a free port."""

    def __init__(self, instruments: list[Instrument] | None = None,
                 initial_margin: float = 0.02) -> None:
        self.instruments = {i.name: i for i in instruments or default_instruments()}
        self.initial_margin = initial_margin
        self.accounts: dict[str, Account] = {}
        self.faults: deque[tuple[Fault, str | None]] = deque()
        self.calls: Counter[str] = Counter()  # "private/buy" → how many reached it
        self.signed_by: list[tuple[str, str]] = []  # (method, key) of each authenticated call
        self.public_peers: set[tuple[str, int]] = set()  # client connections of public calls
        self.is_down = False
        self.tickers: dict[str, set[tuple[web.WebSocketResponse, str]]] = {}  # ws subscribers
        self._pushes: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0
        self.changed = asyncio.Event()  # set on every order change (tests wait on it)

    # -- test controls ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_account(self, key: str, secret: str, **equity: float) -> Account:
        account = Account(key, secret, equity or {"BTC": 1.0, "ETH": 10.0, "USDC": 100_000.0})
        self.accounts[key] = account
        return account

    def set_price(self, instrument: str, price: float) -> None:
        """Move the market; resting limit orders it crosses fill (as maker) at their price."""
        market = self.instruments[instrument]
        market.price = price
        for ws, channel in list(self.tickers.get(instrument, ())):
            self._push(ws, channel, market)
        for account in self.accounts.values():
            for order in list(account.orders.values()):
                if order["instrument_name"] != instrument or order["order_state"] != "open":
                    continue
                crossed = (market.ask <= order["price"] if order["direction"] == "buy"
                           else market.bid >= order["price"])
                if crossed:
                    self._fill(account, market, order, order["amount"], order["price"], maker=True)
                    order["order_state"] = "filled"

    def fail_next(self, count: int, fault: Fault, method: str | None = None) -> None:
        """The next `count` calls (of `method`, e.g. "private/buy", if given) fail so:
        `rate_limit` (HTTP 429, 10028 too_many_requests), `busy` (10040 retry), `drop` (the
        connection closes before the call is carried out), `lost_answer` (carried out, then the
        connection closes before the answer)."""
        self.faults.extend([(fault, method)] * count)

    def down(self) -> None:
        """Every call's connection is dropped until `up()`."""
        self.is_down = True

    def up(self) -> None:
        self.is_down = False

    def orders_labelled(self, label: str) -> list[dict[str, Any]]:
        return [order for account in self.accounts.values() for order in account.orders.values()
                if order.get("label") == label]

    def position(self, key: str, instrument: str) -> float:
        holding = self.accounts[key].positions.get(instrument)
        return holding.size if holding else 0.0

    def orders_of(self, key: str) -> list[dict[str, Any]]:
        return list(self.accounts[key].orders.values())

    def connections_from(self, pid: int) -> int:
        """TCP connections process `pid` has open to this exchange now (from /proc)."""
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        with open("/proc/net/tcp") as table:
            rows = [row.split() for row in list(table)[1:]]
        return sum(1 for row in rows  # remote port, ESTABLISHED, one of its sockets
                   if int(row[2].split(":")[1], 16) == self.port and row[3] == "01"
                   and row[9] in inodes)

    # -- serving ---------------------------------------------------------------------------

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_get("/api/v2/{api}/{method}", self._handle)
        app.router.add_get("/ws/api/v2", self._websocket)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", port)
        await self._site.start()
        server = self._site._server  # the bound port (0 asks the OS for a free one)
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.url

    async def stop(self) -> None:
        for subscribers in self.tickers.values():
            for ws, _ in list(subscribers):
                await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        api, method = request.match_info["api"], request.match_info["method"]
        name = f"{api}/{method}"
        started = _us()
        fault = self._take_fault(name)
        if self.is_down or fault == "drop":
            return self._drop(request)
        try:
            if fault == "rate_limit":
                raise RpcError(10028, "too_many_requests", status=429)
            if fault == "busy":
                raise RpcError(10040, "retry")
            params = dict(request.query)
            if api == "private":
                account = self._authenticate(request, method)
                handler = PRIVATE.get(method)
                if handler is None:
                    raise RpcError(-32601, "Method not found")
                self.calls[name] += 1
                result = handler(self, account, params)
            elif api == "public":
                handler = PUBLIC.get(method)
                if handler is None:
                    raise RpcError(-32601, "Method not found")
                self.calls[name] += 1
                peer = request.transport.get_extra_info("peername") if request.transport else None
                if peer:
                    self.public_peers.add(tuple(peer[:2]))
                result = handler(self, params)
            else:
                raise RpcError(-32601, "Method not found", status=404)
        except RpcError as error:
            body: dict[str, Any] = {"jsonrpc": "2.0",
                                    "error": {"message": error.message, "code": error.code}}
            if error.data is not None:
                body["error"]["data"] = error.data
            return self._answer(body, started, status=error.status)
        if fault == "lost_answer":
            return self._drop(request)
        return self._answer({"jsonrpc": "2.0", "result": result}, started)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        """Deribit's JSON-RPC over WebSocket, public tickers only."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.public_peers.add(tuple(peer[:2]))
        try:
            async for message in ws:
                call = json.loads(message.data)
                method, params = call.get("method"), call.get("params") or {}
                answer: dict[str, Any] = {"jsonrpc": "2.0", "id": call.get("id")}
                if method == "public/subscribe":
                    channels = params.get("channels") or []
                    answer["result"] = channels
                    await ws.send_str(json.dumps(answer))
                    for channel in channels:
                        kind, _, rest = channel.partition(".")
                        name = rest.rsplit(".", 1)[0]
                        if kind == "ticker" and name in self.instruments:
                            self.calls["ws/ticker"] += 1
                            self.tickers.setdefault(name, set()).add((ws, channel))
                            self._push(ws, channel, self.instruments[name])
                    continue
                answer["result"] = "ok" if method else None
                await ws.send_str(json.dumps(answer))
        finally:
            for subscribers in self.tickers.values():
                subscribers.difference_update({s for s in subscribers if s[0] is ws})
        return ws

    def _push(self, ws: web.WebSocketResponse, channel: str, market: Instrument) -> None:
        note = {"jsonrpc": "2.0", "method": "subscription",
                "params": {"channel": channel, "data": self._ticker(market)}}
        task = asyncio.ensure_future(ws.send_str(json.dumps(note)))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    def _take_fault(self, name: str) -> Fault | None:
        for index, (fault, method) in enumerate(self.faults):
            if method is None or method == name:
                del self.faults[index]
                return fault
        return None

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        """Close the connection without an answer (the client sees the server disconnect)."""
        if request.transport is not None:
            request.transport.close()
        raise asyncio.CancelledError

    @staticmethod
    def _answer(body: dict[str, Any], started: int, status: int = 200) -> web.Response:
        now = _us()
        body |= {"usIn": started, "usOut": now, "usDiff": now - started, "testnet": True}
        return web.json_response(body, status=status)

    def _authenticate(self, request: web.Request, method: str) -> Account:
        scheme, _, fields = request.headers.get("Authorization", "").partition(" ")
        parts = dict(part.split("=", 1) for part in fields.split(",") if "=" in part)
        account = self.accounts.get(parts.get("id", ""))
        if scheme != "deri-hmac-sha256" or account is None or not {"ts", "sig", "nonce"} <= set(
                parts):
            raise RpcError(13004, "invalid_credentials", status=401)
        signed = f"{parts['ts']}\n{parts['nonce']}\n{request.method}\n{request.raw_path}\n\n"
        expected = hmac.new(account.secret.encode(), signed.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, parts["sig"]):
            raise RpcError(13004, "invalid_credentials", status=401)
        self.signed_by.append((method, account.key))
        return account

    # -- trading ---------------------------------------------------------------------------

    def _market(self, params: dict[str, str]) -> Instrument:
        name = params.get("instrument_name", "")
        market = self.instruments.get(name)
        if market is None:
            raise RpcError(10020, "invalid_or_unsupported_instrument",
                           data={"param": "instrument_name", "reason": "wrong format"})
        return market

    def _place(self, account: Account, direction: str, params: dict[str, str]) -> dict[str, Any]:
        market = self._market(params)
        try:
            amount = float(params.get("amount", ""))
        except ValueError:
            raise RpcError(10021, "invalid_amount") from None
        steps = amount / market.min_trade_amount
        if not (math.isfinite(amount) and amount > 0) or abs(steps - round(steps)) > 1e-9:
            raise RpcError(10021, "invalid_amount")
        kind = params.get("type", "limit")
        reduce_only = _flag(params.get("reduce_only"))
        label = params.get("label", "")
        if len(label) > 64:
            raise RpcError(-32602, "Invalid params", data={"param": "label", "reason": "too long"})
        held = account.positions.get(market.name, Holding())
        sign = 1 if direction == "buy" else -1
        if reduce_only:
            reducible = abs(held.size) if held.size * sign < 0 else 0.0
            amount = min(amount, reducible)
        else:
            after = held.size + sign * amount
            if abs(after) > abs(held.size):
                needed = market.notional(abs(after), market.price) * self.initial_margin
                if needed > account.equity.get(market.settlement, 0.0):
                    raise RpcError(10009, "not_enough_funds")
        now = _ms()
        order: dict[str, Any] = {
            "order_id": f"{market.settlement}-{next(self._ids)}",
            "instrument_name": market.name,
            "direction": direction,
            "amount": float(params.get("amount")),
            "filled_amount": 0.0,
            "average_price": 0.0,
            "price": "market_price",
            "order_type": kind,
            "order_state": "open",
            "label": label,
            "reduce_only": reduce_only,
            "post_only": False,
            "time_in_force": "good_til_cancelled",
            "creation_timestamp": now,
            "last_update_timestamp": now,
            "commission": 0.0,
            "api": True,
            "web": False,
            "replaced": False,
            "is_liquidation": False,
            "risk_reducing": False,
            "mmp": False,
            "max_show": float(params.get("amount")),
        }
        account.orders[order["order_id"]] = order
        trades: list[dict[str, Any]] = []
        touch = market.ask if direction == "buy" else market.bid
        if kind == "market":
            if amount > 0:
                trades.append(self._fill(account, market, order, amount, touch, maker=False))
            order["order_state"] = "filled" if amount > 0 else "cancelled"
        elif kind == "limit":
            try:
                price = float(params["price"])
            except (KeyError, ValueError):
                raise RpcError(10023, "invalid_price") from None
            order["price"] = price
            if amount == 0:
                order["order_state"] = "cancelled"
            elif (direction == "buy" and price >= market.ask) or (
                    direction == "sell" and price <= market.bid):
                trades.append(self._fill(account, market, order, amount, touch, maker=False))
                order["order_state"] = "filled"
        else:
            raise RpcError(-32602, "Invalid params", data={"param": "type"})
        self.changed.set()
        return {"order": dict(order), "trades": trades}

    def _fill(self, account: Account, market: Instrument, order: dict[str, Any], amount: float,
              price: float, *, maker: bool) -> dict[str, Any]:
        sign = 1 if order["direction"] == "buy" else -1
        held = account.positions.setdefault(market.name, Holding())
        fee = market.notional(amount, price) * (market.maker if maker else market.taker)
        if held.size * sign >= 0:  # opening or adding
            before = abs(held.size)
            size = before + amount
            if market.inverse:  # the USD-weighted harmonic mean, as inverse contracts average
                coins = (before / held.average_price if before else 0.0) + amount / price
                held.average_price = size / coins
            else:
                held.average_price = (before * held.average_price + amount * price) / size
            held.size += sign * amount
        else:  # reducing, perhaps flipping
            closed = min(amount, abs(held.size))
            gained = market.pnl(math.copysign(closed, held.size), held.average_price, price)
            held.realized += gained
            account.equity[market.settlement] = account.equity.get(market.settlement, 0.0) + gained
            held.size += sign * amount
            if abs(held.size) < 1e-12:
                held.size, held.average_price = 0.0, 0.0
            elif held.size * sign > 0:  # flipped: the rest opened at this price
                held.average_price = price
        account.equity[market.settlement] = account.equity.get(market.settlement, 0.0) - fee
        filled_before = order["filled_amount"]
        order["filled_amount"] = filled_before + amount
        order["average_price"] = (
            (order["average_price"] * filled_before + price * amount) / order["filled_amount"])
        order["commission"] += fee
        order["last_update_timestamp"] = _ms()
        trade = {
            "trade_id": f"{next(self._ids)}",
            "trade_seq": len(account.trades) + 1,
            "timestamp": _ms(),
            "tick_direction": 0,
            "state": "filled",
            "reduce_only": order["reduce_only"],
            "price": price,
            "post_only": False,
            "order_type": order["order_type"],
            "order_id": order["order_id"],
            "matching_id": None,
            "mark_price": market.price,
            "liquidity": "M" if maker else "T",
            "label": order["label"],
            "instrument_name": market.name,
            "index_price": market.price,
            "fee_currency": market.settlement,
            "fee": fee,
            "direction": order["direction"],
            "amount": amount,
        }
        account.trades.append(trade)
        self.changed.set()
        return trade

    # -- views -----------------------------------------------------------------------------

    def _ticker(self, market: Instrument) -> dict[str, Any]:
        return {
            "timestamp": _ms(),
            "stats": {"volume_usd": 1e8, "volume": 2000.0, "price_change": 0.0,
                      "low": market.price, "high": market.price},
            "state": "open",
            "settlement_price": market.price,
            "open_interest": 1e9,
            "min_price": market.price * 0.97,
            "max_price": market.price * 1.03,
            "mark_price": market.price,
            "last_price": market.price,
            "interest_value": 0.0,
            "instrument_name": market.name,
            "index_price": market.price,
            "funding_8h": 0.0,
            "estimated_delivery_price": market.price,
            "current_funding": 0.0,
            "best_bid_price": market.bid,
            "best_bid_amount": 100_000.0,
            "best_ask_price": market.ask,
            "best_ask_amount": 100_000.0,
        }

    def _instrument(self, market: Instrument) -> dict[str, Any]:
        return {
            "tick_size": market.tick_size,
            "tick_size_steps": [],
            "taker_commission": market.taker,
            "maker_commission": market.maker,
            "settlement_period": market.settlement_period,
            "settlement_currency": market.settlement,
            "quote_currency": market.quote,
            "counter_currency": market.quote,
            "base_currency": market.base,
            "price_index": f"{market.base.lower()}_{market.quote.lower()}",
            "min_trade_amount": market.min_trade_amount,
            "max_liquidation_commission": 0.0075,
            "max_leverage": 50,
            "kind": market.kind,
            "is_active": True,
            "instrument_name": market.name,
            "instrument_id": abs(hash(market.name)) % 1_000_000,
            "expiration_timestamp": 32503708800000,
            "creation_timestamp": 1534242287000,
            "contract_size": market.contract_size,
            "block_trade_tick_size": 0.01,
            "block_trade_min_trade_amount": 200000,
            "block_trade_commission": 0.00025,
            "rfq": False,
        }

    def _position(self, market: Instrument, held: Holding) -> dict[str, Any]:
        direction = "buy" if held.size > 0 else "sell" if held.size < 0 else "zero"
        floating = (market.pnl(held.size, held.average_price, market.price)
                    if held.size else 0.0)
        margin = market.notional(abs(held.size), market.price) * self.initial_margin
        return {
            "instrument_name": market.name,
            "kind": market.kind,
            "direction": direction,
            "size": held.size,
            "size_currency": market.notional(held.size, market.price) if held.size else 0.0,
            "average_price": held.average_price,
            "mark_price": market.price,
            "index_price": market.price,
            "floating_profit_loss": floating,
            "realized_profit_loss": held.realized,
            "total_profit_loss": floating + held.realized,
            "initial_margin": margin,
            "maintenance_margin": margin / 2,
            "open_orders_margin": 0.0,
            "leverage": 50,
            "delta": held.size / market.price if held.size else 0.0,
            "settlement_price": market.price,
            "estimated_liquidation_price": None,
            "interest_value": 0.0,
            "realized_funding": 0.0,
        }

    def _summary(self, account: Account, currency: str) -> dict[str, Any]:
        equity = account.equity.get(currency, 0.0)
        margin = sum(
            self.instruments[name].notional(abs(h.size), self.instruments[name].price)
            * self.initial_margin
            for name, h in account.positions.items()
            if self.instruments[name].settlement == currency)
        return {
            "currency": currency,
            "equity": equity,
            "balance": equity,
            "margin_balance": equity,
            "available_funds": equity - margin,
            "available_withdrawal_funds": equity - margin,
            "initial_margin": margin,
            "maintenance_margin": margin / 2,
            "projected_initial_margin": margin,
            "projected_maintenance_margin": margin / 2,
            "session_upl": 0.0,
            "session_rpl": 0.0,
            "total_pl": 0.0,
            "futures_pl": 0.0,
            "options_pl": 0.0,
            "fee_balance": 0.0,
            "delta_total": 0.0,
            "portfolio_margining_enabled": False,
            "limits": {},
        }

    def _in_currency(self, instrument: str, currency: str | None) -> bool:
        if currency in (None, "", "any"):
            return True
        market = self.instruments[instrument]
        return currency in (market.settlement, market.base)


# -- public methods --------------------------------------------------------------------------

CURRENCIES = ("BTC", "ETH", "USDC")


def _get_currencies(ex: LocalDeribit, params: dict[str, str]) -> list[dict[str, Any]]:
    return [{"currency": code, "currency_long": code, "coin_type": code, "min_confirmations": 1,
             "min_withdrawal_fee": 0.0001, "withdrawal_fee": 0.0001, "network_fee": 0.0001,
             "withdrawal_priorities": [], "fee_precision": 4, "apr": 0.0,
             "in_cross_collateral_pool": False, "network_currency": code}
            for code in CURRENCIES]


def _get_instruments(ex: LocalDeribit, params: dict[str, str]) -> list[dict[str, Any]]:
    currency, kind = params.get("currency"), params.get("kind")
    return [ex._instrument(market) for market in ex.instruments.values()
            if ex._in_currency(market.name, currency) and kind in (None, "", market.kind)]


def _ticker(ex: LocalDeribit, params: dict[str, str]) -> dict[str, Any]:
    return ex._ticker(ex._market(params))


def _get_order_book(ex: LocalDeribit, params: dict[str, str]) -> dict[str, Any]:
    market = ex._market(params)
    return ex._ticker(market) | {"change_id": next(ex._ids),
                                 "bids": [[market.bid, 100_000.0]],
                                 "asks": [[market.ask, 100_000.0]]}


def _get_time(ex: LocalDeribit, params: dict[str, str]) -> int:
    return _ms()


def _status(ex: LocalDeribit, params: dict[str, str]) -> dict[str, Any]:
    return {"locked": "false", "locked_indices": []}


PUBLIC: dict[str, Callable[[LocalDeribit, dict[str, str]], Any]] = {
    "get_currencies": _get_currencies,
    "get_instruments": _get_instruments,
    "ticker": _ticker,
    "get_order_book": _get_order_book,
    "get_time": _get_time,
    "status": _status,
}


# -- private methods -------------------------------------------------------------------------

def _account_summary(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    currency = params.get("currency")
    if currency not in CURRENCIES:
        raise RpcError(-32602, "Invalid params", data={"param": "currency"})
    return ex._summary(account, currency)


def _account_summaries(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    return {"summaries": [ex._summary(account, code) for code in CURRENCIES], "id": 1,
            "email": "test@example.com", "username": account.key, "type": "main"}


def _buy(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    return ex._place(account, "buy", params)


def _sell(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    return ex._place(account, "sell", params)


def _cancel(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    order = account.orders.get(params.get("order_id", ""))
    if order is None:
        raise RpcError(10004, "order_not_found")
    if order["order_state"] != "open":
        raise RpcError(11044, "not_open_order")
    order["order_state"] = "cancelled"
    order["last_update_timestamp"] = _ms()
    ex.changed.set()
    return dict(order)


def _cancel_where(ex: LocalDeribit, account: Account, keep: Callable[[dict], bool]) -> int:
    cancelled = 0
    for order in account.orders.values():
        if order["order_state"] == "open" and keep(order):
            order["order_state"] = "cancelled"
            cancelled += 1
    ex.changed.set()
    return cancelled


def _cancel_all(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    return _cancel_where(ex, account, lambda order: True)


def _cancel_all_by_instrument(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    name = ex._market(params).name
    return _cancel_where(ex, account, lambda order: order["instrument_name"] == name)


def _cancel_all_by_currency(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    currency = params.get("currency")
    return _cancel_where(ex, account,
                         lambda order: ex._in_currency(order["instrument_name"], currency))


def _open_orders(ex: LocalDeribit, account: Account, keep: Callable[[dict], bool]) -> list:
    return [dict(order) for order in account.orders.values()
            if order["order_state"] == "open" and keep(order)]


def _open_by_currency(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    currency = params.get("currency")
    return _open_orders(ex, account, lambda o: ex._in_currency(o["instrument_name"], currency))


def _open_by_instrument(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    name = ex._market(params).name
    return _open_orders(ex, account, lambda order: order["instrument_name"] == name)


def _open_by_label(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    currency, label = params.get("currency"), params.get("label")
    return _open_orders(ex, account, lambda order: order["label"] == label
                        and ex._in_currency(order["instrument_name"], currency))


def _open(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    return _open_orders(ex, account, lambda order: True)


def _order_state(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    order = account.orders.get(params.get("order_id", ""))
    if order is None:
        raise RpcError(10004, "order_not_found")
    return dict(order)


def _order_state_by_label(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    currency, label = params.get("currency"), params.get("label")
    if not label:
        raise RpcError(-32602, "Invalid params", data={"param": "label"})
    return [dict(order) for order in account.orders.values()
            if order["label"] == label and ex._in_currency(order["instrument_name"], currency)]


def _positions(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    currency, kind = params.get("currency"), params.get("kind")
    return [ex._position(ex.instruments[name], held) for name, held in account.positions.items()
            if ex._in_currency(name, currency)
            and kind in (None, "", ex.instruments[name].kind)]


def _position(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    market = ex._market(params)
    return ex._position(market, account.positions.get(market.name, Holding()))


def _user_trades_by_order(ex: LocalDeribit, account: Account, params: dict[str, str]) -> Any:
    return [t for t in account.trades if t["order_id"] == params.get("order_id")]


PRIVATE: dict[str, Callable[[LocalDeribit, Account, dict[str, str]], Any]] = {
    "get_account_summary": _account_summary,
    "get_account_summaries": _account_summaries,
    "buy": _buy,
    "sell": _sell,
    "cancel": _cancel,
    "cancel_all": _cancel_all,
    "cancel_all_by_instrument": _cancel_all_by_instrument,
    "cancel_all_by_currency": _cancel_all_by_currency,
    "get_open_orders": _open,
    "get_open_orders_by_currency": _open_by_currency,
    "get_open_orders_by_instrument": _open_by_instrument,
    "get_open_orders_by_label": _open_by_label,
    "get_order_state": _order_state,
    "get_order_state_by_label": _order_state_by_label,
    "get_positions": _positions,
    "get_position": _position,
    "get_user_trades_by_order": _user_trades_by_order,
}
