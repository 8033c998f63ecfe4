"""Spawning worker processes and talking to them over their control channels.

Two spawners give the same `WorkerProcess`: `ExecSpawner` runs `python -m services.worker` per
worker (a fresh interpreter importing everything), `ForkSpawner` (fork_spawner.py) asks a
pre-imported fork-server to fork one (an order of magnitude faster, most pages shared; figures
in bench/spawn.py). `RUNNER_SPAWN_MODE` picks one (default fork).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from services.worker import protocol

# The only variables of the host's own environment a worker (or the fork-server) inherits: never
# the host's secrets (no deployment key, no admin token, no broker URL).
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "SYSTEMROOT")
# libuv, under uvloop, gives each event loop two io_uring rings, one with a kernel thread polling
# it, for file operations a worker never makes through its loop. Without them a worker's start
# took about 1 ms less CPU (7.2-8.0 ms against 8.1-9.3 in bursts of 200), and 1,000 workers hold
# no 1,000 kernel threads. libuv reads it once per process, at its first loop: the fork-server's
# first (its rehearsal's) decides for the children it forks.
WORKER_LOOP_ENV = {"UV_USE_IO_URING": "0"}
CANNOT_START_EXIT_WAIT = 2.0  # seconds a worker that cannot start has to exit by itself


def base_environment() -> dict[str, str]:
    """What a worker's process, and the fork-server, start from: the host's `INHERITED`
    variables (none of its secrets) and `WORKER_LOOP_ENV`."""
    return {k: os.environ[k] for k in INHERITED if k in os.environ} | WORKER_LOOP_ENV


class SpawnError(RuntimeError):
    """The worker did not come up (no hello in time, or exited at once). `permanent`: it said
    restarting cannot help (e.g. the exchange rejected its API key); the message is then the
    reason the user reads."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class OsProcess(Protocol):
    """What the host needs of a worker's OS process, whoever spawned it."""

    @property
    def pid(self) -> int: ...

    @property
    def running(self) -> bool: ...

    async def wait(self) -> int | None:
        """The exit code once it has exited (negative: killed by that signal, as in asyncio;
        None: gone, code unknown)."""
        ...


@dataclass(frozen=True)
class ExecProcess:
    """An exec'd worker: a child of the host, reaped by asyncio."""

    process: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def wait(self) -> int | None:
        return await self.process.wait()


