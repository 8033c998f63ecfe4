"""The host's side of the fork-server (forkserver.py): start it, fork workers through it,
learn their exits from it, and outlive it.

If the fork-server dies, its children live on (each leads its own session and holds only its
control channel). The host starts a new fork-server and watches each orphan through a pidfd, so
its exit is still reported exactly once, with the code unknown (None): only a parent can reap.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import sys
from pathlib import Path

from services.worker import protocol
from services.worker.brokers.catalogue import PAPER
from services.worker.confinement import Confinement
from services.worker_host.forkserver import MARKETS_FLAG, encode
from services.worker_host.isolation import Isolation, Placement
from services.worker_host.spawner import (
    PlacingSpawner,
    SpawnError,
    SpawnRequest,
    WorkerProcess,
    base_environment,
    first_line,
    greeted,
    send_credentials,
    signal_group,
)

log = logging.getLogger(__name__)

REPLY_MAX = 1 << 16
RESTART_BACKOFF = (0.05, 5.0)  # seconds: first retry, ceiling (doubling while it dies young)
YOUNG = 10.0  # seconds: a fork-server dying sooner than this is crash-looping


class ForkServerLost(ConnectionError):
    """The fork-server died with the request in flight: a child may or may not exist."""


class ForkedProcess:
    """A worker forked by the fork-server; its exit comes from the server's report, or from a
    pidfd once the server is gone."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None
        self._exited = asyncio.Event()
        self._pidfd: int | None = None

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    async def wait(self) -> int | None:
        await self._exited.wait()
        return self.code

    cause = ""  # its code says all a fork-server knows

    def signal(self, sig: int) -> None:
        signal_group(self.pid, sig)

    def exited(self, code: int | None) -> None:
        if self._exited.is_set():
            return
        self.code = code
        self._exited.set()
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def orphan(self) -> None:
        """Its fork-server is gone: a pidfd tells when it exits (readable at its death)."""
        if not self.running or self._pidfd is not None:
            return
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.exited(None)
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self.exited, None)


