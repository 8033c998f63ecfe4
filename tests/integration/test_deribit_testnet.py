"""Opt-in: the adapter against the real Deribit testnet (test.deribit.com), with an account of
your own. Runs only when RUNNER_TEST_DERIBIT_KEY and RUNNER_TEST_DERIBIT_SECRET are set (a
testnet API key with trade scope); it buys 10 USD of BTC-PERPETUAL and closes it again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from events.values import StrategyConfig
from services.worker.brokers import open_broker
from services.worker.brokers.base import BrokerFact, Credentials, CredentialsRejected
from services.worker.brokers.exchange import ExchangeBroker

KEY = os.environ.get("RUNNER_TEST_DERIBIT_KEY", "")
SECRET = os.environ.get("RUNNER_TEST_DERIBIT_SECRET", "")
BTC = "BTC-PERPETUAL"

pytestmark = pytest.mark.skipif(
    not (KEY and SECRET),
    reason="live Deribit testnet test: set RUNNER_TEST_DERIBIT_KEY and "
           "RUNNER_TEST_DERIBIT_SECRET to run it")


def account_on_testnet(tmp_path: Path, secret: str, facts: list[BrokerFact]) -> ExchangeBroker:
    broker = open_broker("deribit-testnet", worker_id="worker-live-test",
                         config=StrategyConfig(name="live", type="hold", instruments=(BTC,)),
                         credentials=Credentials(KEY, secret),
                         state_file=tmp_path / "journal.json", sink=facts.append)
    assert isinstance(broker, ExchangeBroker)
    return broker


async def test_a_round_trip_on_the_deribit_testnet(tmp_path: Path) -> None:
    facts: list[BrokerFact] = []
    broker = account_on_testnet(tmp_path, SECRET, facts)
    try:
        await broker.connect()
        held = {p.instrument: p for p in await broker.positions()}.get(BTC)
        before = (held.amount if held.side == "long" else -held.amount) if held else 0.0
        fill = await broker.market_order(BTC, "buy", 10)
        assert fill.amount == 10 and fill.price > 0
        after = {p.instrument: p for p in await broker.positions()}[BTC]
        assert (after.amount if after.side == "long" else -after.amount) == before + 10
        assert [type(f).__name__ for f in facts] == ["Fill", "Position"]
        await broker.market_order(BTC, "sell", 10, reduce_only=before == 0)
        assert await broker.mark(BTC) > 0
    finally:
        await broker.close()


async def test_a_wrong_secret_is_rejected_by_the_testnet(tmp_path: Path) -> None:
    broker = account_on_testnet(tmp_path, "not-" + SECRET, [])
    with pytest.raises(CredentialsRejected):
        await broker.connect()
    await broker.close()
