"""Start → run → status → stop through HTTP, with real worker processes on the paper broker."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from services.cli.client import GatewayError
from tests.e2e.conftest import System, start_body

pytestmark = pytest.mark.asyncio(loop_scope="session")


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:  # gone between the two looks
        return False


async def test_start_spawns_a_worker_process_with_the_injected_environment(running: System) -> None:
    user, client = await running.user()
    body = start_body("hold", ("BTC-PERPETUAL", "ETH-PERPETUAL"), amount=2)
    started = await client.start(**body)
    assert started["success"] and started["jobId"] and started["workerId"]

    entry = await running.wait_for_worker(
        client,
        started["workerId"],
        lambda e: e["worker"]["status"] == "running" and len(e["positions"]) == 2,
    )
    worker = entry["worker"]
    assert worker["pid"] and alive(worker["pid"])
    assert worker["userId"] == user and worker["jobId"] == started["jobId"]
    # A forked worker (the default) gets the injected variables in its os.environ; its
    # /proc/<pid>/environ is the fork-server's, which holds no user's credentials and none of the
    # host's secrets. (tests/integration/test_forkserver.py checks the child's os.environ.)
    env = environ_of(worker["pid"])
    assert "RUNNER_SECRET_KEY" not in env and "RUNNER_ADMIN_TOKEN" not in env
    assert body["credentials"]["apiSecret"] not in env.values()
    # Off the request path, a lower CPU priority: the worker-host's, which its workers inherit.
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the tests' own (`nice pytest`)
    niceness = {child.label: os.getpriority(os.PRIO_PROCESS, child.process.pid) - base
                for child in running.supervisor.children}
    assert niceness == {"monitor": 5, "entitlement": 0, "scheduler": 5,
                        "worker-host host-1": 5, "gateway": 0}
    assert os.getpriority(os.PRIO_PROCESS, worker["pid"]) - base == 5
    [log] = running.data_dir.glob(f"**/worker-host-*/{started['workerId']}/worker.log")
    assert (
        f"worker={started['workerId']} services.worker: started: strategy {body['strategyId']} "
        "(hold) on broker paper, instruments BTC-PERPETUAL,ETH-PERPETUAL"
    ) in log.read_text()

    positions = {p["instrumentName"]: p for p in entry["positions"]}
    assert (
        positions["BTC-PERPETUAL"]["side"] == "long" and positions["BTC-PERPETUAL"]["amount"] == 2
    )
    assert positions["ETH-PERPETUAL"]["entryPrice"] > 0
    assert set(entry["stats"]) == {
        "totalTrades",
        "winningTrades",
        "losingTrades",
        "totalPnL",
        "winRate",
    }
    # The first beat leaves right after the worker's hello, so its own timestamp may precede the
    # host's WorkerSpawned (stamped after the host's bookkeeping); the next follow every interval.
    await running.wait_for_worker(
        client,
        started["workerId"],
        lambda e: (
            e["worker"]["startedAt"] is not None
            and (e["worker"]["lastHeartbeat"] or 0) >= e["worker"]["startedAt"]
        ),
    )


async def test_stop_with_flatten_closes_every_position_at_market(running: System) -> None:
    _, client = await running.user()
    started = await client.start(
        **start_body("hold", ("BTC-PERPETUAL", "ETH-PERPETUAL", "SOL-USD"), amount=1.5)
    )
    wid = started["workerId"]
    entry = await running.wait_for_worker(client, wid, lambda e: len(e["positions"]) == 3)
    pid = entry["worker"]["pid"]

    stopped = await client.stop(wid, flatten=True)

    assert stopped["success"] is True and stopped["flattenedPositions"] == 3
    after = await client.status()
    mine = next(e for e in after["workers"] if e["worker"]["workerId"] == wid)
    assert mine["worker"]["status"] == "stopped" and mine["positions"] == []
    assert mine["stats"]["totalTrades"] == 3
    assert not alive(pid)
    log = await running.wait_for_log(
        lambda ev: any(e.type == "WorkerStopped" and e.payload["worker_id"] == wid for e in ev)
    )
    flattened = [e for e in log if e.type == "PositionsFlattened" and e.payload["worker_id"] == wid]
    assert len(flattened) == 1 and flattened[0].payload["count"] == 3
    assert len(flattened[0].payload["fills"]) == 3
    sells = [
        e
        for e in log
        if e.type == "OrderFilled" and e.payload["worker_id"] == wid and e.payload["side"] == "sell"
    ]
    assert {e.payload["instrument"] for e in sells} == {"BTC-PERPETUAL", "ETH-PERPETUAL", "SOL-USD"}


async def test_stop_without_flatten_leaves_positions_and_reports_zero(running: System) -> None:
    _, client = await running.user()
    wid = (await client.start(**start_body("hold", amount=1)))["workerId"]
    await running.wait_for_worker(client, wid, lambda e: len(e["positions"]) == 1)
    stopped = await client.stop(wid, flatten=False)
    assert stopped == {"success": True, "message": f"worker {wid} stopped", "flattenedPositions": 0}
    again = await client.stop(wid, flatten=True)  # idempotent: already stopped
    assert again["success"] and "already stopped" in again["message"]


async def test_free_user_twenty_parallel_starts_one_wins(running: System) -> None:
    _, client = await running.user()
    results = await asyncio.gather(
        *(client.start(**start_body()) for _ in range(20)), return_exceptions=True
    )
    wins = [r for r in results if isinstance(r, dict)]
    refusals = [r for r in results if isinstance(r, GatewayError)]
    assert len(wins) == 1, results
    assert len(refusals) == 19
    assert all(
        r.status == 403 and "limit" in str(r) and "1 of 1 (free)" in str(r) for r in refusals
    )


async def test_stopping_frees_the_slot(running: System) -> None:
    _, client = await running.user()
    first = await client.start(**start_body())
    with pytest.raises(GatewayError, match="limit"):
        await client.start(**start_body())
    await client.stop(first["workerId"])
    second = await client.start(**start_body())
    assert second["success"]


async def test_users_see_and_stop_only_their_own_workers(running: System) -> None:
    alice, alice_client = await running.user()
    bob, bob_client = await running.user()
    wid = (await alice_client.start(**start_body()))["workerId"]

    bobs_view = await bob_client.status()
    assert all(e["worker"]["userId"] == bob for e in bobs_view["workers"])
    with pytest.raises(GatewayError) as refused:
        await bob_client.stop(wid)
    assert refused.value.status == 404
    with pytest.raises(GatewayError) as mismatch:
        await bob_client.call("POST", "/runner/start", json=start_body() | {"userId": alice})
    assert mismatch.value.status == 403
    with pytest.raises(GatewayError) as not_admin:
        await bob_client.upgrade(bob, "enterprise", 30)
    assert not_admin.value.status == 403

    admin_view = await running.admin.status()
    assert any(e["worker"]["workerId"] == wid for e in admin_view["workers"])
    assert (await alice_client.stop(wid))["success"]


async def test_status_comes_in_pages_when_asked(running: System) -> None:
    user, client = await running.user(tier="basic")
    started = [(await client.start(**start_body()))["workerId"] for _ in range(3)]
    for wid in started:  # settled, so that the calls below see the same queue figures
        await running.wait_for_worker(client, wid, lambda e: e["worker"]["status"] == "running")
    whole = await client.status()
    assert "page" not in whole  # without a limit: every worker, the seed's document
    assert [e["worker"]["workerId"] for e in whole["workers"]] == started  # oldest first
    first = await client.status(limit=2)
    rest = await client.status(offset=2, limit=2)
    assert first["page"] == {"offset": 0, "limit": 2, "total": 3}
    assert rest["page"] == {"offset": 2, "limit": 2, "total": 3}
    assert [e["worker"]["workerId"] for e in first["workers"] + rest["workers"]] == started
    assert first["queueStats"] == whole["queueStats"]  # the figures are for the whole scope
    admin_page = await running.admin.status(user, limit=1)
    assert [e["worker"]["workerId"] for e in admin_page["workers"]] == started[:1]
    for params in ({"limit": 0}, {"limit": 1001}, {"offset": -1, "limit": 5}, {"limit": "x"}):
        with pytest.raises(GatewayError) as error:
            await client.call("GET", "/runner/status", params=params)
        assert error.value.status == 422, params


async def test_an_idle_connection_stays_open_longer_than_clients_keep_it(running: System) -> None:
    """A client may reuse a connection it has kept idle for 5 s (httpx's default); the gateway
    must not close it at that moment, or the request is lost in a bare `ReadError`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    request = b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n"

    async def answer() -> bytes:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return head.split(b"\r\n")[0] + b" " + await reader.readexactly(length)

    try:
        writer.write(request)
        assert (await answer()).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(httpx.Limits().keepalive_expiry + 0.5)
        writer.write(request)
        assert (await answer()).startswith(b"HTTP/1.1 200")  # not closed under the client
    finally:
        writer.close()


async def test_bad_requests_are_clear_errors_never_500(running: System) -> None:
    _, client = await running.user()
    cases = [
        (start_body() | {"brokerId": "nasdaq"}, 422, "brokerId"),
        (start_body("no-such-strategy"), 422, "config.type"),
        (start_body(instruments=("btc perpetual!",)), 422, "instrument"),
        (start_body() | {"strategyId": ""}, 422, "strategyId"),
        ({"strategyId": "x"}, 422, "credentials"),
    ]
    for body, status, field in cases:
        with pytest.raises(GatewayError) as error:
            await client.call("POST", "/runner/start", json=body)
        assert error.value.status == status and field in str(error.value), (body, error.value)
    async with httpx.AsyncClient(base_url=running.base_url) as anonymous:
        response = await anonymous.get("/runner/status")
        assert response.status_code == 401 and response.json()["success"] is False
        response = await anonymous.post(
            "/runner/start",
            content=b"{not json",
            headers={"Authorization": f"Bearer {running.admin_token}"},
        )
        assert response.status_code == 422
    docs = httpx.get(f"{running.base_url}/openapi.json").json()
    assert "/runner/start" in docs["paths"]
