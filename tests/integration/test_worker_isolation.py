"""Workers under identities of their own (issue 24), forked and exec'd alike: each its own uid
and gid with no other group, its own 0700 directory, its limits, not dumpable, no new
privileges; a uid serves one live worker and comes back only once nothing runs under it; the
credentials are in the worker's memory and nowhere else."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from services.worker import protocol
from services.worker.confinement import Limits
from services.worker_host.fork_spawner import ForkSpawner
from services.worker_host.isolation import Isolation
from services.worker_host.spawner import (
    ExecSpawner,
    SpawnError,
    SpawnRequest,
    WorkerProcess,
    worker_environment,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")

API_KEY = "ak-live-2J7W-isolation"
API_SECRET = "sk-live-8Q1R-isolation"
LIMITS = Limits(address_space=2 << 30, open_files=128, processes=32)
FIRST_UID = 62000 + (os.getpid() % 300) * 10  # a range of its own per test run

Spawn = Callable[..., Awaitable[WorkerProcess]]
Spawner = ForkSpawner | ExecSpawner


def request(workdir: Path, wid: str, attempt: int = 0) -> SpawnRequest:
    env = worker_environment(
        worker_id=wid, job_id=f"job-{wid}", user_id=f"user-{wid}", strategy_id="isolation",
        broker_id="paper", heartbeat_interval=0.2,
        config_json=json.dumps({"name": "hold", "type": "hold", "parameters": {"amount": 1}}))
    return SpawnRequest(wid, f"job-{wid}", f"user-{wid}", attempt, env, workdir / wid, 10.0,
                        {"apiKey": API_KEY, "apiSecret": API_SECRET})


async def next_beat(worker: WorkerProcess, timeout: float = 5.0) -> list[object]:
    """The lines up to and including the next beat."""
    lines: list[object] = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await worker.reader.readline()
            assert raw, "channel closed"
            lines.append(protocol.decode(raw))
            if isinstance(lines[-1], protocol.Beat):
                return lines


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as lines:
        return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


def alive(pid: int) -> bool:
    try:
        return not status(pid)["State"].startswith(("Z", "X"))
    except FileNotFoundError:
        return False


def limits(pid: int) -> dict[str, tuple[str, str]]:
    with open(f"/proc/{pid}/limits") as lines:
        rows = lines.read().splitlines()[1:]
    return {row[:26].strip(): tuple(row[26:].split()[:2]) for row in rows}


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether `needle` is anywhere in `pid`'s writable memory (read as root)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(part, 16) for part in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue
    return False


@pytest.fixture(params=["fork", "exec"])
async def spawner(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Spawner]:
    isolation = Isolation(range(FIRST_UID, FIRST_UID + 2), limits=LIMITS, sandbox=True,
                          tcp_ports=(443,), announce=True)
    spawner: Spawner = (ForkSpawner(tmp_path, isolation) if request.param == "fork"
                        else ExecSpawner(isolation))
    await spawner.start()
    assert isolation.switches_ids, isolation.reason
    yield spawner
    await spawner.close()


@pytest.fixture
async def spawn(spawner: Spawner, tmp_path: Path) -> AsyncIterator[Spawn]:
    workers: list[WorkerProcess] = []
    numbers = itertools.count(1)

    async def start(wid: str | None = None, attempt: int = 0) -> WorkerProcess:
        worker = await spawner.spawn(request(tmp_path, wid or f"w-{next(numbers)}", attempt))
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.signal(signal.SIGKILL)
        await asyncio.wait_for(worker.wait(), 5)
        worker.writer.close()
    await until_free(spawner, 2)
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            assert API_KEY.encode() not in content and API_SECRET.encode() not in content, path


async def until_free(spawner: Spawner, free: int, timeout: float = 5.0) -> None:
    pool = spawner.isolation.pool
    assert pool is not None
    async with asyncio.timeout(timeout):
        while pool.free != free:
            await asyncio.sleep(0.02)


async def test_each_worker_has_its_own_identity_directory_and_limits(
    spawn: Spawn, tmp_path: Path
) -> None:
    first, second = await spawn(), await spawn()
    uids = set()
    for worker in (first, second):
        await next_beat(worker)
        seen = status(worker.pid)
        uid = int(seen["Uid"].split()[0])
        uids.add(uid)
        assert seen["Uid"].split() == [str(uid)] * 4 and seen["Gid"].split() == [str(uid)] * 4
        assert seen["Groups"] == ""
        assert seen["NoNewPrivs"] == "1"
        # Not dumpable: its /proc files are root's, not its own uid's.
        assert os.stat(f"/proc/{worker.pid}/environ").st_uid == 0
        assert limits(worker.pid)["Max processes"] == ("32", "32")
        assert limits(worker.pid)["Max open files"] == ("128", "128")
        assert limits(worker.pid)["Max address space"] == (str(2 << 30),) * 2
        assert limits(worker.pid)["Max core file size"] == ("0", "0")
        directory = tmp_path / worker.worker_id
        assert os.readlink(f"/proc/{worker.pid}/cwd") == str(directory)
        for path, mode in ((directory, 0o700), (directory / "worker.log", 0o600),
                           (directory / "state.json", 0o600)):
            info = path.stat()
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, uid, mode)
        assert f"confined: uid {uid} gid {uid}, no supplementary groups" in (
            directory / "worker.log").read_text()
    assert len(uids) == 2 and uids <= set(range(FIRST_UID, FIRST_UID + 2))


async def test_a_uid_comes_back_only_once_nothing_runs_under_it(
    spawner: Spawner, spawn: Spawn
) -> None:
    first, second = await spawn(), await spawn()
    await next_beat(first)
    with pytest.raises(SpawnError, match="no free worker uid"):
        await spawn()
    uid = int(status(first.pid)["Uid"].split()[0])
    # What a worker could leave behind: a process of its uid in a session of its own, whose
    # parent is gone.
    leftover = int(subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], user=uid, group=uid,
        extra_groups=[], start_new_session=True, capture_output=True, text=True, check=True,
    ).stdout)
    assert status(leftover)["Uid"].split()[0] == str(uid)
    first.signal(signal.SIGKILL)
    await asyncio.wait_for(first.wait(), 5)
    await until_free(spawner, 1)
    assert not alive(leftover)  # killed (its zombie waits for init)
    third = await spawn()
    assert int(status(third.pid)["Uid"].split()[0]) == uid
    await next_beat(third)
    await next_beat(second)  # untouched throughout


async def test_a_worker_restarted_under_another_uid_keeps_its_account(
    spawner: Spawner, spawn: Spawn, tmp_path: Path
) -> None:
    first = await spawn("w-1")
    await next_beat(first)
    before = (tmp_path / "w-1" / "state.json").read_bytes()
    uid = int(status(first.pid)["Uid"].split()[0])
    first.signal(signal.SIGKILL)
    await asyncio.wait_for(first.wait(), 5)
    await until_free(spawner, 2)
    assert (tmp_path / "w-1").stat().st_uid == 0  # back to the host meanwhile

    again = await spawn("w-1", attempt=1)  # the pool hands the other uid out first
    assert int(status(again.pid)["Uid"].split()[0]) != uid
    lines = await next_beat(again)
    reports = [line.event for line in lines if isinstance(line, protocol.Report)]
    assert "OrderFilled" not in reports  # no new order (its open position is reported again)
    assert {mark.instrument for mark in lines[-1].positions} == {"BTC-PERPETUAL"}
    assert json.loads((tmp_path / "w-1" / "state.json").read_bytes())["positions"] == json.loads(
        before)["positions"]


async def test_a_paper_account_kept_beside_the_directories_is_moved_in(
    spawn: Spawn, tmp_path: Path
) -> None:
    first = await spawn("w-1")
    await next_beat(first)
    first.send(protocol.Stop())
    await asyncio.wait_for(first.wait(), 5)
    shutil.copy(tmp_path / "w-1" / "state.json", tmp_path / "w-2.state.json")  # before dirs

    moved = await spawn("w-2")
    lines = await next_beat(moved)
    reports = [line.event for line in lines if isinstance(line, protocol.Report)]
    assert "OrderFilled" not in reports  # the account moved in: nothing ordered anew
    assert not (tmp_path / "w-2.state.json").exists()


async def test_a_worker_log_replaced_by_a_link_is_not_followed(
    spawner: Spawner, spawn: Spawn, tmp_path: Path
) -> None:
    first = await spawn("w-1")
    await next_beat(first)
    first.send(protocol.Stop())
    await asyncio.wait_for(first.wait(), 5)
    target = tmp_path / "host-file"
    target.write_text("the host's\n")
    log = tmp_path / "w-1" / "worker.log"
    log.unlink()
    log.symlink_to(target)  # what the worker could have done in its own directory
    with pytest.raises(OSError):
        await spawn("w-1", attempt=1)
    assert target.read_text() == "the host's\n"
    await until_free(spawner, 2)


async def test_credentials_are_in_the_workers_memory_alone(
    spawner: Spawner, spawn: Spawn
) -> None:
    worker = await spawn()
    await next_beat(worker)
    with open(f"/proc/{worker.pid}/environ", "rb") as environ:
        assert API_SECRET.encode() not in environ.read()
    assert memory_holds(worker.pid, API_SECRET.encode())  # the scan finds what is there
    if isinstance(spawner, ForkSpawner):
        server = spawner.server.pid
        assert server is not None
        with open(f"/proc/{server}/task/{server}/children") as children:
            spares = {int(pid) for pid in children.read().split()} - {worker.pid}
        for pid in (server, *spares):
            assert not memory_holds(pid, API_SECRET.encode()), pid
