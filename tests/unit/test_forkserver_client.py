"""The host's bookkeeping of fork-server messages: a child's pid before its exit, each exit
reported once, orphans resolved when their process is gone."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from services.worker_host.fork_spawner import ForkedProcess, ForkServer
from services.worker_host.spawner import SpawnError


async def test_a_pid_reply_answers_the_request_and_the_exit_reaches_that_child(
    tmp_path: Path,
) -> None:
    server = ForkServer(tmp_path)
    reply = server.pending[1] = asyncio.get_running_loop().create_future()
    server._on_message({"id": 1, "pid": 4242})
    child = await reply
    assert child.pid == 4242 and child.running
    server._on_message({"exited": 4242, "code": -9})
    assert await child.wait() == -9 and not child.running
    assert server.children == {}


async def test_an_exit_is_reported_once() -> None:
    child = ForkedProcess(4242)
    child.exited(-9)
    child.exited(0)
    child.exited(None)
    assert await child.wait() == -9


async def test_an_error_reply_fails_the_request(tmp_path: Path) -> None:
    server = ForkServer(tmp_path)
    reply = server.pending[3] = asyncio.get_running_loop().create_future()
    server._on_message({"id": 3, "error": "OSError: [Errno 11] fork failed"})
    with pytest.raises(SpawnError, match="fork failed"):
        await reply


async def test_messages_about_unknown_children_are_ignored(tmp_path: Path) -> None:
    server = ForkServer(tmp_path)
    server._on_message({"exited": 1, "code": 0})
    server._on_message({"id": 99, "pid": 4243})  # its request timed out: still tracked
    assert list(server.children) == [4243]


async def test_an_orphan_already_gone_resolves_with_an_unknown_code() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = ForkedProcess(gone.pid)
    orphan.orphan()
    assert await asyncio.wait_for(orphan.wait(), 1) is None


async def test_a_live_orphan_resolves_when_it_dies() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    orphan = ForkedProcess(sleeper.pid)
    orphan.orphan()
    assert orphan.running
    sleeper.kill()
    assert await asyncio.wait_for(orphan.wait(), 1) is None
    sleeper.wait()
