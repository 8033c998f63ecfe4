"""The host's end of a worker's control channel: writing to a worker that has just exited must
not lose the lines it wrote before exiting."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from services.worker import protocol
from services.worker_host.spawner import WorkerProcess


class Gone:
    pid, running = 0, False

    async def wait(self) -> int:
        return 0


async def test_a_write_to_an_exited_worker_leaves_its_last_lines_readable() -> None:
    host_end, worker_end = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=host_end)
    worker = WorkerProcess("w", "j", "u", 0, Gone(), reader, writer)
    last: list[Any] = [
        protocol.Report(event="PositionsFlattened", payload={"closed": 3}),
        protocol.Beat(at="2026-11-26T00:00:00Z"),
    ]
    worker_end.sendall(b"".join(protocol.encode(line) for line in last))
    worker_end.close()  # the worker exits

    worker.send(protocol.Lease(until=1.0))  # fails (EPIPE): must not close our reading side
    worker.send(protocol.Stop())

    received = [protocol.decode(line) async for line in reader]
    assert received == last
    writer.close()
