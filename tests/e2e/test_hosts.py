"""Two worker-hosts: a killed host's workers move to the other; a host cut off from the broker
fences its own workers within its lease; a host that comes back resurrects nothing; and no
worker ever runs twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from events import Envelope
from services.cli.client import GatewayClient
from services.settings import Settings
from tests.conftest import rabbitmqctl
from tests.e2e.conftest import System, start_body
from tests.e2e.test_lifecycle import alive

pytestmark = pytest.mark.asyncio(loop_scope="session")

CUT_USER = f"e2e-host-2-{uuid.uuid4().hex[:8]}"  # its own: runs side by side share the broker


def live_workers() -> Counter[str]:
    """RUNNER_WORKER_ID of every live worker process on this machine."""
    found: Counter[str] = Counter()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if "zombie" in (proc / "status").read_text():
                continue
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        for item in env.split(b"\0"):
            if item.startswith(b"RUNNER_WORKER_ID="):
                found[item.split(b"=", 1)[1].decode()] += 1
    return found


class NeverTwice:
    """Samples the process table in the background; records any worker seen running twice."""

    def __init__(self, worker_ids: set[str]) -> None:
        self.worker_ids = worker_ids
        self.doubles: list[tuple[str, int]] = []

    async def watch(self) -> None:
        while True:
            counts = live_workers()
            self.doubles += [(w, n) for w, n in counts.items() if n > 1 and w in self.worker_ids]
            await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[NeverTwice]:
        task = asyncio.create_task(self.watch())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest_asyncio.fixture(loop_scope="session")
async def two_hosts(tmp_path: Path) -> AsyncIterator[System]:
    system = System(tmp_path, hosts=2)
    with contextlib.suppress(RuntimeError):
        rabbitmqctl("delete_user", CUT_USER)
    rabbitmqctl("add_user", CUT_USER, "pw")
    host_2 = system.supervisor.child("worker-host host-2")
    host_2.env["RUNNER_AMQP_URL"] = system.env["RUNNER_AMQP_URL"].replace(
        "guest:guest", f"{CUT_USER}:pw"
    )
    system.create_vhost()
    rabbitmqctl("set_permissions", "-p", system.vhost, CUT_USER, ".*", ".*", ".*")
    await system.start()
    try:
        yield system
    finally:
        await system.stop()
        with contextlib.suppress(RuntimeError):
            rabbitmqctl("delete_user", CUT_USER)


async def start_spread(
    system: System, count: int
) -> tuple[list[str], dict[str, dict], GatewayClient]:
    """Start `count` holds for an enterprise user; wait until all run; returns ids and entries."""
    for _ in range(100):
        hosts = (await system.admin.call("GET", "/admin/hosts"))["hosts"]
        if sum(not h["lost"] for h in hosts) == 2:
            break
        await asyncio.sleep(0.1)
    user, client = await system.user()
    await system.admin.upgrade(user, "enterprise", 1)
    ids = [(await client.start(**start_body("hold", amount=1)))["workerId"] for _ in range(count)]
    entries = {}
    for wid in ids:
        entries[wid] = await system.wait_for_worker(
            client, wid, lambda e: e["worker"]["status"] == "running"
        )
    return ids, entries, client


async def test_killed_host_workers_move_to_the_other_host_and_never_run_twice(
    two_hosts: System,
) -> None:
    ids, entries, client = await start_spread(two_hosts, 4)
    on_host_1 = {w for w, e in entries.items() if e["worker"]["hostId"] == "host-1"}
    assert on_host_1 and len(on_host_1) < 4  # placement spread the work

    async with NeverTwice(set(ids)).running() as guard:
        two_hosts.supervisor.kill("worker-host host-1", restart=False)
        for wid in ids:
            entry = await two_hosts.wait_for_worker(
                client,
                wid,
                lambda e: e["worker"]["status"] == "running" and e["worker"]["hostId"] == "host-2",
                timeout=30,
            )
            assert entry["worker"]["restartCount"] == (1 if wid in on_host_1 else 0)
        for wid in on_host_1:
            assert not alive(entries[wid]["worker"]["pid"])  # they died with their host

        # host-1 comes back: it reports its old workers (stale, ignored) and resurrects nothing.
        await two_hosts.supervisor.revive("worker-host host-1")
        await until_back_with_its_stale_exits(two_hosts, "host-1", on_host_1)
        for wid in ids:
            entry = await two_hosts.wait_for_worker(client, wid, lambda e: True)
            assert entry["worker"]["hostId"] == "host-2" and entry["worker"]["status"] == "running"
    assert guard.doubles == []
    log = await two_hosts.log()
    lost = [e for e in log if e.type == "HostLost" and e.payload["host_id"] == "host-1"]
    assert lost and all(
        any(
            e.type == "WorkerCrashed"
            and e.payload["worker_id"] == w
            and e.payload["reason"] == "host_lost"
            for e in log
        )
        for w in on_host_1
    )


async def test_host_cut_off_from_the_broker_fences_its_workers_within_its_lease(
    two_hosts: System,
) -> None:
    ids, entries, client = await start_spread(two_hosts, 4)
    on_host_2 = {w for w, e in entries.items() if e["worker"]["hostId"] == "host-2"}
    assert on_host_2
    lease = float(two_hosts.env["RUNNER_HOST_LEASE"])

    async with NeverTwice(set(ids)).running() as guard:
        rabbitmqctl("clear_permissions", "-p", two_hosts.vhost, CUT_USER)
        for line in rabbitmqctl(
            "list_connections", "user", "pid", "--no-table-headers"
        ).splitlines():
            user, _, pid = line.partition("\t")
            if user == CUT_USER:
                rabbitmqctl("close_connection", pid.strip(), "e2e: network cut")
        cut_at = time.monotonic()

        pids = [entries[w]["worker"]["pid"] for w in on_host_2]
        while any(alive(p) for p in pids):
            assert time.monotonic() - cut_at < lease + 2.0, "host-2 did not fence within its lease"
            await asyncio.sleep(0.05)

        for wid in on_host_2:  # rescheduled on host-1 once host-2 is declared lost
            entry = await two_hosts.wait_for_worker(
                client,
                wid,
                lambda e: e["worker"]["status"] == "running" and e["worker"]["hostId"] == "host-1",
                timeout=30,
            )
            assert entry["worker"]["restartCount"] >= 1

        rabbitmqctl("set_permissions", "-p", two_hosts.vhost, CUT_USER, ".*", ".*", ".*")
        await until_rejoined(two_hosts, "host-2")  # its fenced exits (stale) published first
        for wid in ids:
            entry = await two_hosts.wait_for_worker(client, wid, lambda e: True)
            assert entry["worker"]["status"] == "running"
            if wid in on_host_2:
                assert entry["worker"]["hostId"] == "host-1"
    assert guard.doubles == []
    hosts = {h["hostId"]: h for h in (await two_hosts.admin.call("GET", "/admin/hosts"))["hosts"]}
    assert not hosts["host-2"]["lost"]  # rejoined
    if os.geteuid() == 0:  # a host that can switch ids says so, and how it isolates
        assert hosts["host-2"]["isolated"] and "uid" in hosts["host-2"]["isolation"]


async def until_rejoined(system: System, host_id: str, timeout: float = 20.0) -> None:
    """Wait until `/admin/hosts` shows the host online again."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        hosts = {h["hostId"]: h for h in (await system.admin.call("GET", "/admin/hosts"))["hosts"]}
        if host_id in hosts and not hosts[host_id]["lost"]:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{host_id} never rejoined"
        await asyncio.sleep(0.1)


