"""The fork-server: a pre-imported template process that forks workers on its host's request.

`python -m services.worker_host.forkserver FD [--markets]` (FD: its end of a SOCK_SEQPACKET
socket to the worker-host; `--markets`: for workers of real markets, see `preload`). It holds
no secrets and no connection, keeps `SPARES` children forked and warmed up ahead, and each child
takes its confinement (`services.worker.confinement`) before it runs the worker, so no strategy
code ever runs with the server's privileges.

Wire (one JSON object per packet):
- host → server: `{"id": n, "env": {...}, "confinement": "<json>"}` with two fds attached
  (SCM_RIGHTS): the worker's end of its control socketpair and its log file.
- server → host: `{"id": n, "pid": p}` once a child runs it (or `{"id": n, "error": "..."}`),
  and `{"exited": p, "code": c}` when it reaps a worker (`c` negative for a signal, like
  asyncio). A worker's pid always reaches the host before its exit; a spare that dies before
  it is given a worker is never reported.
- The server exits when the host closes the socket; its workers live on until their control
  channels close.

The server is a plain synchronous loop (no threads, no event loop), so a fork copies nothing
half-done.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import selectors
import signal
import socket
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import uvloop

from services.worker import protocol
from services.worker.confinement import Confinement, confine, set_dumpable

REQUEST_MAX = 1 << 20  # bytes: a worker's environment is a few KiB
FDS_PER_REQUEST = 2
SPARES = 2  # children forked and warmed up ahead, each waiting to become the next worker
# Python quickens a function after 8 calls, then specializes its instructions as they run.
REHEARSALS = 10
MARKETS_FLAG = "--markets"  # serves workers of real markets: the exchange adapter preloaded


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def preload(markets: bool = False) -> None:
    """Import (and warm) everything a worker needs, so a forked child only runs: the paper
    broker, and with `markets` the exchange adapter with ccxt (whose package imports all of its
    exchanges: shared here once, not imported by each worker). Without them the server is much
    smaller, and so is what each fork copies (its page tables) and each exit tears down."""
    from services.worker import runtime  # noqa: F401
    from services.worker.brokers import paper  # noqa: F401
    from services.worker.confinement import libseccomp
    from services.worker.strategies.base import BUILTIN_STRATEGIES, find_strategy

    for name in BUILTIN_STRATEGIES:
        find_strategy(name)
    if markets:
        from services.worker.brokers import exchange, live_paper  # noqa: F401

        exchange.client_class("deribit")({})  # a client's first construction fills caches
        exchange.tls_context()
    libseccomp()  # loaded (and relocated) once, shared by every worker
    # The layers every child takes that suit the server as well (umask 077, no core file, no
    # new privileges, not dumpable), taken here as often as a rehearsal: so its children run
    # `confine` already specialized, as they run the worker.
    for _ in range(REHEARSALS):
        confine(Confinement())
    rehearse()  # what the runtime runs, and asyncio sets up on first use, is shared too
    # Objects made so far are shared with every child: keep the collector from touching (and so
    # copying) their pages.
    gc.collect()
    gc.freeze()


def warm_up() -> None:
    """What a worker does first, done once ahead: an event loop with a unix-socket connection
    and a signal handler. In a spare this copies (on write) the pages a worker's start touches
    before any worker is due."""

    async def start_like_a_worker() -> None:
        ours, theirs = socket.socketpair()
        _, writer = await asyncio.open_unix_connection(sock=ours)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: None)
        loop.remove_signal_handler(signal.SIGTERM)
        writer.close()
        theirs.close()

    uvloop.run(start_like_a_worker())  # the workers' loop (see services/cli/main.py)


def rehearse(times: int = REHEARSALS) -> None:
    """Run a paper `hold` worker's whole life (hello, beats, a buy, a stop with flatten) `times`
    times here before the first fork, so that children start from code already specialized:
    Python writes to the code it runs as it quickens it, and each such write in a child would
    copy a page of the server's. A failed rehearsal is reported."""
    from services.worker.confinement import Confinement, Limits, describe_limits
    from services.worker.runtime import run_worker

    code: int | str = 0
    with _quietly(), tempfile.TemporaryDirectory() as scratch:
        for _ in range(times):
            ours, theirs = socket.socketpair()
            ours.sendall(protocol.encode(protocol.Credentials()))  # what a host sends first
            ours.sendall(protocol.encode(protocol.Stop(flatten=True)))  # read after its hello
            env = {
                protocol.ENV_USER_ID: "rehearsal",
                protocol.ENV_STRATEGY_ID: "rehearsal",
                protocol.ENV_BROKER_ID: "paper",
                protocol.ENV_CONFIG: json.dumps({"name": "rehearsal", "type": "hold"}),
                protocol.ENV_WORKER_ID: "rehearsal",
                protocol.ENV_JOB_ID: "rehearsal",
                protocol.ENV_STATE_FILE: os.path.join(scratch, "account.json"),
                protocol.ENV_CONTROL_FD: str(theirs.detach()),  # the runtime closes it
            }
            # What a child does before it runs the worker, but taking the layers themselves.
            work = Confinement(directory=scratch, limits=Limits(1 << 40, 1024, 1024)).to_json()
            confined = [describe_limits(Confinement.from_json(work).limits)]
            try:
                code = run_worker(env, confined)
            except Exception as exc:
                code = f"{type(exc).__name__}: {exc}"
            finally:
                ours.close()
            if code != 0:
                break
    if code != 0:
        print(f"fork-server: a rehearsal failed ({code}); workers start unrehearsed",
              file=sys.stderr, flush=True)


