"""A worker's confinement taken for real, in a forked child that reports what it then can and
cannot do (no uid switch here: tests/integration/test_worker_isolation.py does that as root)."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import socket
from pathlib import Path
from typing import Any

import pytest

from services.worker.confinement import Confinement, Limits, confine, landlock_abi

PR_GET_DUMPABLE = 3


def in_child(confinement: Confinement, probe: Any) -> dict[str, Any]:
    """Fork; the child confines itself, runs `probe()` and sends back its JSON result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            result = {"taken": confine(confinement), **probe()}
        except BaseException as exc:
            result = {"error": repr(exc)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        raw = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(raw)


def attempt(action: Any) -> str:
    try:
        action()
    except OSError as exc:
        return type(exc).__name__
    return "done"


def test_a_confined_process_is_not_dumpable_gains_no_privileges_and_has_its_limits(
    tmp_path: Path,
) -> None:
    libc = ctypes.CDLL(None)

    def probe() -> dict[str, Any]:
        with open("/proc/self/status") as status:
            no_new_privs = next(line for line in status if line.startswith("NoNewPrivs"))
        umask = os.umask(0)
        return {
            "dumpable": libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0),
            "no_new_privs": no_new_privs.split()[1],
            "limits": [resource.getrlimit(r) for r in (resource.RLIMIT_CORE, resource.RLIMIT_AS,
                                                       resource.RLIMIT_NOFILE)],
            "umask": umask,
            "cwd": os.getcwd(),
        }

    seen = in_child(Confinement(directory=str(tmp_path),
                                limits=Limits(address_space=3 << 30, open_files=100)), probe)
    assert seen["dumpable"] == 0 and seen["no_new_privs"] == "1"
    assert seen["limits"] == [[0, 0], [3 << 30, 3 << 30], [100, 100]]
    assert seen["umask"] == 0o077 and seen["cwd"] == str(tmp_path)


@pytest.mark.skipif(landlock_abi() < 6, reason="needs Landlock ABI 6 (Linux 6.12)")
def test_a_sandboxed_process_writes_only_in_its_directory_and_reaches_only_its_ports(
    tmp_path: Path,
) -> None:
    own, other = tmp_path / "own", tmp_path / "other"
    own.mkdir()
    other.mkdir()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def probe() -> dict[str, Any]:
        def connect(to: int) -> None:
            with socket.create_connection(("127.0.0.1", to), timeout=2):
                pass

        def bind() -> None:
            with socket.create_server(("127.0.0.1", 0)):
                pass

        return {
            "own": attempt(lambda: Path("state.json").write_text("{}")),
            "other": attempt(lambda: (other / "x").write_text("x")),
            "tmp": attempt(lambda: Path("/tmp", f"landlock-{os.getpid()}").write_text("x")),
            "devnull": attempt(lambda: Path("/dev/null").write_text("x")),
            "allowed_port": attempt(lambda: connect(port)),
            "other_port": attempt(lambda: connect(5672)),
            "bind": attempt(bind),
            "signal_parent": attempt(lambda: os.kill(os.getppid(), 0)),
        }

    seen = in_child(Confinement(directory=str(own), sandbox=True, tcp_ports=(port,)), probe)
    listener.close()
    assert seen == seen | {
        "own": "done", "other": "PermissionError", "tmp": "PermissionError", "devnull": "done",
        "allowed_port": "done", "other_port": "PermissionError", "bind": "PermissionError",
        "signal_parent": "PermissionError",
    }, seen
    assert any(taken.startswith("landlock v") for taken in seen["taken"])
    assert not list(other.iterdir())
