"""The fork-server: a pre-imported template process that forks workers on its host's request.

`python -m services.worker_host.forkserver FD` — FD is its end of a SOCK_SEQPACKET socket to
the worker-host. It imports the worker runtime, the strategies and the paper broker once, and
holds no secrets (its environment is the host's INHERITED variables only) and no connection.

Wire (one JSON object per packet):
- host → server: `{"id": n, "env": {...}}` with two fds attached (SCM_RIGHTS): the worker's end
  of its control socketpair and its log file.
- server → host: `{"id": n, "pid": p}` once forked (or `{"id": n, "error": "..."}`), and
  `{"exited": p, "code": c}` when it reaps a child (`c` negative for a signal, like asyncio).
  A child's pid always reaches the host before its exit.

The server is a plain synchronous loop (no threads, no event loop), so a fork copies nothing
half-done; the child starts its own asyncio loop in `run_worker`. The server exits when the host
closes the socket; its children live on until their control channels close.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import sys
import traceback

from services.worker.protocol import ENV_CONTROL_FD

REQUEST_MAX = 1 << 20  # bytes: a worker's environment is a few KiB
FDS_PER_REQUEST = 2


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def preload() -> None:
    """Import (and warm) everything a worker needs, so a forked child only runs."""
    from services.worker import runtime  # noqa: F401
    from services.worker.brokers import paper  # noqa: F401
    from services.worker.strategies.base import BUILTIN_STRATEGIES, load_strategy

    for name in BUILTIN_STRATEGIES:
        load_strategy(name)
    # Objects made so far are shared with every child: keep the collector from touching (and so
    # copying) their pages.
    gc.collect()
    gc.freeze()


class ForkServer:
    def __init__(self, host: socket.socket) -> None:
        self.host = host
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        self.selector.register(self.host, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)

    def serve(self) -> None:
        """Until the host hangs up: fork on request, report every reaped child."""
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.host:
                    if not self.on_request():
                        return
                else:
                    self.reap()

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
            pid = self.fork(request["env"], control_fd, log_fd)
            reply = {"id": request["id"], "pid": pid}
        except Exception as exc:  # a bad request must not take the server down
            reply = {"id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:  # the child has its copies; the server keeps no worker's fds
                os.close(fd)
        self.host.sendall(encode(reply))
        return True

    def fork(self, env: dict[str, str], control_fd: int, log_fd: int) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.become_worker(env, control_fd, log_fd)  # never returns
        return pid

    def become_worker(self, env: dict[str, str], control_fd: int, log_fd: int) -> None:
        code = 1
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.selector.close()
            self.host.close()
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            # Only stdio and the control channel stay open: never the server's socket or pipe,
            # never another worker's channel.
            os.closerange(3, control_fd)
            os.closerange(control_fd + 1, os.sysconf("SC_OPEN_MAX"))
            os.set_inheritable(control_fd, False)
            env = env | {ENV_CONTROL_FD: str(control_fd)}
            os.environ.clear()
            os.environ.update(env)
            from services.worker.runtime import run_worker

            code = run_worker(env)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

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
            self.host.sendall(encode({"exited": pid, "code": os.waitstatus_to_exitcode(status)}))


def main() -> None:
    host = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when it stops (EOF)
    preload()
    try:
        ForkServer(host).serve()
    except ConnectionError:  # the host is gone mid-reply: nothing left to serve
        pass


if __name__ == "__main__":
    main()
