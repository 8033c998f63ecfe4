"""The worker-host's spawners with real worker processes: the fork-server (default) and exec give
the same `WorkerProcess` contract; the fork-server holds no secrets and no worker's channel, and
a dead fork-server is replaced without losing track of the workers it forked."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from services.worker import protocol
from services.worker_host.fork_spawner import ForkSpawner
from services.worker_host.forkserver import SPARES
from services.worker_host.spawner import (
    ExecSpawner,
    SpawnError,
    SpawnRequest,
    WorkerProcess,
    worker_environment,
)
from tests.integration.broker_helpers import eventually

API_KEY = "ak-live-7Q4Z-forkserver"
API_SECRET = "sk-live-3M8P-forkserver"
HOST_SECRET = "host-only-fernet-key-forkserver"
PROMPT = 1.0  # seconds: "at once" on a loaded 2-core machine

Spawn = Callable[..., Awaitable[WorkerProcess]]


def hold_request(workdir: Path, number: int, interval: float) -> SpawnRequest:
    wid = f"worker-{number}"
    env = worker_environment(
        worker_id=wid,
        job_id=f"job-{number}",
        user_id="user-1",
        strategy_id="integration",
        broker_id="paper",
        config_json=json.dumps({"name": "hold", "type": "hold", "parameters": {"amount": 1}}),
        heartbeat_interval=interval,
    )
    return SpawnRequest(wid, f"job-{number}", "user-1", 0, env, workdir / wid, 10.0,
                        {"apiKey": API_KEY, "apiSecret": API_SECRET})


async def next_line(worker: WorkerProcess, timeout: float = 5.0) -> protocol.Beat | protocol.Report:
    line = await asyncio.wait_for(worker.reader.readline(), timeout)
    assert line, "channel closed"
    return protocol.decode(line)


async def next_beat(worker: WorkerProcess, timeout: float = 5.0) -> protocol.Beat:
    async with asyncio.timeout(timeout):
        while not isinstance(line := await next_line(worker), protocol.Beat):
            pass
    return line


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def children_of(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return {int(child) for child in children.read().split()}


def sockets_of(pid: int) -> list[str]:
    """The sockets `pid` holds open. A file it closes while we look (a worker writing its
    paper account) is skipped: it is no socket."""
    sockets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if link.startswith("socket:"):
            sockets.append(link)
    return sockets


@pytest.fixture(params=["fork", "exec"])
async def spawner(request, tmp_path: Path, monkeypatch) -> AsyncIterator[ForkSpawner | ExecSpawner]:
    monkeypatch.setenv("RUNNER_SECRET_KEY", HOST_SECRET)  # the host's own secret
    spawner = ForkSpawner(tmp_path) if request.param == "fork" else ExecSpawner()
    await spawner.start()
    yield spawner
    await spawner.close()


@pytest.fixture
async def fork_spawner(tmp_path: Path, monkeypatch) -> AsyncIterator[ForkSpawner]:
    monkeypatch.setenv("RUNNER_SECRET_KEY", HOST_SECRET)
    spawner = ForkSpawner(tmp_path)
    await spawner.start()
    yield spawner
    await spawner.close()


async def spawning(spawner: ForkSpawner | ExecSpawner, workdir: Path) -> AsyncIterator[Spawn]:
    """A `spawn(interval)` of hold workers; afterwards, leftovers are killed and no credential
    may have reached any file."""
    workers: list[WorkerProcess] = []
    numbers = itertools.count(1)

    async def start(interval: float = 0.2) -> WorkerProcess:
        worker = await spawner.spawn(hold_request(workdir, next(numbers), interval))
        workers.append(worker)
        return worker

    yield start

    for worker in workers:
        worker.signal(signal.SIGKILL)
        worker.signal(signal.SIGCONT)
        await asyncio.wait_for(worker.wait(), 5)
        worker.writer.close()
    for path in workdir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert API_KEY.encode() not in content and API_SECRET.encode() not in content, path


@pytest.fixture
async def spawn(spawner: ForkSpawner | ExecSpawner, tmp_path: Path) -> AsyncIterator[Spawn]:
    async for start in spawning(spawner, tmp_path):
        yield start


@pytest.fixture
async def fork_spawn(fork_spawner: ForkSpawner, tmp_path: Path) -> AsyncIterator[Spawn]:
    """`spawn`, on the fork-server only."""
    async for start in spawning(fork_spawner, tmp_path):
        yield start


def test_the_paper_template_holds_no_exchange_library() -> None:
    """Paper workers fork from a template without ccxt (its forks copy a third as much); the
    markets' template preloads it."""
    check = ("import sys; from services.worker_host.forkserver import preload; "
             "preload(markets=sys.argv[1] == 'markets'); print('ccxt' in sys.modules)")
    for template, holds in (("paper", "False"), ("markets", "True")):
        out = subprocess.run([sys.executable, "-c", check, template], capture_output=True,
                             text=True, timeout=120, check=True).stdout
        assert out.split()[-1] == holds, (template, out)


