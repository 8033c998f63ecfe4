"""The fork-server's rehearsal: a paper worker's whole life run in-process before the first fork,
leaving the process as it found it (signals, logging, fds, threads, files), and reported, not
fatal, when it fails."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path

import pytest

from services.worker import protocol, runtime
from services.worker_host import forkserver


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def server_like(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """SIGINT ignored, as in the fork-server; scratch files go to `tmp_path`; libuv without
    io_uring (its kernel thread), as `base_environment` sets for the fork-server."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("UV_USE_IO_URING", "0")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield tmp_path
    signal.signal(signal.SIGINT, previous)


def test_a_rehearsal_runs_whole_workers_and_leaves_the_process_as_it_was(
    server_like: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    lives: list[int] = []
    real = runtime.run_worker

    def run_worker(env: dict[str, str], confined: list[str]) -> int:
        code = real(env, confined)
        account = Path(env[protocol.ENV_STATE_FILE]).read_text()  # it bought: its account saved
        lives.append(code if '"BTC-PERPETUAL"' in account else -1)
        return code

    monkeypatch.setattr(runtime, "run_worker", run_worker)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    forkserver.warm_up()  # libuv's own pipe, made at a process's first loop, stays
    before = fds(), threads()

    forkserver.rehearse(times=3)

    assert lives == [0, 0, 0]
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert root.handlers == handlers and root.level == level
    assert fds() <= before[0]  # no channel, loop or file left open
    assert threads() == before[1]  # and no thread started: the server forks
    assert list(server_like.iterdir()) == []  # its scratch account is gone
    assert capfd.readouterr().err == ""  # its log lines are not the server's


def test_a_failed_rehearsal_is_reported_and_not_repeated(
    server_like: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    calls: list[int] = []

    def failing(env: dict[str, str], confined: list[str]) -> int:
        calls.append(1)
        os.close(int(env["RUNNER_CONTROL_FD"]))
        return runtime.EXIT_BAD_CONFIG

    monkeypatch.setattr(runtime, "run_worker", failing)
    forkserver.rehearse(times=3)
    assert calls == [1]
    assert "a rehearsal failed (2); workers start unrehearsed" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
