"""Real worker processes driven over their control sockets the way a worker-host drives them:
the `spawn` fixture (registered by this package's conftest) and its helpers."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.worker import protocol
from services.worker.protocol import Beat, Credentials, Hello, Lease, Report, Stop

REPO = Path(__file__).resolve().parents[2]
BTC = "BTC-PERPETUAL"
ETH = "ETH-USD"
API_KEY = "ak-live-5D1E-integration"
API_SECRET = "sk-live-9F2C-integration"
BEAT = 0.2
CREDENTIALS = Credentials(api_key=API_KEY, api_secret=API_SECRET)
TIMEOUT = 5.0


def hold(*instruments: str, **parameters: Any) -> dict[str, Any]:
    return {
        "name": "Hold test",
        "type": "hold",
        "parameters": parameters,
        "riskManagement": {"maxPositionSize": 10},
        "instruments": list(instruments or (BTC,)),
    }


@dataclass
class Worker:
    """One spawned worker and the host's end of its control channel."""

    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    worker_id: str
    job_id: str
    state_file: Path
    log_file: Path
    process_env: dict[str, str] = field(default_factory=dict)
    received: list[Hello | Beat | Report] = field(default_factory=list)
    # what the host answers the Hello with when the worker has a lease: the lease it was given
    lease_answer: Callable[[], float | None] | None = None

    def __post_init__(self) -> None:
        if self.lease_answer is None and (lease := self.process_env.get(protocol.ENV_LEASE_UNTIL)):
            self.lease_answer = lambda: float(lease)

    async def line(self, timeout: float = TIMEOUT) -> Hello | Beat | Report | None:
        """The next line, or None at EOF."""
        raw = await asyncio.wait_for(self.reader.readline(), timeout)
        if not raw:
            return None
        line = protocol.decode(raw)
        self.received.append(line)
        if isinstance(line, Hello) and self.lease_answer and (until := self.lease_answer()):
            self.writer.write(protocol.encode(Lease(until=until)))  # as a host answers it
        return line

    async def until(self, wanted: Callable[[Any], bool], timeout: float = TIMEOUT) -> list[Any]:
        """Lines up to and including the first one `wanted` accepts."""
        seen: list[Any] = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.line()
                assert line is not None, f"channel closed while waiting; got {seen}"
                seen.append(line)
                if wanted(line):
                    return seen

    async def rest(self, timeout: float = TIMEOUT) -> list[Any]:
        """Every line until the worker closes the channel."""
        seen: list[Any] = []
        async with asyncio.timeout(timeout):
            while (line := await self.line()) is not None:
                seen.append(line)
        return seen

    async def opened(self, count: int) -> list[Report]:
        """Wait for Hello and the PositionChanged reports of `count` opened positions."""
        lines = await self.until(
            lambda line: len(reports(self.received, "PositionChanged")) == count
        )
        return [line for line in lines if isinstance(line, Report)]

    async def send(self, line: Stop | Lease) -> None:
        self.writer.write(protocol.encode(line))
        await self.writer.drain()

    async def exit_code(self, timeout: float = TIMEOUT) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)

    def log(self) -> str:
        return self.log_file.read_text()

    def saved_positions(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text())["positions"]


def reports(lines: list[Any], event: str) -> list[Report]:
    return [line for line in lines if isinstance(line, Report) and line.event == event]


def beats(lines: list[Any]) -> list[Beat]:
    return [line for line in lines if isinstance(line, Beat)]


Spawn = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start real `python -m services.worker` processes; afterwards kill leftovers and check
    that no credential reached any file or any line the worker sent."""
    workers: list[Worker] = []
    numbers = itertools.count(1)

    async def start(
        config: dict[str, Any], *, state_file: Path | None = None,
        first: protocol.Line | None = CREDENTIALS, **extra_env: str
    ) -> Worker:
        number = next(numbers)
        host_end, worker_end = socket.socketpair()
        worker_id, job_id = f"worker-{number}", f"job-{number}"
        state_file = state_file or tmp_path / f"state-{number}.json"
        log_file = tmp_path / f"worker-{number}.log"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "USER_ID": "user-7",
            "STRATEGY_ID": "integration",
            "BROKER_ID": "paper",
            "CONFIG": json.dumps(config),
            "RUNNER_WORKER_ID": worker_id,
            "RUNNER_JOB_ID": job_id,
            "RUNNER_CONTROL_FD": str(worker_end.fileno()),
            "RUNNER_HEARTBEAT_INTERVAL": str(BEAT),
            "RUNNER_WORKER_STATE": str(state_file),
            "RUNNER_PAPER_SEED": "7",
            **extra_env,
        }
        with open(log_file, "wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.worker",
                env=env,
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=(worker_end.fileno(),),
            )
        worker_end.close()
        if first is not None:  # the host's first line, as a host writes it
            host_end.sendall(protocol.encode(first))
        reader, writer = await asyncio.open_unix_connection(sock=host_end)
        worker = Worker(process, reader, writer, worker_id, job_id, state_file, log_file, env)
        workers.append(worker)
        return worker

    yield start

    for worker in workers:
        if worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()
        worker.writer.close()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert API_KEY.encode() not in content and API_SECRET.encode() not in content, path
    for worker in workers:
        for line in worker.received:
            dumped = protocol.encode(line).decode()
            assert API_KEY not in dumped and API_SECRET not in dumped