async def test_a_paper_worker_never_starts_the_markets_server(
        fork_spawner: ForkSpawner, tmp_path: Path) -> None:
    async for spawn in spawning(fork_spawner, tmp_path):
        worker = await spawn(interval=30.0)
        worker.send(protocol.Stop())
        assert await asyncio.wait_for(worker.wait(), 5) == 0
    assert fork_spawner.markets.pid is None


async def test_spawned_worker_says_hello_and_beats_at_once(spawn: Spawn) -> None:
    worker = await spawn(interval=30.0)  # returns once the worker has said hello
    started = time.monotonic()
    await next_beat(worker, timeout=PROMPT)  # the first beat does not wait for the interval
    assert time.monotonic() - started < PROMPT
    assert os.getpgid(worker.pid) == worker.pid == os.getsid(worker.pid)  # its own session
    worker.send(protocol.Stop())
    assert await asyncio.wait_for(worker.wait(), 5) == 0


async def test_kill_9_is_reported_as_minus_9_at_once(spawn: Spawn) -> None:
    worker = await spawn()
    await next_beat(worker)
    os.kill(worker.pid, signal.SIGKILL)
    killed = time.monotonic()
    assert await asyncio.wait_for(worker.wait(), PROMPT) == -signal.SIGKILL
    assert time.monotonic() - killed < PROMPT
    assert not worker.process.running


async def test_sigstop_then_sigkill_by_process_group(spawn: Spawn) -> None:
    worker = await spawn(interval=0.1)
    await next_beat(worker)
    worker.signal(signal.SIGSTOP)
    await eventually(lambda: state(worker.pid) == "T", PROMPT, "the worker stopped")
    worker.signal(signal.SIGKILL)
    assert await asyncio.wait_for(worker.wait(), PROMPT) == -signal.SIGKILL


async def test_worker_exits_3_when_its_host_end_closes_while_another_lives(spawn: Spawn) -> None:
    first, second = await spawn(), await spawn()
    await next_beat(first)
    first.writer.close()  # nobody else holds the host end of its channel
    assert await asyncio.wait_for(first.wait(), 5) == protocol.EXIT_HOST_GONE
    assert alive(second.pid)
    await next_beat(second)


async def test_a_dead_workers_channel_closes_though_later_workers_live(spawn: Spawn) -> None:
    """No later child (nor the fork-server) holds an earlier worker's end of its channel."""
    first, later = await spawn(), await spawn()
    await next_beat(later)
    os.kill(first.pid, signal.SIGKILL)
    async with asyncio.timeout(PROMPT):
        while await first.reader.readline():
            pass  # lines sent before the kill
    assert alive(later.pid)


async def test_a_workers_loop_holds_no_io_uring_ring(spawn: Spawn) -> None:
    """Neither forked nor exec'd: each ring would cost its start CPU and a kernel thread."""
    worker = await spawn()
    await next_beat(worker)
    links = []
    for fd in os.listdir(f"/proc/{worker.pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # a file it closes while we look
            links.append(os.readlink(f"/proc/{worker.pid}/fd/{fd}"))
    assert "anon_inode:[eventpoll]" in links  # its loop is up
    assert not [link for link in links if "io_uring" in link], links


async def test_fork_server_and_children_hold_only_their_own_sockets(
    fork_spawner: ForkSpawner, fork_spawn: Spawn
) -> None:
    workers = [await fork_spawn() for _ in range(3)]
    server = fork_spawner.server.pid
    for worker in workers:  # the server holds no end of a worker's channel
        assert not set(sockets_of(server)) & set(sockets_of(worker.pid))
    # The server: its host, and one channel to each spare (a child that is no worker). A spare,
    # once warmed up: its own channel, nothing of the server's or of a worker's.
    for _ in range(100):
        spares = children_of(server) - {worker.pid for worker in workers}
        if len(spares) == SPARES and len(sockets_of(server)) == 1 + SPARES and all(
                len(sockets_of(spare)) == 1 for spare in spares):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"server {sockets_of(server)}; spares {[sockets_of(s) for s in spares]}")
    assert all(os.getsid(spare) == spare for spare in spares)
    for worker in workers:
        # The control channel plus the two of asyncio's self-pipe: never the server's socket.
        assert len(sockets_of(worker.pid)) == 3, sockets_of(worker.pid)
        worker.signal(signal.SIGKILL)
        await worker.wait()