@contextmanager
def _quietly() -> Iterator[None]:
    """What a rehearsal sets for itself undone: its log lines (stderr is the server's log), its
    logging handlers and its signal handlers (the server ignores SIGINT)."""
    signals = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stderr, stderr_fd = sys.stderr, os.dup(2)
    with open(os.devnull, "w") as devnull:
        try:
            os.dup2(devnull.fileno(), 2)
            sys.stderr = devnull
            yield
        finally:
            sys.stderr = stderr
            os.dup2(stderr_fd, 2)
            os.close(stderr_fd)
            root.handlers[:] = handlers
            root.setLevel(level)
            for signum, handler in signals.items():
                signal.signal(signum, handler)


class ForkServer:
    """Serves its host's requests; keeps `spares` children forked and warmed up ahead, each
    waiting to become the next worker, so that a request need not wait for a fork's copying on
    write. A request that finds no spare ready forks at once; spares are replaced while no
    request waits."""

    def __init__(self, host: socket.socket, spares: int = SPARES) -> None:
        self.host = host
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        self.selector.register(self.host, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.spares_wanted = spares
        self.spares: deque[tuple[int, socket.socket]] = deque()  # (pid, our end), oldest first
        self.spare_pids: set[int] = set()  # spares not (yet) a worker: their exits are not told
        self.spares_lost = 0  # spares that died waiting, in a row

    def serve(self) -> None:
        """Until the host hangs up: start a worker on request, report every reaped worker, and
        top the spares up whenever nothing waits."""
        while True:
            short = len(self.spares) < self.spares_wanted
            events = self.selector.select(0 if short else None)
            for key, _ in events:
                if key.fileobj is self.host:
                    if not self.on_request():
                        return
                else:
                    self.reap()
            if short and not events:
                self.add_spare()

    def on_request(self) -> bool:
        message, fds, _, _ = socket.recv_fds(self.host, REQUEST_MAX, FDS_PER_REQUEST)
        if not message:
            return False
        request: dict = {}
        try:
            request = json.loads(message)
            if len(fds) != FDS_PER_REQUEST:
                raise ValueError(f"expected {FDS_PER_REQUEST} fds, got {len(fds)}")
            control_fd, log_fd = fds
            work = {"env": request["env"], "confinement": request.get("confinement")}
            pid = self.start(work, control_fd, log_fd)
            reply = {"id": request["id"], "pid": pid}
        except Exception as exc:  # a bad request must not take the server down
            reply = {"id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:  # the child has its copies; the server keeps no worker's fds
                os.close(fd)
        self.host.sendall(encode(reply))
        return True

    def start(self, work: dict, control_fd: int, log_fd: int) -> int:
        """The pid of a worker for `work` (its env and confinement): the oldest spare becomes it,
        or a child forked now."""
        while self.spares:
            pid, channel = self.spares.popleft()
            try:
                socket.send_fds(channel, [encode(work)], [control_fd, log_fd])
            except OSError:  # it died waiting (reaped, untold, in the loop): the next one
                continue
            finally:
                channel.close()
            self.spare_pids.discard(pid)
            self.spares_lost = 0
            return pid
        return self.fork(work, control_fd, log_fd)

    def fork(self, work: dict, control_fd: int, log_fd: int) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.child(lambda: (work, control_fd, log_fd))  # never returns
        return pid

    def add_spare(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:  # no spares then; every request forks
            print(f"fork-server: no spares ({exc})", file=sys.stderr, flush=True)
            self.spares_wanted = 0
            ours.close()
            theirs.close()
            return
        if pid == 0:
            ours.close()
            self.child(lambda: self.wait_for_work(theirs))  # never returns
        theirs.close()
        self.spares.append((pid, ours))
        self.spare_pids.add(pid)

    @staticmethod
    def wait_for_work(channel: socket.socket) -> tuple[dict, int, int] | None:
        """A spare: warm up, then wait for a worker's work and fds (None: the server is gone)."""
        warm_up()
        message, fds, _, _ = socket.recv_fds(channel, REQUEST_MAX, FDS_PER_REQUEST)
        channel.close()
        if not message or len(fds) != FDS_PER_REQUEST:
            return None
        control_fd, log_fd = fds
        return json.loads(message), control_fd, log_fd

    def child(self, work: Callable[[], tuple[dict, int, int] | None]) -> NoReturn:
        """A forked child: leave the server (its session, signals and fds), then run as the
        worker `work()` names, if any, and exit with its code."""
        code = 1
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.selector.close()
            self.host.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            for _, channel in self.spares:
                channel.close()
            assignment = work()
            code = 0 if assignment is None else self.become_worker(*assignment)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    @staticmethod
    def become_worker(work: dict, control_fd: int, log_fd: int) -> int:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # Only stdio and the control channel stay open: never the server's socket or pipe,
        # never another worker's channel.
        os.closerange(3, control_fd)
        os.closerange(control_fd + 1, os.sysconf("SC_OPEN_MAX"))
        os.set_inheritable(control_fd, False)
        spec = work.get("confinement")
        confined = confine(Confinement.from_json(spec) if spec else Confinement())
        env = work["env"] | {protocol.ENV_CONTROL_FD: str(control_fd)}
        os.environ.clear()
        os.environ.update(env)
        from services.worker.runtime import run_worker

        return run_worker(env, confined)

    def reap(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.spare_pids:  # never a worker: nothing to tell the host
                self.spare_pids.discard(pid)
                self.drop_spare(pid)
                continue
            self.host.sendall(encode({"exited": pid, "code": os.waitstatus_to_exitcode(status)}))

    def drop_spare(self, pid: int) -> None:
        """A spare died waiting; after a few in a row, stop keeping spares (each would only
        fail the same way) and fork on request."""
        for spare in [s for s in self.spares if s[0] == pid]:
            self.spares.remove(spare)
            spare[1].close()
        self.spares_lost += 1
        if self.spares_lost >= 3 and self.spares_wanted:
            print("fork-server: spares keep dying; forking on request only", file=sys.stderr,
                  flush=True)
            self.spares_wanted = 0


def main() -> None:
    host = socket.socket(fileno=int(sys.argv[1]))
    set_dumpable(False)  # its children inherit it until their own confinement
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when it stops (EOF)
    preload(markets=MARKETS_FLAG in sys.argv[2:])
    try:
        ForkServer(host).serve()
    except ConnectionError:  # the host is gone mid-reply: nothing left to serve
        pass


if __name__ == "__main__":
    main()
