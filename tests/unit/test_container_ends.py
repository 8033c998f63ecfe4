"""How a container worker's end is read: the init's 128+n as killed by signal n, the kernel's
count of memory-limit kills, and the crash's detail saying so."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from events import CrashReason
from services.worker_host.container_spawner import exit_code, oom_kills
from services.worker_host.exits import Ended, exit_event


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
