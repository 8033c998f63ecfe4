"""Spawning worker processes and talking to them over their control channels.

`ExecSpawner` runs `python -m services.worker` per worker, `ForkSpawner` (fork_spawner.py) has a
pre-imported fork-server fork one (faster, most pages shared). Either way a worker runs in a
directory of its own, placed and confined by the spawner's `Isolation` (isolation.py), and gets
its credentials over its channel, never in its environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from events.values import ID_PATTERN
from services.worker import protocol
from services.worker.confinement import ENV_CONFINEMENT
from services.worker_host.children import Child
from services.worker_host.isolation import (
    LOG_NAME,
    STATE_NAME,
    Isolation,
    Placement,
    PoolExhausted,
)

# The only variables of the host's own environment a worker (or the fork-server) inherits: never
# the host's secrets (no deployment key, no admin token, no broker URL). UV_USE_IO_URING=0 is
# also what a sandboxed worker needs: its io_uring calls are refused (confinement.py).
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "SYSTEMROOT",
             "RUNNER_ENABLE_CHAOS")
# libuv, under uvloop, gives each event loop two io_uring rings, one with a kernel thread polling
# it, for file operations a worker never makes through its loop: without them a worker starts on
# less CPU and holds no kernel thread. libuv reads it once per process, at its first loop: the
# fork-server's first (its rehearsal's) decides for the children it forks.
WORKER_LOOP_ENV = {"UV_USE_IO_URING": "0"}
CANNOT_START_EXIT_WAIT = 2.0  # seconds a worker that cannot start has to exit by itself
# Neither the fork-server nor a worker writes bytecode into the shared tree: written under
# umask 077 it would be unreadable to every other worker's uid (the Makefile compiles it, 0644).
NO_BYTECODE = {"PYTHONDONTWRITEBYTECODE": "1"}


def base_environment() -> dict[str, str]:
    """What a worker's process, and the fork-server, start from: the host's `INHERITED`
    variables (none of its secrets) and `WORKER_LOOP_ENV`."""
    return {k: os.environ[k] for k in INHERITED if k in os.environ} | WORKER_LOOP_ENV | NO_BYTECODE


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

    @property
    def cause(self) -> str:
        """What ended it, when whoever ran it knows more than its code (a container engine's
        out-of-memory kill); "" otherwise."""
        ...

    async def wait(self) -> int | None:
        """The exit code once it has exited (negative: killed by that signal, as in asyncio;
        None: gone, code unknown)."""
        ...

    def signal(self, sig: int) -> None:
        """`sig` to the worker and everything it started (its process group, its container)."""
        ...


def signal_group(pid: int, sig: int) -> None:
    """`sig` to the process group `pid` leads (a worker leads its own session), if any is
    left."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


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
        None  # set when the host ends it: "stop", "heartbeat", "fenced", "drain", "protocol"
    )
    end_detail: str = ""  # what it did wrong, when it broke the protocol
    budget: protocol.LineBudget = field(default_factory=protocol.LineBudget)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self) -> int | None:
        return await self.process.wait()

    async def next_line(self) -> bytes:
        """Its next control line, b"" at the end; ProtocolViolation for a line over
        `protocol.MAX_LINE` or one beyond its `budget` of lines a second (the caller then
        ends it: `violated`)."""
        try:
            line = await self.reader.readline()
        except ValueError:  # the reader's limit: a line that long is cut off
            raise protocol.ProtocolViolation(
                f"a line over {protocol.MAX_LINE} bytes") from None
        if line and not self.budget.take(asyncio.get_running_loop().time()):
            raise protocol.ProtocolViolation(
                f"more than {self.budget.rate:g} lines a second")
        return line

    def violated(self, violation: protocol.ProtocolViolation) -> None:
        """It broke the protocol: killed, and its end reported as that (end_reason
        "protocol", end_detail what it did)."""
        self.end_reason = self.end_reason or "protocol"
        self.end_detail = str(violation)
        self.signal(signal.SIGKILL)
        self.signal(signal.SIGCONT)

    def send(self, line: protocol.Stop | protocol.Lease) -> None:
        self.send_encoded(protocol.encode(line))

    def send_encoded(self, line: bytes) -> None:
        """Best effort, straight to the socket rather than through the stream's transport, in
        which a failed write to a worker that has just exited would also close the reading side
        and lose its last lines still unread. What does not fit in a full buffer is dropped (a
        worker that stops reading is hung: the watchdog deals with it)."""
        with contextlib.suppress(OSError):  # already gone: the supervisor reports its exit
            os.write(self.writer.get_extra_info("socket").fileno(), line)

    def signal(self, sig: int) -> None:
        """`sig` to the worker's process group (it leads its own session), or its container."""
        if self.process.running:
            self.process.signal(sig)

    async def terminate(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds if it is still alive."""
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout=grace)
        except TimeoutError:
            self.signal(signal.SIGKILL)


@dataclass(frozen=True)
class SpawnRequest:
    """One worker to start: its environment (no secret in it), its own `directory` (made and
    given to it: its log `worker.log` and its state live there) and its `credentials` (the
    seed's apiKey and apiSecret), which reach it over its channel only."""

    worker_id: str
    job_id: str
    user_id: str
    attempt: int
    env: dict[str, str]
    directory: Path
    hello_timeout: float
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)
    image: str | None = None  # the image its strategy names (container workers; None: default)

    @property
    def log_file(self) -> Path:
        return self.directory / LOG_NAME


class Spawner(Protocol):
    isolation: Isolation

    async def start(self) -> None: ...

    async def spawn(self, request: SpawnRequest) -> WorkerProcess: ...

    async def close(self) -> None: ...

    def describe(self) -> str:
        """One line for the log and for `GET /admin/hosts`: how its workers are isolated."""
        ...


def worker_environment(
    *,
    worker_id: str,
    job_id: str,
    user_id: str,
    strategy_id: str,
    broker_id: str,
    config_json: str,
    heartbeat_interval: float,
    lease_until: float | None = None,
    broker_urls: str | None = None,
    flatten_timeout: float | None = None,
    mode: str | None = None,
) -> dict[str, str]:
    """The seed's per-worker environment (but its credentials) plus the runtime's own.
    `broker_urls`: the raw JSON of RUNNER_BROKER_URLS; `flatten_timeout`: seconds a flatten may
    take (the runtime's default when None); `mode`
    "flatten": a flatten-only run."""
    env = base_environment() | {
        protocol.ENV_USER_ID: user_id,
        protocol.ENV_STRATEGY_ID: strategy_id,
        protocol.ENV_BROKER_ID: broker_id,
        protocol.ENV_CONFIG: config_json,
        protocol.ENV_WORKER_ID: worker_id,
        protocol.ENV_JOB_ID: job_id,
        protocol.ENV_HEARTBEAT_INTERVAL: str(heartbeat_interval),
        protocol.ENV_STATE_FILE: STATE_NAME,
    }
    if lease_until is not None:
        env[protocol.ENV_LEASE_UNTIL] = repr(lease_until)
    if broker_urls:
        env[protocol.ENV_BROKER_URLS] = broker_urls
    if flatten_timeout is not None:
        env[protocol.ENV_FLATTEN_TIMEOUT] = repr(flatten_timeout)
    if mode is not None:
        env[protocol.ENV_WORKER_MODE] = mode
    return env


def send_credentials(host_end: socket.socket, credentials: Mapping[str, str]) -> None:
    """The worker's first line, written into its channel (a few hundred bytes: the socket's
    buffer holds them until the worker reads)."""
    line = protocol.Credentials(
        api_key=credentials.get("apiKey", ""), api_secret=credentials.get("apiSecret", "")
    )
    host_end.sendall(protocol.encode(line))


class PlacingSpawner:
    """What both spawners share: each worker placed by `isolation` (a uid, its directory, its
    log) before it starts, and its uid given back once it has ended (isolation.py)."""

    isolation: Isolation
    runs_images = False  # whether a strategy's own image (SpawnRequest.image) can be honoured

    def describe(self) -> str:
        return self.isolation.describe()

    async def spawn(self, request: SpawnRequest) -> WorkerProcess:
        if not re.fullmatch(ID_PATTERN, request.worker_id) or (
                request.directory.name != request.worker_id):
            raise SpawnError(f"worker {request.worker_id!r}: not an id, or not its directory")
        if request.image is not None and not self.runs_images:
            raise SpawnError(f"config.image {request.image!r} needs a worker-host running "
                             "containers (RUNNER_SPAWN_MODE=container); this one runs processes",
                             permanent=True)
        try:
            placement = self.isolation.place(request.worker_id, request.directory)
        except PoolExhausted as exc:
            raise SpawnError(str(exc)) from None
        try:
            worker = await self._start(request, placement)
        except BaseException:
            self.isolation.release_when_gone(placement, None)
            raise
        self.isolation.release_when_gone(placement, worker.wait)
        return worker

    async def _start(self, request: SpawnRequest, placement: Placement) -> WorkerProcess:
        """Start the worker of `placement` (closing its `log_fd`) and greet it."""
        raise NotImplementedError


async def first_line(reader: asyncio.StreamReader, timeout: float) -> object:
    """The first line a worker sends on its channel, decoded; None when none comes within
    `timeout` seconds or it is not a valid line."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout=timeout)
        return protocol.decode(line) if line else None
    except (TimeoutError, ValueError):
        return None


async def greeted(
    request: SpawnRequest, process: OsProcess, host_end: socket.socket
) -> WorkerProcess:
    """The worker once it has said hello on its channel; killed and SpawnError otherwise. A
    worker that says why it cannot start (`CannotStart`) is waited for briefly, then killed:
    its reason is the error, permanent when it says so or exits EXIT_CREDENTIALS_REJECTED."""
    reader, writer = await asyncio.open_unix_connection(sock=host_end, limit=protocol.MAX_LINE)
    worker = WorkerProcess(
        request.worker_id, request.job_id, request.user_id, request.attempt, process, reader, writer
    )
    hello = await first_line(reader, request.hello_timeout)
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


class ExecSpawner(PlacingSpawner):
    """`python -m services.worker` in its own session per worker: switched to its identity and
    into its directory before the exec, confined by itself right after (`RUNNER_CONFINEMENT`).
    `-P`: its directory, its working one, is not on its import path. Started by Popen, since
    uvloop's subprocess_exec cannot switch ids (children.py)."""

    def __init__(self, isolation: Isolation | None = None) -> None:
        self.isolation = isolation or Isolation()

    async def start(self) -> None:
        await self.isolation.start()

    async def close(self) -> None:
        await self.isolation.close()

    async def _start(self, request: SpawnRequest, placement: Placement) -> WorkerProcess:
        host_end, child_end = socket.socketpair()
        identity = placement.identity
        # Its uid and its directory are set before the exec; the rest it takes itself after.
        after_exec = replace(self.isolation.confinement(placement), directory=None, uid=None,
                             gid=None)
        try:
            process = Child.start(
                [sys.executable, "-P", "-m", "services.worker"],
                env=request.env | {protocol.ENV_CONTROL_FD: str(child_end.fileno()),
                                   ENV_CONFINEMENT: after_exec.to_json()},
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=placement.log_fd,
                stderr=placement.log_fd,
                start_new_session=True,
                cwd=placement.directory,
                umask=0o077,
                user=identity.uid if identity else None,
                group=identity.gid if identity else None,
                extra_groups=[] if identity else None,
            )
            send_credentials(host_end, request.credentials)
        except BaseException:
            host_end.close()
            raise
        finally:
            child_end.close()
            os.close(placement.log_fd)
        return await greeted(request, process, host_end)


def raise_open_files_limit() -> int:
    """The soft limit on open files raised to the hard one: the host holds one control channel
    per worker, and the usual soft default (1,024) would cap it below 1,000 workers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # an unlimited hard limit cannot be the soft one
        return soft
    return hard
