"""Expiry and downgrade, secrets never in clear, and replay equal to the live state."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from services.cli.client import GatewayError
from services.cli.local import rabbitmqctl
from tests.e2e.conftest import System, start_body
from tests.integration.broker_helpers import until

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    """The system as a deployment runs it: the topology declared by the vhost's administrator,
    then each service and the host on a login of its own, with only its own rights (their
    passwords are secrets to look for)."""
    system_ = System(tmp_path_factory.mktemp("system"), own_broker_user=True)
    await system_.start()
    yield system_
    await system_.stop()

SECONDS = 1 / 86400  # in days


async def test_expiry_downgrades_to_free_and_stops_the_newest_excess_workers(
    running: System,
) -> None:
    user, client = await running.user()
    upgraded = await running.admin.upgrade(user, "basic", 6 * SECONDS)
    assert upgraded["tier"] == "basic" and upgraded["maxWorkers"] == 3
    workers = []
    for _ in range(3):
        workers.append((await client.start(**start_body("hold", amount=1)))["workerId"])
        await asyncio.sleep(0.05)  # distinct start order
    for wid in workers:
        await running.wait_for_worker(client, wid, lambda e: e["worker"]["status"] == "running")
    check = await running.admin.entitlement(user)
    assert check == {
        "userId": user,
        "isEntitled": False,
        "tier": "basic",
        "maxWorkers": 3,
        "currentWorkers": 3,
        "expiresAt": upgraded["expiresAt"],
    }

    # The expiry timer is durable: kill the entitlement service; the supervisor restarts it.
    entitlement = next(c for c in running.supervisor.children if c.service == "entitlement")
    os.kill(entitlement.process.pid, signal.SIGKILL)  # type: ignore[union-attr]

    log = await running.wait_for_log(
        lambda ev: (
            sum(
                1 for e in ev if e.type == "WorkerStopped" and e.payload["worker_id"] in workers[1:]
            )
            == 2
        ),
        timeout=30,
    )
    mine = [e for e in log if e.user_id == user]
    types = [e.type for e in mine]
    assert types.index("EntitlementExpired") < types.index("EntitlementDowngraded")
    downgraded = next(e for e in mine if e.type == "EntitlementDowngraded")
    assert downgraded.payload["to_tier"] == "free" and downgraded.payload["max_workers"] == 1
    stops = [e for e in mine if e.type == "StopRunner"]
    assert [s.payload["worker_id"] for s in stops] == [workers[2], workers[1]]  # newest first
    assert all("expired" in s.payload["reason"] for s in stops)

    oldest = await running.wait_for_worker(client, workers[0], lambda e: True)
    assert oldest["worker"]["status"] == "running"  # still entitled to one: not locked out
    status = {e["worker"]["workerId"]: e for e in (await client.status())["workers"]}
    for wid in workers[1:]:
        assert status[wid]["worker"]["status"] == "stopped"
        assert "expired" in status[wid]["worker"]["reason"]
        assert status[wid]["positions"] == []  # hold's flatten-on-stop default applied
    check = await running.admin.entitlement(user)
    assert check["tier"] == "free" and check["maxWorkers"] == 1 and check["currentWorkers"] == 1
    with pytest.raises(GatewayError, match="1 of 1"):
        await client.start(**start_body())


async def test_each_service_and_host_runs_on_its_own_login(running: System) -> None:
    listed = rabbitmqctl("list_connections", "-p", running.vhost, "user", "--silent")
    assert set(listed.split()) >= {f"{login}@{running.vhost}" for login in (
        "runner-gateway", "runner-entitlement", "runner-scheduler", "runner-monitor",
        "runner-worker-host.host-1")}


async def test_on_their_own_logins_the_services_survive_the_broker_closing_their_connections(
        running: System) -> None:
    """After a reconnect each login restores only what it may: its own queues declared again,
    the shared ones checked again; a stop (through the host's inbox) and a new start work."""
    _, client = await running.user()
    before = (await client.start(**start_body("hold", amount=1)))["workerId"]
    await running.wait_for_worker(client, before, lambda e: e["positions"])
    rabbitmqctl("close_all_connections", "--vhost", running.vhost, "--limit", "1000",
                "e2e: broker drop")

    async def stop() -> dict[str, Any] | None:
        try:
            return await client.stop(before, flatten=True)
        except GatewayError:  # the gateway's connection is not back yet
            return None

    stopped = await until(stop, 10, "the stop answered")
    assert stopped["flattenedPositions"] == 1
    after = (await client.start(**start_body("hold", amount=1)))["workerId"]
    entry = await running.wait_for_worker(client, after, lambda e: e["positions"])
    assert entry["worker"]["status"] == "running"
    await client.stop(after)


async def test_no_secret_appears_in_clear(running: System) -> None:
    """Neither a user's credentials nor the sealing key, the broker passwords or the admin
    token, in any file (but the key file), log line, event or response; every file and
    directory the system wrote is its owner's alone."""
    secret = "Sup3r-Secret-Value-Never-Shown-42"
    user, client = await running.user()
    body = start_body("hold", secret=secret, amount=1)
    started = await client.start(**body)
    entry = await running.wait_for_worker(client, started["workerId"], lambda e: e["positions"])
    assert secret not in json.dumps(await client.status())
    assert secret not in json.dumps(entry)
    await client.stop(started["workerId"], flatten=True)
    with pytest.raises(GatewayError) as bad:  # a rejected request must not echo it either
        await client.call("POST", "/runner/start", json=body | {"brokerId": "??"})
    assert secret not in str(bad.value)

    key_file = running.data_dir / "keys" / "secret.key"
    assert len(running.broker_passwords) == 6  # the vhost's administrator, a login per service
    service_secrets = (key_file.read_text().strip(), *running.broker_passwords,
                       running.admin_token)
    needles = [s.encode() for s in (secret, body["credentials"]["apiKey"], *service_secrets)]
    written = list(running.data_dir.rglob("*"))
    leaks = [
        str(path)
        for path in [*written, running.log_path]
        if path.is_file() and path != key_file and any(n in path.read_bytes() for n in needles)
    ]
    assert leaks == []
    assert not [str(p) for p in [running.data_dir, *written] if p.lstat().st_mode & 0o077], (
        "readable by others")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    log = await running.log()
    assert not [e.type for e in log if any(s in e.model_dump_json()
                                           for s in (secret, *service_secrets))]
    assert not [s for s in service_secrets if s in json.dumps(await running.admin.status())]
    requested = next(e for e in log if e.type == "JobRequested" and e.user_id == user)
    # the log keeps a digest of the sealed credentials, never the blob (docs/SECURITY.md)
    assert requested.payload["credentials_sealed"].startswith("sha256:")
    assert not [e.type for e in log if "gAAAA" in e.model_dump_json()]  # no Fernet token


async def test_replay_gives_the_live_queue_stats_and_positions(running: System) -> None:
    _, client = await running.user()
    wid = (await client.start(**start_body("hold", ("BTC-PERPETUAL", "ETH-USD"), amount=3)))[
        "workerId"
    ]
    await running.wait_for_worker(client, wid, lambda e: len(e["positions"]) == 2)

    def facts(status: dict) -> dict:
        return {
            e["worker"]["workerId"]: (
                e["worker"]["status"],
                e["worker"]["restartCount"],
                e["stats"],
                sorted(
                    (p["instrumentName"], p["side"], p["amount"], p["entryPrice"])
                    for p in e["positions"]
                ),
            )
            for e in status["workers"]
        }

    async def agreeing() -> tuple[dict, dict] | None:
        live = await running.admin.status()
        replayed = running.replay()
        same = (replayed["queueStats"], facts(replayed)) == (live["queueStats"], facts(live))
        return (replayed, live) if same else None

    # on this shared system events may still be in flight: replay and live agree once nothing
    # is, which no event announces
    replayed, live = await until(agreeing, 20, "the replay to agree with the live status")
    assert replayed["queueStats"] == live["queueStats"]
    assert facts(replayed) == facts(live)
