"""Runners on a real exchange account, end to end over HTTP: the whole system as processes,
its workers trading the local Deribit (tests/exchanges) through the real ccxt client, reached
through RUNNER_BROKER_URLS."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from services.cli.client import GatewayClient, GatewayError
from tests.e2e.conftest import System, start_body
from tests.exchanges.deribit import LocalDeribit

pytestmark = pytest.mark.asyncio(loop_scope="session")

BTC = "BTC-PERPETUAL"


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def exchange() -> AsyncIterator[LocalDeribit]:
    exchange = LocalDeribit()
    await exchange.start()
    yield exchange
    await exchange.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory,
                 exchange: LocalDeribit) -> AsyncIterator[System]:
    system = System(tmp_path_factory.mktemp("markets"),
                    RUNNER_BROKER_URLS=json.dumps({"deribit": exchange.url}))
    await system.start()
    yield system
    await system.stop()


def on_deribit(key: str, secret: str, amount: float = 30, **parameters: Any) -> dict[str, Any]:
    body = start_body("hold", (BTC,), amount=amount, **parameters)
    return body | {"brokerId": "deribit", "credentials": {"apiKey": key, "apiSecret": secret}}


async def trader(system: System, exchange: LocalDeribit) -> tuple[GatewayClient, str, str]:
    _, client = await system.user(tier="pro")
    key, secret = f"key-{uuid.uuid4().hex[:10]}", f"secret-{uuid.uuid4().hex}"
    exchange.add_account(key, secret)
    return client, key, secret


async def test_a_runner_on_deribit_trades_reconciles_after_kill_9_and_flattens(
        system: System, exchange: LocalDeribit) -> None:
    client, key, secret = await trader(system, exchange)
    started = await client.start(**on_deribit(key, secret, amount=30))
    worker_id = started["workerId"]
    entry = await system.wait_for_worker(
        client, worker_id, lambda e: e["worker"]["status"] == "running" and e["positions"])
    assert [(p["instrumentName"], p["side"], p["amount"]) for p in entry["positions"]] == [
        (BTC, "long", 30)]
    assert ("buy", key) in exchange.signed_by
    [order] = exchange.orders_of(key)

    os.kill(entry["worker"]["pid"], signal.SIGKILL)
    await system.wait_for_worker(client, worker_id, lambda e: e["worker"]["restartCount"] == 1
                                 and e["worker"]["status"] == "running", timeout=30)
    assert exchange.orders_of(key) == [order], "reconciled from the exchange: no second order"

    stopped = await client.stop(worker_id, flatten=True)
    assert stopped["flattenedPositions"] == 1
    close = exchange.orders_of(key)[-1]
    assert (close["direction"], close["amount"], close["reduce_only"]) == ("sell", 30, True)
    assert exchange.position(key, BTC) == 0
    entry = await system.wait_for_worker(client, worker_id,
                                         lambda e: e["worker"]["status"] == "stopped")
    assert entry["positions"] == []
    assert secret not in system.log_path.read_text()


async def test_halt_flattens_and_stops_every_runner_of_a_user_on_paper_and_on_deribit(
        system: System, exchange: LocalDeribit) -> None:
    client, key, secret = await trader(system, exchange)
    bystander, other_key, other_secret = await trader(system, exchange)
    mine = [(await client.start(**on_deribit(key, secret, amount=20)))["workerId"],
            (await client.start(**start_body("hold", (BTC,), amount=2)))["workerId"]]
    theirs = (await bystander.start(**on_deribit(other_key, other_secret)))["workerId"]
    for worker_id, held in ((mine[0], 20), (mine[1], 2)):
        await system.wait_for_worker(client, worker_id, lambda e, held=held: bool(
            e["positions"]) and e["positions"][0]["amount"] == held)
    await system.wait_for_worker(bystander, theirs, lambda e: bool(e["positions"]))

    halted = await client.call("POST", "/runner/halt", json={})
    assert sorted(halted["halted"]) == sorted(mine)
    assert halted["flattenedPositions"] == 2 and halted["failed"] == {}
    status = await client.status()
    assert {e["worker"]["workerId"]: e["worker"]["status"] for e in status["workers"]} == {
        mine[0]: "stopped", mine[1]: "stopped"}
    assert exchange.position(key, BTC) == 0
    assert exchange.position(other_key, BTC) == 30, "another user's runner is left alone"
    assert (await bystander.status())["workers"][0]["worker"]["status"] == "running"

    with pytest.raises(GatewayError, match="userId does not match"):
        await client.call("POST", "/runner/halt", json={"userId": "someone-else"})
    with pytest.raises(GatewayError, match="admin only"):
        await client.call("POST", "/runner/halt", json={"all": True})
    everyone = await system.admin.call("POST", "/runner/halt", json={"all": True})
    assert theirs in everyone["halted"] and exchange.position(other_key, BTC) == 0


async def test_a_rejected_key_fails_the_job_at_once_with_the_reason(
        system: System, exchange: LocalDeribit) -> None:
    client, key, _ = await trader(system, exchange)
    buys = exchange.calls["private/buy"]  # the module's exchange counts every test's
    started = await client.start(**on_deribit(key, "not-the-secret-0000"))
    entry = await system.wait_for_worker(
        client, started["workerId"], lambda e: e["worker"]["status"] == "failed", timeout=10)
    assert entry["worker"]["reason"] == "exchange rejected the API key"
    assert entry["worker"]["restartCount"] == 0
    assert exchange.calls["private/buy"] == buys


async def test_a_stop_with_flatten_of_a_failed_runner_closes_what_its_account_holds(
        system: System, exchange: LocalDeribit) -> None:
    """Its worker died and could not come back (the exchange unreachable at each restart): the
    runner failed with its position open. A stop with flatten runs a short flatten-only worker
    under its credentials, which closes the position with a reduce-only order."""
    client, key, secret = await trader(system, exchange)
    worker_id = (await client.start(**on_deribit(key, secret, amount=20)))["workerId"]
    entry = await system.wait_for_worker(
        client, worker_id, lambda e: e["worker"]["status"] == "running" and e["positions"])
    exchange.down()
    try:
        os.kill(entry["worker"]["pid"], signal.SIGKILL)
        await system.wait_for_worker(client, worker_id,
                                     lambda e: e["worker"]["status"] == "failed", timeout=30)
    finally:
        exchange.up()
    assert exchange.position(key, BTC) == 20

    stopped = await client.stop(worker_id, flatten=True)
    assert stopped["success"] and stopped["flattenedPositions"] == 1, stopped
    assert exchange.position(key, BTC) == 0
    close = exchange.orders_of(key)[-1]
    assert close["reduce_only"] and close["direction"] == "sell"