def reported_itself(log: list[Envelope], host_id: str, worker_ids: set[str]) -> bool:
    """Whether `host_id` has itself reported the end of each of `worker_ids`' first run (stale
    news): that attempt's crash on it is then in the log twice, the scheduler's own when the host
    was declared lost, and the host's."""
    return all(
        sum(
            e.type == "WorkerCrashed" and e.payload["worker_id"] == wid
            and e.payload["host_id"] == host_id and e.payload.get("attempt", 0) == 0
            for e in log
        ) >= 2
        for wid in worker_ids
    )


async def until_back_with_its_stale_exits(system: System, host_id: str,
                                          worker_ids: set[str]) -> None:
    """Wait until the lost `host_id` is back (`/admin/hosts`: online again) and the log has its
    own reports of the ends of `worker_ids`, which were moved elsewhere meanwhile: what a
    returning host does (and the monitor folds) has then happened."""
    await until_rejoined(system, host_id)
    await system.wait_for_log(lambda log: reported_itself(log, host_id, worker_ids))


async def test_frozen_host_workers_fence_themselves_before_they_run_elsewhere(
    two_hosts: System,
) -> None:
    """A host that stalls (SIGSTOP: alive, connected, silent) cannot renew its lease: its
    workers end themselves when it runs out, and the scheduler restarts them on the other host
    only once the lease has surely run out, so none runs twice."""
    ids, entries, client = await start_spread(two_hosts, 4)
    on_host_1 = {w for w, e in entries.items() if e["worker"]["hostId"] == "host-1"}
    assert on_host_1
    lease = float(two_hosts.env["RUNNER_HOST_LEASE"])
    host_1 = two_hosts.supervisor.child("worker-host host-1").process
    assert host_1 is not None

    async with NeverTwice(set(ids)).running() as guard:
        host_1.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            pids = [entries[w]["worker"]["pid"] for w in on_host_1]
            while any(alive(p) for p in pids):
                assert time.monotonic() - frozen_at < lease + 1.0, "workers outlived the lease"
                await asyncio.sleep(0.05)
            for wid in on_host_1:
                await two_hosts.wait_for_worker(
                    client,
                    wid,
                    lambda e: e["worker"]["status"] == "running"
                    and e["worker"]["hostId"] == "host-2",
                    timeout=30,
                )
        finally:
            host_1.send_signal(signal.SIGCONT)
        # host-1 wakes: reports the lapsed exits (stale), rejoins
        await until_back_with_its_stale_exits(two_hosts, "host-1", on_host_1)
        for wid in ids:
            entry = await two_hosts.wait_for_worker(client, wid, lambda e: True)
            assert entry["worker"]["status"] == "running"
    assert guard.doubles == []

    log = await two_hosts.log()
    lost_at = next(
        e.occurred_at for e in log if e.type == "HostLost" and e.payload["host_id"] == "host-1"
    )
    fenced_within = Settings(host_lease=lease).host_fenced_within
    for wid in on_host_1:
        scheduled = [
            e for e in log
            if e.type == "WorkerRestartScheduled" and e.payload["worker_id"] == wid
            and e.occurred_at >= lost_at
        ]
        assert scheduled and scheduled[0].payload["delay"] >= fenced_within