async def test_fork_server_environment_and_log_hold_no_secrets(
    fork_spawner: ForkSpawner, fork_spawn: Spawn, tmp_path: Path
) -> None:
    worker = await fork_spawn()
    await next_beat(worker)
    with open(f"/proc/{fork_spawner.server.pid}/environ", "rb") as environ:
        variables = dict(
            entry.split(b"=", 1) for entry in environ.read().split(b"\0") if b"=" in entry
        )
    assert b"API_KEY" not in variables and b"API_SECRET" not in variables
    assert b"RUNNER_SECRET_KEY" not in variables
    assert not any(
        secret in value
        for value in variables.values()
        for secret in (API_KEY.encode(), API_SECRET.encode(), HOST_SECRET.encode())
    )
    worker.signal(signal.SIGKILL)
    await worker.wait()
    log = (tmp_path / "forkserver.log").read_bytes()
    assert API_KEY.encode() not in log and API_SECRET.encode() not in log


async def test_killed_fork_server_is_restarted_and_its_orphan_is_still_reported(
    fork_spawner: ForkSpawner, fork_spawn: Spawn
) -> None:
    orphan = await fork_spawn()
    await next_beat(orphan)
    first_server = fork_spawner.server.pid
    os.kill(first_server, signal.SIGKILL)
    async with asyncio.timeout(5):
        while fork_spawner.server.pid == first_server or not fork_spawner.server.up.is_set():
            await asyncio.sleep(0.01)

    newcomer = await fork_spawn()  # the new fork-server forks
    await next_beat(orphan)  # the orphan lives on, still talking to its host
    assert orphan.process.running
    os.kill(orphan.pid, signal.SIGKILL)
    killed = time.monotonic()
    assert await asyncio.wait_for(orphan.wait(), PROMPT) is None  # gone; only a parent knows how
    assert time.monotonic() - killed < PROMPT
    assert not orphan.process.running

    newcomer.signal(signal.SIGKILL)
    assert await asyncio.wait_for(newcomer.wait(), PROMPT) == -signal.SIGKILL


async def test_spawn_in_flight_when_the_fork_server_dies_fails_cleanly(
    fork_spawner: ForkSpawner, tmp_path: Path
) -> None:
    server = fork_spawner.server.pid
    os.kill(server, signal.SIGSTOP)  # the request waits unread in its socket
    request = hold_request(tmp_path, 1, 0.2)
    request = SpawnRequest(**{**request.__dict__, "hello_timeout": 1.0})
    spawning = asyncio.create_task(fork_spawner.spawn(request))
    # in flight: the host registers a request as it sends it, and it has no answer
    await eventually(lambda: fork_spawner.server.pending, 5, "the request sent")
    os.kill(server, signal.SIGKILL)
    with pytest.raises(SpawnError):
        await spawning
    worker = await fork_spawner.spawn(hold_request(tmp_path, 2, 0.2))  # the next server forks
    await next_beat(worker)
    worker.signal(signal.SIGKILL)
    assert await worker.wait() == -signal.SIGKILL


async def test_bad_request_gets_an_error_and_the_server_keeps_serving(
    fork_spawner: ForkSpawner, fork_spawn: Spawn
) -> None:
    server = fork_spawner.server
    loop = asyncio.get_running_loop()
    reply = server.pending[0] = loop.create_future()
    server.sock.send(json.dumps({"id": 0, "env": {}}).encode())  # no fds attached
    with pytest.raises(SpawnError, match="expected 2 fds"):
        await asyncio.wait_for(reply, 5)
    worker = await fork_spawn()
    await next_beat(worker)
    worker.signal(signal.SIGKILL)
    await worker.wait()


async def test_fork_server_exits_when_the_host_hangs_up_and_workers_follow_their_channel(
    tmp_path: Path,
) -> None:
    spawner = ForkSpawner(tmp_path)
    await spawner.start()
    worker = await spawner.spawn(hold_request(tmp_path, 1, 0.2))
    server = spawner.server.pid
    await spawner.close()
    assert not alive(server)
    await next_beat(worker)  # still running: its channel is open
    worker.writer.close()
    assert await asyncio.wait_for(worker.wait(), 5) is None  # an orphan now: exit code unknown
    assert "host gone" in (tmp_path / "worker-1" / "worker.log").read_text()