@dataclass
class WorkerProcess:
    """A live worker: its process, its control channel, and why it is being ended (if it is)."""

    worker_id: str
    job_id: str
    user_id: str
    attempt: int
    process: OsProcess
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    started: float = field(default_factory=lambda: asyncio.get_running_loop().time())
    beating: bool = False  # a heartbeat of it has been relayed
    end_reason: str | None = (
        None  # set when the host ends it: "stop", "heartbeat", "fenced", "drain"
    )

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self) -> int | None:
        return await self.process.wait()

    def send(self, line: protocol.Stop | protocol.Lease) -> None:
        """Best effort, straight to the socket rather than through the stream's transport: a
        write to a worker that has just exited fails, and in the transport that failure would
        also close the reading side, losing the worker's last lines (its final reports) still
        unread in the socket. Lines are a few dozen bytes; a worker that stops reading until its
        buffer fills is hung, and the watchdog deals with it."""
        with contextlib.suppress(OSError):  # already gone: the supervisor reports its exit
            os.write(self.writer.get_extra_info("socket").fileno(), protocol.encode(line))

    def signal(self, sig: int) -> None:
        """`sig` to the worker's process group (it leads its own session)."""
        if self.process.running:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    async def terminate(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds if it is still alive."""
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout=grace)
        except TimeoutError:
            self.signal(signal.SIGKILL)


@dataclass(frozen=True)
class SpawnRequest:
    worker_id: str
    job_id: str
    user_id: str
    attempt: int
    env: dict[str, str]
    log_file: Path
    hello_timeout: float


class Spawner(Protocol):
    async def start(self) -> None: ...

    async def spawn(self, request: SpawnRequest) -> WorkerProcess: ...

    async def close(self) -> None: ...


def worker_environment(
    *,
    worker_id: str,
    job_id: str,
    user_id: str,
    strategy_id: str,
    broker_id: str,
    credentials: Mapping[str, str],
    config_json: str,
    heartbeat_interval: float,
    state_file: Path,
    lease_until: float | None = None,
    broker_urls: str | None = None,
    flatten_timeout: float | None = None,
    feed_socket: Path | None = None,
    mode: str | None = None,
) -> dict[str, str]:
    """The seed's per-worker environment plus the runtime's own. `broker_urls`: the raw JSON of
    RUNNER_BROKER_URLS; `flatten_timeout`: seconds a flatten may take (the runtime's default
    when None); `feed_socket`: the host's market-data feed; `mode` "flatten": a flatten-only
    run."""
    env = base_environment() | {
        protocol.ENV_USER_ID: user_id,
        protocol.ENV_STRATEGY_ID: strategy_id,
        protocol.ENV_BROKER_ID: broker_id,
        protocol.ENV_API_KEY: credentials.get("apiKey", ""),
        protocol.ENV_API_SECRET: credentials.get("apiSecret", ""),
        protocol.ENV_CONFIG: config_json,
        protocol.ENV_WORKER_ID: worker_id,
        protocol.ENV_JOB_ID: job_id,
        protocol.ENV_HEARTBEAT_INTERVAL: str(heartbeat_interval),
        protocol.ENV_STATE_FILE: str(state_file),
    }
    if lease_until is not None:
        env[protocol.ENV_LEASE_UNTIL] = repr(lease_until)
    if broker_urls:
        env[protocol.ENV_BROKER_URLS] = broker_urls
    if flatten_timeout is not None:
        env[protocol.ENV_FLATTEN_TIMEOUT] = repr(flatten_timeout)
    if feed_socket is not None:
        env[protocol.ENV_FEED_SOCKET] = str(feed_socket)
    if mode is not None:
        env[protocol.ENV_WORKER_MODE] = mode
    return env


async def greeted(
    request: SpawnRequest, process: OsProcess, host_end: socket.socket
) -> WorkerProcess:
    """The worker once it has said hello on its channel; killed and SpawnError otherwise. A
    worker that says why it cannot start (`CannotStart`) is waited for briefly, then killed:
    its reason is the error, permanent when it says so or exits EXIT_CREDENTIALS_REJECTED."""
    reader, writer = await asyncio.open_unix_connection(sock=host_end)
    worker = WorkerProcess(
        request.worker_id, request.job_id, request.user_id, request.attempt, process, reader, writer
    )
    try:
        line = await asyncio.wait_for(reader.readline(), timeout=request.hello_timeout)
        hello = protocol.decode(line) if line else None
    except (TimeoutError, ValueError):
        hello = None
    if not isinstance(hello, protocol.Hello):
        if isinstance(hello, protocol.CannotStart):
            with contextlib.suppress(TimeoutError):  # it exits on its own right after
                await asyncio.wait_for(process.wait(), timeout=CANNOT_START_EXIT_WAIT)
        worker.signal(signal.SIGKILL)
        code = await process.wait()
        writer.close()
        if isinstance(hello, protocol.CannotStart):
            permanent = hello.permanent or code == protocol.EXIT_CREDENTIALS_REJECTED
            raise SpawnError(hello.reason, permanent=permanent)
        raise SpawnError(f"worker did not start (exit code {code}; see {request.log_file.name})",
                         permanent=code == protocol.EXIT_CREDENTIALS_REJECTED)
    return worker


class ExecSpawner:
    """`python -m services.worker` in its own session per worker."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def spawn(self, request: SpawnRequest) -> WorkerProcess:
        host_end, child_end = socket.socketpair()
        request.log_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(request.log_file, "ab") as log:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "services.worker",
                    env=request.env | {protocol.ENV_CONTROL_FD: str(child_end.fileno())},
                    pass_fds=(child_end.fileno(),),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
        except BaseException:
            host_end.close()
            raise
        finally:
            child_end.close()
        return await greeted(request, ExecProcess(process), host_end)


def raise_open_files_limit() -> int:
    """The soft limit on open files raised to the hard one: the host holds one control channel
    per worker, and the usual soft default (1,024) would cap it below 1,000 workers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # an unlimited hard limit cannot be the soft one
        return soft
    return hard


def make_spawner(mode: str, workdir: Path) -> Spawner:
    """The spawner `RUNNER_SPAWN_MODE` names: "fork" (default) or "exec"."""
    if mode == "exec":
        return ExecSpawner()
    if mode == "fork":
        from services.worker_host.fork_spawner import ForkSpawner

        return ForkSpawner(workdir)
    raise ValueError(f"unknown spawn mode {mode!r} (fork or exec)")
