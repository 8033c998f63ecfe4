"""Broker ids, the exchange catalogue, and the adapter's pure parts (no network)."""

from __future__ import annotations

import json

import pytest
from ccxt.base import errors as ccxt_errors

from services.worker.brokers import UnknownBroker, broker_spec
from services.worker.brokers.catalogue import CATALOGUE_FILE, Support, generate
from services.worker.brokers.exchange import (
    deribit_currency,
    deribit_kind,
    exchange_reason,
    is_key_rejected,
    is_transient,
    override_urls,
)
from services.worker.runtime import BadEnvironment, broker_urls


@pytest.mark.parametrize(("broker_id", "kind", "exchange", "testnet", "support"), [
    ("paper", "paper", None, False, Support.VERIFIED),
    ("deribit", "exchange", "deribit", False, Support.VERIFIED),
    ("deribit-testnet", "exchange", "deribit", True, Support.VERIFIED),
    ("paper-deribit", "live-paper", "deribit", False, Support.VERIFIED),
    ("binanceusdm", "exchange", "binanceusdm", False, Support.UNVERIFIED),
    ("bybit-testnet", "exchange", "bybit", True, Support.UNVERIFIED),
])
def test_broker_ids_name_an_adapter_an_exchange_and_an_environment(
        broker_id: str, kind: str, exchange: str | None, testnet: bool, support: Support) -> None:
    spec = broker_spec(broker_id)
    assert (spec.kind, spec.exchange, spec.testnet, spec.support) == (
        kind, exchange, testnet, support)


@pytest.mark.parametrize(("broker_id", "why"), [
    ("nasdaq", "unknown broker 'nasdaq'"),
    ("bitfinex-testnet", "bitfinex has no testnet"),
    ("paper-nasdaq", "unknown broker 'paper-nasdaq'"),
    ("bitbank", "unknown broker 'bitbank'"),  # a ccxt exchange without positions
    ("", "unknown broker ''"),
])
def test_unsupported_ids_are_refused_naming_them(broker_id: str, why: str) -> None:
    with pytest.raises(UnknownBroker, match=why):
        broker_spec(broker_id)


def test_the_catalogue_matches_the_installed_ccxt() -> None:
    """After a ccxt upgrade: `python -m services.worker.brokers.catalogue` rewrites it."""
    assert json.loads(CATALOGUE_FILE.read_text()) == generate()


def test_a_base_url_replaces_every_urls_origin_and_keeps_their_paths() -> None:
    urls = {"rest": "https://test.deribit.com",
            "fapiPublic": "https://fapi.binance.com/fapi/v1",
            "nested": {"private": "https://api.x.com/v2/private?x=1"},
            "ws": "wss://www.deribit.com/ws/api/v2", "logo": "deribit.png"}
    assert override_urls(urls, "http://127.0.0.1:9000/") == {
        "rest": "http://127.0.0.1:9000", "fapiPublic": "http://127.0.0.1:9000/fapi/v1",
        "nested": {"private": "http://127.0.0.1:9000/v2/private?x=1"},
        "ws": "ws://127.0.0.1:9000/ws/api/v2", "logo": "deribit.png"}
    assert override_urls({"ws": "wss://a.b/ws"}, "https://gw.example")["ws"] == (
        "wss://gw.example/ws")


@pytest.mark.parametrize(("error", "transient", "key"), [
    (ccxt_errors.RequestTimeout("t"), True, False),
    (ccxt_errors.ExchangeNotAvailable("down"), True, False),
    (ccxt_errors.DDoSProtection("too_many_requests"), True, False),
    (ccxt_errors.OnMaintenance("m"), True, False),
    (ccxt_errors.InsufficientFunds("f"), False, False),
    (ccxt_errors.InvalidOrder("i"), False, False),
    (ccxt_errors.AuthenticationError("a"), False, True),
    (ccxt_errors.PermissionDenied("p"), False, False),  # e.g. an open-orders limit
])
def test_errors_are_told_apart(error: Exception, transient: bool, key: bool) -> None:
    assert (is_transient(error), is_key_rejected(error)) == (transient, key)


def test_the_exchanges_reason_is_its_message() -> None:
    error = ccxt_errors.InsufficientFunds(
        'deribit {"jsonrpc": "2.0", "error": {"message": "not_enough_funds", "code": 10009}}')
    assert exchange_reason(error) == "not_enough_funds"
    assert exchange_reason(ccxt_errors.InvalidOrder("amount too small")) == "amount too small"


@pytest.mark.parametrize(("instrument", "currency", "kind"), [
    ("BTC-PERPETUAL", "BTC", "future"),
    ("ETH-27DEC24", "ETH", "future"),
    ("BTC_USDC-PERPETUAL", "USDC", "future"),
    ("BTC-27DEC24-60000-C", "BTC", "option"),
    ("ETH_USDC", "USDC", "spot"),
])
def test_deribit_currency_and_kind_of_an_instrument(instrument: str, currency: str,
                                                    kind: str) -> None:
    assert (deribit_currency(instrument), deribit_kind(instrument)) == (currency, kind)


def test_broker_urls_are_a_json_object_of_http_urls() -> None:
    assert broker_urls('{"deribit": "http://127.0.0.1:9000"}') == {
        "deribit": "http://127.0.0.1:9000"}
    assert broker_urls("") == {}
    for bad in ('["http://x"]', '{"deribit": "ftp://x"}', "{", '{"deribit": 9000}'):
        with pytest.raises(BadEnvironment, match="RUNNER_BROKER_URLS"):
            broker_urls(bad)