PROBE = """
import json, os, socket, sys
from services.worker import runtime
from services.worker_host.forkserver import ForkServer


def probe(env, confined=()):
    print(json.dumps({"environ": dict(os.environ), "env": env, "fds": os.listdir("/proc/self/fd"),
                      "sid": os.getsid(0) == os.getpid()}), flush=True)
    return 7


runtime.run_worker = probe
ForkServer(socket.socket(fileno=int(sys.argv[1]))).serve()
"""


def probe_server() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """A fork-server running PROBE, and the host's end of its socket."""
    host, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = subprocess.Popen(
        [sys.executable, "-c", PROBE, str(server_end.fileno())],
        pass_fds=(server_end.fileno(),),
        env={"PATH": os.environ["PATH"]},
    )
    server_end.close()
    return host, server


def test_forked_child_gets_exactly_the_injected_environment_and_only_its_fds(
    tmp_path: Path,
) -> None:
    """The fork-server's child, with `run_worker` swapped for a probe that reports what it got."""
    host, server = probe_server()
    try:
        env = {"USER_ID": "user-1", "API_KEY": API_KEY, "API_SECRET": API_SECRET, "PATH": "/bin"}
        ours, theirs = socket.socketpair()
        log = tmp_path / "probe.log"
        with open(log, "wb") as out:
            socket.send_fds(
                host, [json.dumps({"id": 1, "env": env}).encode()], [theirs.fileno(), out.fileno()]
            )
        theirs.close()
        pid = json.loads(host.recv(1 << 16))["pid"]
        assert json.loads(host.recv(1 << 16)) == {"exited": pid, "code": 7}
        seen = json.loads(log.read_text())
        control = seen["env"]["RUNNER_CONTROL_FD"]
        assert seen["env"] == env | {"RUNNER_CONTROL_FD": control}
        assert seen["environ"] == seen["env"]
        others = set(seen["fds"]) - {"0", "1", "2", control}
        assert len(others) == 1  # the directory listdir itself opened: nothing inherited
        assert seen["sid"]
        ours.close()
    finally:
        host.close()
        server.wait(timeout=5)


def test_a_spare_becomes_a_worker_and_a_spare_that_dies_is_never_reported(
    tmp_path: Path,
) -> None:
    """With its spares warmed up, one is killed: the host hears nothing of it. The next two
    workers (the other spare, then one forked or a new spare) each get exactly their own
    environment and fds, and the host hears of exactly their pids and exits, in order."""
    host, server = probe_server()
    try:
        deadline = time.monotonic() + 10
        while not (len(children_of(server.pid)) == SPARES and all(
                len(sockets_of(spare)) == 1 for spare in children_of(server.pid))):
            assert time.monotonic() < deadline, "no spares warmed up"
            time.sleep(0.05)
        spares = children_of(server.pid)
        killed = min(spares)
        os.kill(killed, signal.SIGKILL)
        # reaped by the server (its pid gone): it must tell the host nothing, and would have
        # told it on reaping, before it answers the next request
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{killed}"):
            assert time.monotonic() < deadline, "the killed spare was never reaped"
            time.sleep(0.01)
        host.settimeout(10)
        for number in (1, 2):
            env = {"USER_ID": f"user-{number}", "API_KEY": API_KEY, "PATH": "/bin"}
            ours, theirs = socket.socketpair()
            log = tmp_path / f"probe-{number}.log"
            with open(log, "wb") as out:
                socket.send_fds(host, [json.dumps({"id": number, "env": env}).encode()],
                                [theirs.fileno(), out.fileno()])
            theirs.close()
            reply = json.loads(host.recv(1 << 16))
            assert reply["id"] == number and reply["pid"] != killed
            if number == 1:
                assert reply["pid"] in spares  # the spare left
            assert json.loads(host.recv(1 << 16)) == {"exited": reply["pid"], "code": 7}
            seen = json.loads(log.read_text())
            control = seen["env"]["RUNNER_CONTROL_FD"]
            assert seen["environ"] == seen["env"] == env | {"RUNNER_CONTROL_FD": control}
            assert len(set(seen["fds"]) - {"0", "1", "2", control}) == 1  # listdir's own
            assert seen["sid"]
            ours.close()
    finally:
        host.close()
        server.wait(timeout=5)
