"""A container worker's end and channel: the init's 128+n as killed by signal n, the kernel's
count of memory-limit kills, the crash's detail saying so; a channel socket bound however deep
its worker's directory is."""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import pytest

from events import CrashReason
from services.worker_host.container_spawner import exit_code, listen, oom_kills
from services.worker_host.exits import Ended, exit_event
from services.worker_host.isolation import Identity


@pytest.mark.parametrize(("status", "code"), [
    (0, 0), (1, 1), (3, 3), (137, -signal.SIGKILL), (143, -signal.SIGTERM), (128, 128),
    (255, 255), (None, None)])
def test_an_init_status_above_128_is_a_signal(status: int | None, code: int | None) -> None:
    assert exit_code(status) == code


@pytest.mark.parametrize(("text", "kills"), [
    ("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n", 1),  # cgroup v1 memory.oom_control
    ("low 0\nhigh 0\nmax 4\noom 1\noom_kill 2\n", 2),  # cgroup v2 memory.events
    ("oom_kill_disable 0\nunder_oom 0\n", None),  # an old kernel: no count
])
def test_the_memory_limit_kills_are_read_from_either_cgroup_version(
        tmp_path: Path, text: str, kills: int | None) -> None:
    path = tmp_path / "events"
    path.write_text(text)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert oom_kills(fd) == kills
    finally:
        os.close(fd)
    assert oom_kills(None) is None


def test_a_crash_says_what_ended_it_when_its_runner_knows() -> None:
    ended = Ended("job-1", "w-1", 0)
    crashed = exit_event(ended, host_id="h-1", ending=None, code=-signal.SIGKILL,
                         heartbeat_timeout=30, cause="out of memory (over its 128 MiB limit)")
    assert crashed.reason == CrashReason.EXITED
    assert crashed.detail == "killed by SIGKILL: out of memory (over its 128 MiB limit)"
    plain = exit_event(ended, host_id="h-1", ending=None, code=1, heartbeat_timeout=30)
    assert plain.detail == ""


def test_a_channel_socket_deeper_than_a_unix_path_allows_is_still_bound(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "control.sock"
    assert len(os.fsencode(path)) > 107
    listener = listen(path, Identity(os.getuid(), os.getgid()))
    try:
        mode = os.lstat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        directory = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(f"/proc/self/fd/{directory}/control.sock")
        finally:
            os.close(directory)
    finally:
        listener.close()
