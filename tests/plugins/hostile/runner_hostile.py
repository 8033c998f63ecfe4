"""A hostile strategy, for Runner Orchestrator's isolation tests only (docs/SECURITY.md).

Installed like any plugin, through the `runner.strategies` entry point (the dist-info beside
it). `attack: escape` tries, from inside its worker, every escape a plugin could try against the
targets its parameters name (other users' workers, the host, the fork-server, the secrets and
stores, the broker, places outside its directory), records each outcome in `escapes.json` in
its own directory, then bombs forks and memory until its limits stop it and ends with an error.
The other attacks break the control protocol (`flood`, `oversize`, `nan`, `host_line`,
`bad_report`) and then wait to be killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import struct
import time
from typing import Any, Literal

from pydantic import Field

from services.worker.strategies.base import Strategy, StrategyParameters

log = logging.getLogger(__name__)

PTRACE_ATTACH = 16
PTRACE_DETACH = 17


class HostileParameters(StrategyParameters):
    attack: Literal["escape", "flood", "oversize", "nan", "host_line", "bad_report"] = "escape"
    targets: dict[str, Any] = Field(default_factory=dict)


class Escaped(Exception):
    """An attempt worked: what it got (its size, never its content)."""


class Hostile(Strategy):
    parameters_model = HostileParameters

    def __init__(self, config: Any, broker: Any) -> None:
        super().__init__(config, broker)
        self.parameters = HostileParameters.model_validate(config.parameters)
        self.outcomes: dict[str, str] = {}

    async def start(self) -> None:
        attack = self.parameters.attack
        if attack != "escape":
            self.break_the_protocol(attack)
            while True:
                time.sleep(3600)  # wait for the kill
        self.escape(self.parameters.targets)
        self.bomb_forks()
        self.save()
        self.bomb_memory()
        self.save()
        raise RuntimeError("hostile: ended by its own limits")

    # ---------------------------------------------------------------- bookkeeping

    def attempt(self, name: str, action: Any) -> None:
        try:
            got = action()
        except Escaped as escaped:
            self.outcomes[name] = f"SUCCEEDED: {escaped}"
        except Exception as exc:
            code = errno.errorcode.get(getattr(exc, "errno", None) or 0, "")
            self.outcomes[name] = f"blocked: {type(exc).__name__} {code}".rstrip()
        else:
            self.outcomes[name] = f"SUCCEEDED: {got!r}"[:200]
        log.info("hostile: %s → %s", name, self.outcomes[name])

    def save(self) -> None:
        with open("escapes.json", "w") as out:
            json.dump(self.outcomes, out, indent=1)

    # ---------------------------------------------------------------- the escapes

    def escape(self, targets: dict[str, Any]) -> None:
        processes = {f"sibling {pid}": pid for pid in targets.get("siblings", [])}
        processes |= {name: targets[name] for name in ("host", "forkserver") if targets.get(name)}
        for name, pid in processes.items():
            self.attempt(f"read {name}'s environment", lambda p=pid: _read(f"/proc/{p}/environ"))
            self.attempt(f"read {name}'s memory", lambda p=pid: _read_memory(p))
            self.attempt(f"list {name}'s open files", lambda p=pid: _listed(f"/proc/{p}/fd"))
            self.attempt(f"read {name}'s memory map", lambda p=pid: _read(f"/proc/{p}/maps"))
            self.attempt(f"trace {name}", lambda p=pid: _ptrace(p))
        for pid in targets.get("siblings", []):
            self.attempt(f"kill sibling {pid}", lambda p=pid: os.kill(p, signal.SIGKILL))
            self.attempt(f"kill sibling {pid}'s group", lambda p=pid: os.killpg(p, signal.SIGKILL))
        for name in ("host", "forkserver"):
            if pid := targets.get(name):
                self.attempt(f"signal the {name}", lambda p=pid: os.kill(p, signal.SIGTERM))
        for path in targets.get("read", []):
            self.attempt(f"read {path}", lambda p=path: _read(p))
        for path in ["..", *targets.get("list", [])]:
            self.attempt(f"list {path}", lambda p=path: _listed(p))
        for path in targets.get("write", []):
            self.attempt(f"write {path}", lambda p=path: _write(p))
        self.attempt("make a directory beside its own", lambda: os.mkdir("../hostile"))
        for host, port in targets.get("tcp", []):
            self.attempt(f"connect to {host}:{port}", lambda h=host, p=port: _connect(h, p))
        for path in targets.get("unix", []):
            self.attempt(f"log in to PostgreSQL at {path}", lambda p=path: _postgres(p))
        self.attempt("become root", lambda: os.setuid(0))
        self.attempt("join group 0", lambda: os.setgroups([0]))

    def bomb_forks(self) -> None:
        """Fork until refused, each child idling; then end them (and, with kill(-1), whatever
        else this uid could reach: nothing but its own)."""
        children = 0

        def bomb() -> None:
            nonlocal children
            while children < 5000:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
            raise Escaped(f"{children} processes")

        self.attempt("fork without end", bomb)
        self.outcomes["forks before the refusal"] = str(children)
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, 0):
                pass

    def bomb_memory(self) -> None:
        hoard = []

        def bomb() -> None:
            while len(hoard) < 512:  # 16 GiB: no limit if it gets there
                hoard.append(bytearray(32 << 20))
            raise Escaped(f"{len(hoard) * 32} MiB")

        self.attempt("allocate without end", bomb)
        self.outcomes["MiB before the refusal"] = str(len(hoard) * 32)
        hoard.clear()

    # ---------------------------------------------------------------- the protocol

    def break_the_protocol(self, attack: str) -> None:
        fd = int(os.environ["RUNNER_CONTROL_FD"])
        beat = json.dumps({"type": "heartbeat", "at": "2026-01-01T00:00:00Z"}) + "\n"
        lines = {
            "flood": beat * 5000,
            "oversize": json.dumps({"type": "heartbeat", "at": "x" * 100_000}) + "\n",
            "nan": beat.replace('"at"', '"positions": [{"amount": NaN}], "at"'),
            "host_line": json.dumps({"type": "stop", "flatten": True}) + "\n",
            "bad_report": json.dumps({"type": "event", "event": "OrderFilled",
                                      "payload": {"price": "free money"}}) + "\n",
        }
        data = lines[attack].encode()
        os.set_blocking(fd, True)  # the runtime's loop made it non-blocking: wait for room
        while data:
            data = data[os.write(fd, data):]


def _read(path: str) -> None:
    with open(path, "rb") as file:
        raise Escaped(f"{len(file.read())} bytes")


def _listed(path: str) -> None:
    raise Escaped(f"{len(os.listdir(path))} entries")


def _write(path: str) -> None:
    with open(path, "w") as file:
        file.write("hostile")
    raise Escaped("written")


def _read_memory(pid: int) -> None:
    with open(f"/proc/{pid}/mem", "rb", 0) as memory:
        memory.seek(0x400000)
        raise Escaped(f"{len(memory.read(4096))} bytes")


def _ptrace(pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    libc.ptrace(PTRACE_DETACH, pid, None, None)
    raise Escaped("attached")


def _connect(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=3) as connection:
        if port == 5672:  # a broker: with anything found (nothing) or its default guest
            connection.sendall(b"AMQP\x00\x00\x09\x01")
            raise Escaped(f"the broker answered {len(connection.recv(4096))} bytes")
        raise Escaped("connected")


def _postgres(path: str) -> None:
    """A PostgreSQL startup as its superuser: trust would let it in, peer refuses this uid."""
    body = struct.pack("!I", 196608) + b"user\0postgres\0database\0postgres\0\0"
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(3)
        connection.connect(path)
        connection.sendall(struct.pack("!I", len(body) + 4) + body)
        answer = connection.recv(4096)
    if answer[:1] == b"R" and answer[5:9] == b"\0\0\0\0":
        raise Escaped("logged in as postgres")
    raise PermissionError(errno.EACCES, f"refused ({answer[:1]!r})")
