"""The ccxt adapter against the local Deribit, through the real ccxt client: signed calls, fills
and positions as the exchange shows them, retries, idempotent orders, refusals, restarts."""

from __future__ import annotations

import logging
from pathlib import Path

import ccxt.async_support as ccxt
import pytest

from events.values import Position, StrategyConfig
from services.worker.brokers import open_broker
from services.worker.brokers.base import (
    BrokerFact,
    BrokerUnavailable,
    ClosedTrade,
    Credentials,
    CredentialsRejected,
    OrderRefused,
)
from services.worker.brokers.exchange import ExchangeBroker, RetryPolicy
from services.worker.brokers.journal import Intent, Journal
from tests.exchanges.deribit import LocalDeribit

BTC = "BTC-PERPETUAL"
ETH = "ETH-PERPETUAL"
KEY, SECRET = "alice-key-7H3K", "alice-secret-Q8vZ-0042"
QUICK = RetryPolicy(attempts=4, first=0.05, cap=0.2, budget=2.0)


def config(*instruments: str) -> StrategyConfig:
    return StrategyConfig(name="t", type="hold", instruments=instruments or (BTC,))


async def account(deribit: LocalDeribit, tmp_path: Path, *instruments: str, secret: str = SECRET,
                  facts: list[BrokerFact] | None = None, worker_id: str = "worker-1"
                  ) -> ExchangeBroker:
    broker = open_broker("deribit", worker_id=worker_id, config=config(*instruments),
                         credentials=Credentials(KEY, secret),
                         state_file=tmp_path / f"{worker_id}.json",
                         sink=(facts.append if facts is not None else lambda _: None),
                         urls={"deribit": deribit.url})
    assert isinstance(broker, ExchangeBroker)
    broker.retry = QUICK
    return broker


@pytest.fixture
def alice(deribit: LocalDeribit) -> None:
    deribit.add_account(KEY, SECRET)


