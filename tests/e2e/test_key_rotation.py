"""`runner keys rotate` on a running system: its workers keep running, a worker killed afterwards
restarts with its credentials opened under the new key, and the old key opens nothing stored."""

from __future__ import annotations

import os
import signal
import sqlite3

import pytest
from cryptography.fernet import Fernet, InvalidToken

from services.secrets import Sealer, read_keys
from tests.e2e.conftest import System, start_body

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_keys_rotate_under_running_workers(running: System) -> None:
    user, client = await running.user(tier="basic")
    workers = [(await client.start(**start_body("hold", amount=1)))["workerId"] for _ in range(2)]
    pids = {}
    for wid in workers:
        entry = await running.wait_for_worker(client, wid, lambda e: e["worker"]["pid"])
        pids[wid] = entry["worker"]["pid"]
    key_file = running.data_dir / "keys" / "secret.key"
    [old] = read_keys(key_file)

    rotated = running.runner("keys", "rotate", "--grace", "0.5")

    [new] = read_keys(key_file)
    assert new != old
    assert "jobs in scheduler.db: 2 re-sealed" in rotated.stdout, rotated.stdout
    assert old not in rotated.stdout + rotated.stderr and new not in rotated.stdout
    for wid in workers:  # untouched
        entry = await running.wait_for_worker(client, wid, lambda e: True)
        assert (entry["worker"]["status"], entry["worker"]["pid"]) == ("running", pids[wid])

    victim = workers[0]
    os.kill(pids[victim], signal.SIGKILL)
    entry = await running.wait_for_worker(
        client, victim,
        lambda e: e["worker"]["restartCount"] == 1 and e["worker"]["status"] == "running")
    assert entry["worker"]["pid"] != pids[victim]

    with sqlite3.connect(running.data_dir / "scheduler" / "scheduler.db") as db:
        [sealed] = db.execute("SELECT credentials_sealed FROM jobs WHERE worker_id = ?",
                              (victim,)).fetchone()
    with pytest.raises(InvalidToken):
        Fernet(old.encode()).decrypt(sealed.encode())
    assert Sealer(new).open(sealed, user_id=user, worker_id=victim)["apiKey"].startswith("key-")