class ForkServer:
    """One fork-server process, restarted whenever it dies; with `markets`, the one whose
    template holds the exchange adapter (forkserver.preload)."""

    def __init__(self, workdir: Path, markets: bool = False) -> None:
        self.markets = markets
        self.log_file = workdir / ("forkserver-markets.log" if markets else "forkserver.log")
        self.process: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self.up = asyncio.Event()
        self.pending: dict[int, asyncio.Future[ForkedProcess]] = {}
        self.children: dict[int, ForkedProcess] = {}
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        await self._launch()
        self._task = asyncio.create_task(self._serve(), name="fork-server")

    async def close(self) -> None:
        """Hang up (the server exits at EOF); live children are left to their channels."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.sock:
            self.sock.close()
        if self.process and self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), timeout=2.0)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        for child in self.children.values():
            child.orphan()

    async def fork(
        self, env: dict[str, str], confinement: Confinement, control_fd: int, log_fd: int
    ) -> ForkedProcess:
        """Ask for a child running `run_worker(env)`, confined by `confinement`, with the given
        control channel and log."""
        await self.up.wait()
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        reply = self.pending[request_id] = loop.create_future()
        data = encode({"id": request_id, "env": env, "confinement": confinement.to_json()})
        try:
            async with self._send_lock:
                await self._send(data, [control_fd, log_fd])
        except OSError as exc:
            self.pending.pop(request_id, None)
            raise SpawnError(f"fork-server unreachable: {exc}") from exc
        try:
            return await reply
        finally:
            self.pending.pop(request_id, None)

    async def _send(self, data: bytes, fds: list[int]) -> None:
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                socket.send_fds(self.sock, [data], fds)
                return
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(self.sock, writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(self.sock)

    async def _launch(self) -> None:
        host_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.log_file, "ab") as log_out:
                self.process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "services.worker_host.forkserver",
                    str(server_end.fileno()),
                    *([MARKETS_FLAG] if self.markets else []),
                    env=base_environment(),  # none of the host's secrets
                    pass_fds=(server_end.fileno(),),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_out,
                    stderr=log_out,
                    start_new_session=True,
                )
        except BaseException:
            host_end.close()
            raise
        finally:
            server_end.close()
        host_end.setblocking(False)
        self.sock = host_end
        self.up.set()
        log.info("fork-server started (pid %d)", self.process.pid)

    async def _serve(self) -> None:
        """Relay replies and exits; when the server dies, orphan its children and restart it."""
        loop = asyncio.get_running_loop()
        backoff = RESTART_BACKOFF[0]
        while True:
            assert self.sock is not None and self.process is not None
            born = loop.time()
            with contextlib.suppress(ConnectionError, OSError):
                while data := await loop.sock_recv(self.sock, REPLY_MAX):
                    try:
                        self._on_message(json.loads(data))
                    except (ValueError, KeyError, TypeError):
                        log.exception("unreadable message from the fork-server (ignored)")
            self.up.clear()
            self.sock.close()
            code = await self.process.wait()
            for reply in self.pending.values():
                if not reply.done():
                    reply.set_exception(ForkServerLost(f"fork-server exited ({code})"))
            orphans, self.children = self.children, {}
            for child in orphans.values():
                child.orphan()
            log.warning(
                "fork-server (pid %d) exited with %s; %d workers orphaned; restarting",
                self.process.pid,
                code,
                len(orphans),
            )
            backoff = RESTART_BACKOFF[0] if loop.time() - born > YOUNG else backoff
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF[1])
            await self._launch()

    def _on_message(self, message: dict) -> None:
        if "exited" in message:
            child = self.children.pop(message["exited"], None)
            if child is not None:
                child.exited(message["code"])
            return
        reply = self.pending.get(message["id"])
        if "pid" in message:
            child = self.children[message["pid"]] = ForkedProcess(message["pid"])
            if reply is not None and not reply.done():
                reply.set_result(child)
        elif reply is not None and not reply.done():
            reply.set_exception(SpawnError(f"fork-server could not fork: {message['error']}"))


class ForkSpawner(PlacingSpawner):
    """Workers forked from the host's fork-servers, each confined in the child before it runs a
    line of its own; its credentials reach it once the server has handed it its channel. Paper
    workers fork from `server`; workers of real markets from `markets`, started at the first."""

    def __init__(self, workdir: Path, isolation: Isolation | None = None) -> None:
        self.server = ForkServer(workdir)
        self.markets = ForkServer(workdir, markets=True)
        self._markets_started: asyncio.Future[None] | None = None
        self.isolation = isolation or Isolation()

    async def start(self) -> None:
        await self.isolation.start()
        await self.server.start()

    async def close(self) -> None:
        await self.markets.close()
        await self.server.close()
        await self.isolation.close()

    async def _server_for(self, env: dict[str, str]) -> ForkServer:
        if env.get(protocol.ENV_BROKER_ID, PAPER) == PAPER:
            return self.server
        if self._markets_started is None:
            self._markets_started = asyncio.ensure_future(self.markets.start())
        await asyncio.shield(self._markets_started)
        return self.markets

    async def _start(self, request: SpawnRequest, placement: Placement) -> WorkerProcess:
        host_end, child_end = socket.socketpair()
        try:
            server = await self._server_for(request.env)
            forked = server.fork(request.env, self.isolation.confinement(placement),
                                 child_end.fileno(), placement.log_fd)
            process = await asyncio.wait_for(forked, timeout=request.hello_timeout)
        except ForkServerLost:
            return await self._adopt(request, host_end)
        except BaseException as exc:
            host_end.close()
            if isinstance(exc, TimeoutError):
                raise SpawnError("the fork-server did not answer in time") from None
            raise
        finally:
            child_end.close()
            os.close(placement.log_fd)
        # The server has closed its copies of the channel before it answered: the child alone
        # holds the other end.
        try:
            send_credentials(host_end, request.credentials)
        except OSError:
            pass  # it has died already: greeted reports it
        return await greeted(request, process, host_end)

    async def _adopt(self, request: SpawnRequest, host_end: socket.socket) -> WorkerProcess:
        """The fork-server died with our request in flight: a child it forked says hello (with
        its pid) and is watched as an orphan; if none does in time, closing the channel ends a
        late one at its first read (EXIT_HOST_GONE). The credentials go first, since only such a
        child holds the channel's other end now."""
        try:
            send_credentials(host_end, request.credentials)
        except OSError:
            host_end.close()
            raise SpawnError("the fork-server died while forking this worker") from None
        reader, writer = await asyncio.open_unix_connection(sock=host_end,
                                                            limit=protocol.MAX_LINE)
        hello = await first_line(reader, request.hello_timeout)
        if not isinstance(hello, protocol.Hello):
            writer.close()
            raise SpawnError("the fork-server died while forking this worker")
        process = ForkedProcess(hello.pid)
        process.orphan()
        return WorkerProcess(
            request.worker_id,
            request.job_id,
            request.user_id,
            request.attempt,
            process,
            reader,
            writer,
        )