async def test_a_signed_order_reaches_the_exchange_with_the_accounts_key(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    facts: list[BrokerFact] = []
    broker = await account(deribit, tmp_path, facts=facts)
    try:
        await broker.connect()
        fill = await broker.market_order(BTC, "buy", 30)
    finally:
        await broker.close()
    assert (fill.instrument, fill.side, fill.amount, fill.price) == (BTC, "buy", 30, 50_000.5)
    assert fill.fee == pytest.approx(30 / 50_000.5 * 0.0005)
    assert ("buy", KEY) in deribit.signed_by
    [order] = deribit.orders_of(KEY)
    assert order["label"].startswith("worker-1.") and order["order_type"] == "market"
    assert deribit.position(KEY, BTC) == 30
    assert facts == [fill, Position(instrument=BTC, side="long", amount=30, entry_price=50_000.5)]


async def test_a_rejected_key_is_credentials_rejected_without_the_secret(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    broker = await account(deribit, tmp_path, secret="not-alices-secret-1234")
    with pytest.raises(CredentialsRejected) as raised:
        await broker.connect()
    await broker.close()
    assert str(raised.value) == "exchange rejected the API key"
    assert deribit.calls["private/buy"] == 0


async def test_rate_limited_order_is_retried_and_placed_once(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    broker = await account(deribit, tmp_path)
    await broker.connect()
    deribit.fail_next(2, "rate_limit", "private/buy")
    fill = await broker.market_order(BTC, "buy", 10)
    await broker.close()
    assert fill.amount == 10
    assert len(deribit.orders_of(KEY)) == 1
    assert deribit.calls["private/buy"] == 1  # the two refused calls placed nothing


async def test_an_answer_lost_with_its_connection_is_found_by_label_not_sent_again(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    broker = await account(deribit, tmp_path)
    await broker.connect()
    deribit.fail_next(1, "lost_answer", "private/buy")
    fill = await broker.market_order(BTC, "buy", 20)
    await broker.close()
    [order] = deribit.orders_of(KEY)
    assert fill.order_id == order["order_id"] and fill.amount == 20
    assert deribit.position(KEY, BTC) == 20
    assert deribit.calls["private/get_order_state_by_label"] == 1


async def test_a_bare_ccxt_client_places_such_an_order_twice(
        deribit: LocalDeribit, alice: None) -> None:
    """Why the adapter guards against aiohttp's silent resend (FIELD-NOTES): without it the
    lost answer's GET is sent again by aiohttp itself, and Deribit places it again."""
    client = ccxt.deribit({"apiKey": KEY, "secret": SECRET})
    client.urls["api"] = {"rest": deribit.url}
    try:
        await client.load_markets()
        deribit.fail_next(1, "lost_answer", "private/buy")
        await client.create_order("BTC/USD:BTC", "market", "buy", 10, None, {"label": "bare.1"})
    finally:
        await client.close()
    assert len(deribit.orders_labelled("bare.1")) == 2


async def test_insufficient_funds_is_a_refusal_with_the_exchanges_reason(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    deribit.accounts[KEY].equity["BTC"] = 0.0001
    broker = await account(deribit, tmp_path)
    await broker.connect()
    with pytest.raises(OrderRefused) as raised:
        await broker.market_order(BTC, "buy", 1_000)
    await broker.close()
    assert raised.value.refusal.reason == "not_enough_funds"
    assert raised.value.refusal.by == "exchange"
    assert deribit.orders_of(KEY) == [] and broker.journal.state.pending == {}


async def test_less_than_one_contract_is_refused_before_it_is_sent(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    broker = await account(deribit, tmp_path)
    await broker.connect()
    with pytest.raises(OrderRefused, match="minimum amount precision of 10"):
        await broker.market_order(BTC, "buy", 5)  # BTC-PERPETUAL: 10 USD contracts
    await broker.close()
    assert deribit.calls["private/buy"] == 0


async def test_an_exchange_that_stays_down_is_unavailable_after_the_retry_budget(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    broker = await account(deribit, tmp_path)
    await broker.connect()
    deribit.down()
    with pytest.raises(BrokerUnavailable):
        await broker.market_order(BTC, "buy", 10)
    await broker.close()
    assert [i.instrument for i in broker.journal.state.pending.values()] == [BTC], (
        "its fate unknown, the order stays in the journal for the next start to settle")


async def test_a_restart_settles_the_order_its_predecessor_left_in_flight(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    first = await account(deribit, tmp_path)
    await first.connect()
    deribit.down()
    with pytest.raises(BrokerUnavailable):
        await first.market_order(BTC, "buy", 10)
    await first.close()
    [label] = first.journal.state.pending
    # Meanwhile the order did reach the exchange (as if only its answers were lost).
    deribit.up()
    await place_directly(deribit, "buy", 10, label)

    facts: list[BrokerFact] = []
    second = await account(deribit, tmp_path, facts=facts)
    await second.connect()
    await second.close()
    assert len(deribit.orders_labelled(label)) == 1, "settled, not sent again"
    assert [type(f).__name__ for f in facts] == ["Fill", "Position"]
    assert second.journal.state.pending == {}
    assert second.journal.next_label() != label, "the sequence continues"


async def place_directly(deribit: LocalDeribit, side: str, amount: float, label: str) -> None:
    client = ccxt.deribit({"apiKey": KEY, "secret": SECRET})
    client.urls["api"] = {"rest": deribit.url}
    try:
        await client.load_markets()
        await client.create_order("BTC/USD:BTC", "market", side, amount, None, {"label": label})
    finally:
        await client.close()


async def test_a_reduce_only_close_goes_flat_and_reports_the_closed_trade(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    facts: list[BrokerFact] = []
    broker = await account(deribit, tmp_path, facts=facts)
    await broker.connect()
    await broker.market_order(BTC, "buy", 100)
    deribit.set_price(BTC, 52_000)
    facts.clear()
    fill = await broker.market_order(BTC, "sell", 100, reduce_only=True)
    await broker.close()
    assert deribit.orders_of(KEY)[-1]["reduce_only"] is True
    assert deribit.position(KEY, BTC) == 0
    assert broker.known_positions() == []
    [trade] = [f for f in facts if isinstance(f, ClosedTrade)]
    assert (trade.entry_price, trade.exit_price) == (pytest.approx(50_000.5), fill.price)
    gross = 100 * (1 / 50_000.5 - 1 / fill.price)  # inverse: P&L in BTC
    assert trade.realized_pnl == pytest.approx(gross - fill.fee)
    assert facts[-1] == Position(instrument=BTC, side="long", amount=0, entry_price=0)


async def test_flat_positions_the_exchange_still_lists_are_not_positions(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    broker = await account(deribit, tmp_path, BTC, ETH)
    await broker.connect()
    await broker.market_order(ETH, "sell", 3)
    await broker.market_order(BTC, "buy", 10)
    await broker.market_order(BTC, "sell", 10)  # flat: Deribit lists it with direction "zero"
    positions = await broker.positions()
    await broker.close()
    assert positions == [Position(instrument=ETH, side="short", amount=3, entry_price=2_999.95)]


async def test_a_position_not_opened_by_the_runner_is_reported_and_warned_about(
        deribit: LocalDeribit, alice: None, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    await place_directly(deribit, "sell", 40, "by-hand")
    broker = await account(deribit, tmp_path)
    with caplog.at_level(logging.WARNING):
        await broker.connect()
        positions = await broker.positions()
    await broker.close()
    assert positions == [Position(instrument=BTC, side="short", amount=40, entry_price=49_999.5)]
    assert "not opened by this runner" in caplog.text
    assert "one sub-account per runner" in caplog.text


async def test_a_resting_limit_order_reports_its_fill_once_the_market_crosses_it(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    facts: list[BrokerFact] = []
    broker = await account(deribit, tmp_path, facts=facts)
    await broker.connect()
    order_id = await broker.limit_order(BTC, "buy", 50, 48_000)
    assert [o.order_id for o in await broker.open_orders()] == [order_id]
    await broker.tick()
    assert facts == []
    deribit.set_price(BTC, 47_000)
    await broker.tick()
    await broker.close()
    assert [type(f).__name__ for f in facts] == ["Fill", "Position"]
    assert (facts[0].order_id, facts[0].price, facts[0].amount) == (order_id, 48_000, 50)


async def test_cancel_all_cancels_only_this_runners_orders(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    broker = await account(deribit, tmp_path)
    await broker.connect()
    await broker.limit_order(BTC, "buy", 10, 40_000)
    client = ccxt.deribit({"apiKey": KEY, "secret": SECRET})
    client.urls["api"] = {"rest": deribit.url}
    await client.load_markets()
    await client.create_order("BTC/USD:BTC", "limit", "buy", 10, 41_000, {"label": "manual"})
    await client.close()
    assert await broker.cancel_all() == 1
    left = await broker.open_orders()
    await broker.close()
    assert [o.price for o in left] == [41_000]


def test_labels_continue_across_restarts_and_differ_across_journals(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    first = Journal("worker-1", path)
    labels = [first.next_label(), first.next_label()]
    first.sending(Intent(label=labels[1], instrument=BTC, side="buy", amount=10))
    again = Journal("worker-1", path)
    assert again.next_label().endswith(".3") and set(again.state.pending) == {labels[1]}
    elsewhere = Journal("worker-1", tmp_path / "other-host.json")
    assert elsewhere.next_label() not in labels, "a new journal never reuses an old label"
    assert all(len(label) <= 64 for label in labels)
    assert len(Journal("w" * 100, None).next_label()) <= 64


async def test_a_position_closed_while_the_runner_was_down_is_reported_flat_at_start(
        deribit: LocalDeribit, alice: None, tmp_path: Path) -> None:
    first = await account(deribit, tmp_path)
    await first.connect()
    await first.market_order(BTC, "buy", 20)
    await first.close()
    await place_directly(deribit, "sell", 20, "closed-by-hand")
    second = await account(deribit, tmp_path)
    await second.connect()
    reached = second.at_start(await second.positions())
    await second.close()
    assert reached == [Position(instrument=BTC, side="long", amount=0, entry_price=0)]
