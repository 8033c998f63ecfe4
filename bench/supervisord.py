"""Peer: supervisord (4.x) restarting a crashed program — kill -9 → running again.

Measured in the same run as our own restart latency (bench.recovery), on the same machine.

    .venv/bin/python -m bench.supervisord [--kills 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import xmlrpc.client
from pathlib import Path

PROGRAM = "import time\nwhile True: time.sleep(1)\n"


def restart_latencies(kills: int) -> list[float]:
    """ms from SIGKILL of the program to supervisord reporting it RUNNING with a new pid."""
    supervisord = shutil.which(
        "supervisord", path=str(Path(sys.executable).parent)
    ) or shutil.which("supervisord")
    if supervisord is None:
        raise RuntimeError("supervisord is not installed (pip install supervisor)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "program.py").write_text(PROGRAM)
        socket_path = root / "supervisor.sock"
        (root / "supervisord.conf").write_text(
            textwrap.dedent(f"""
            [unix_http_server]
            file={socket_path}
            [supervisord]
            logfile={root}/supervisord.log
            pidfile={root}/supervisord.pid
            nodaemon=true
            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
            [supervisorctl]
            serverurl=unix://{socket_path}
            [program:victim]
            command={sys.executable} {root}/program.py
            autorestart=true
            startsecs=0
            startretries=1000
            """)
        )
        daemon = subprocess.Popen(
            [supervisord, "-c", str(root / "supervisord.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            rpc = _rpc(socket_path)
            pid = _running_pid(rpc)
            latencies = []
            for _ in range(kills):
                killed_at = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                new_pid = _running_pid(rpc, other_than=pid)
                latencies.append((time.perf_counter() - killed_at) * 1000)
                pid = new_pid
                time.sleep(0.2)
            return latencies
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)


def _rpc(socket_path: Path) -> xmlrpc.client.ServerProxy:
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{socket_path}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    for _ in range(200):
        if socket_path.exists():
            break
        time.sleep(0.05)
    return proxy


def _running_pid(rpc: xmlrpc.client.ServerProxy, other_than: int = 0, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = rpc.supervisor.getProcessInfo("victim")
        except (OSError, xmlrpc.client.Fault):
            info = {}
        if info.get("statename") == "RUNNING" and info.get("pid") not in (0, other_than):
            return int(info["pid"])
        time.sleep(0.005)
    raise TimeoutError("supervisord did not restart the program in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    values = restart_latencies(parser.parse_args().kills)
    print(
        f"supervisord kill -9 → running again: p50 {statistics.median(values):.0f} ms, "
        f"max {max(values):.0f} ms (n={len(values)})"
    )


if __name__ == "__main__":
    main()
