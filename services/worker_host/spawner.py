"""Spawning one worker process and talking to it over its control channel."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.worker import protocol

# The only variables of the host's own environment a worker inherits (never the host's
# secrets: no deployment key, no admin token, no broker URL).
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "SYSTEMROOT")


class SpawnError(RuntimeError):
    """The worker did not come up (no hello in time, or exited at once)."""


@dataclass
class WorkerProcess:
    """A live worker: its process, its control channel, and why it is being ended (if it is)."""

    worker_id: str
    job_id: str
    user_id: str
    attempt: int
    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    started: float = field(default_factory=lambda: asyncio.get_running_loop().time())
    end_reason: str | None = (
        None  # set when the host ends it: "stop", "heartbeat", "fenced", "drain"
    )

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send(self, line: protocol.Stop) -> None:
        try:
            self.writer.write(protocol.encode(line))
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass  # already gone: its exit is reported by the supervisor

    def signal(self, sig: int) -> None:
        if self.process.returncode is None:
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
) -> dict[str, str]:
    """The seed's per-worker environment plus the runtime's own variables."""
    env = {k: os.environ[k] for k in INHERITED if k in os.environ}
    env |= {
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
    return env


async def spawn(
    *,
    worker_id: str,
    job_id: str,
    user_id: str,
    attempt: int,
    env: dict[str, str],
    log_file: Path,
    hello_timeout: float,
) -> WorkerProcess:
    """Start `python -m services.worker` in its own session and wait for its hello."""
    host_end, child_end = socket.socketpair()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_file, "ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.worker",
                env=env | {protocol.ENV_CONTROL_FD: str(child_end.fileno())},
                pass_fds=(child_end.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
    finally:
        child_end.close()
    reader, writer = await asyncio.open_unix_connection(sock=host_end)
    worker = WorkerProcess(worker_id, job_id, user_id, attempt, process, reader, writer)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout=hello_timeout)
        hello = protocol.decode(line) if line else None
    except (TimeoutError, ValueError):
        hello = None
    if not isinstance(hello, protocol.Hello):
        worker.signal(signal.SIGKILL)
        code = await process.wait()
        writer.close()
        raise SpawnError(f"worker did not start (exit code {code}; see {log_file.name})")
    return worker
