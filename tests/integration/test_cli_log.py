"""The event-log CLI through the real `runner` entry point, against a running monitor process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from events import Envelope, HostOnline
from services.bus import AmqpBus, PublishFailed
from services.cli.log_commands import _print_status
from services.settings import Settings
from tests.integration.broker_helpers import eventually, queues

pytestmark = pytest.mark.broker

JOB = {
    "job_id": "job-1", "worker_id": "worker-1", "strategy_id": "scalping-btc",
    "broker_id": "paper", "credentials_sealed": "gAAAAA-sealed-not-a-secret",
    "config": {"name": "BTC Scalping", "type": "scalping"},
}


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "RUNNER_AMQP_URL": settings.amqp_url,
            "RUNNER_DATA_DIR": str(settings.data_dir)}


def runner(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def monitor(env: dict[str, str], tmp_path: Path) -> Iterator[None]:
    with (tmp_path / "monitor.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "service", "monitor"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def tail_until(env: dict[str, str], *args: str, timeout: float = 20) -> list[dict]:
    """`runner events tail --from-start --no-follow --json …` until it prints something."""
    deadline = time.monotonic() + timeout
    while True:
        result = runner(env, "events", "tail", "--from-start", "--no-follow", "--json", *args)
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        if result.returncode == 0 and lines:
            return lines
        if time.monotonic() > deadline:
            pytest.fail(f"tail printed nothing: rc={result.returncode} {result.stderr.strip()}")
        time.sleep(0.3)


def test_publish_tail_replay_and_verify_through_the_cli(
        env: dict[str, str], settings: Settings, monitor: None) -> None:
    published = None
    deadline = time.monotonic() + 20
    while published is None:  # until the monitor has declared its queue, a publish is unroutable
        result = runner(env, "publish", "JobRequested", json.dumps(JOB), "--user", "alice")
        if result.returncode == 0:
            published = result.stdout.strip()
        elif time.monotonic() > deadline:
            pytest.fail(result.stderr)
        else:
            time.sleep(0.3)
    queued = runner(env, "publish", "JobQueued",
                    json.dumps({"job_id": "job-1", "worker_id": "worker-1"}), "--user", "alice")
    assert queued.returncode == 0, queued.stderr

    lines = tail_until(env, "--type", "JobRequested")
    assert [(e["type"], e["event_id"], e["user_id"], e["stream"]) for e in lines] == [
        ("JobRequested", published, "alice", "job-job-1")]
    assert lines[0]["payload"]["credentials_sealed"] == "sha256:" + hashlib.sha256(
        JOB["credentials_sealed"].encode()).hexdigest()  # the log keeps no sealed blob
    assert len(tail_until(env, "--user", "alice")) == 2

    with ThreadPoolExecutor(4) as pool:  # independent readers of the same log
        replay, early, tables, verify = pool.map(lambda args: runner(env, *args), [
            ("replay", "--json"), ("replay", "--json", "--until-position", "0"), ("replay",),
            ("audit", "verify")])
    for result in (replay, early, tables, verify):  # none refused by a checkpoint of the monitor's
        assert result.returncode == 0, result.stderr
    status = json.loads(replay.stdout)
    assert status["position"] == 2
    assert status["queueStats"]["queuedJobs"] == 1
    assert [(w["worker"]["workerId"], w["worker"]["status"]) for w in status["workers"]] == [
        ("worker-1", "queued")]
    assert json.loads(early.stdout) | {"queueStats": None} == {
        "position": 0, "workers": [], "queueStats": None}
    assert "worker-1" in tables.stdout
    assert verify.stdout.startswith("ok: 2 events, chain intact")

    with sqlite3.connect(settings.data_dir / "monitor.db") as db:
        db.execute("UPDATE event_log SET envelope = replace(envelope, 'scalping-btc', 'evil') "
                   "WHERE position = 1")
    broken = runner(env, "audit", "verify")
    assert broken.returncode == 1
    assert f"row 1 (event_id {published}): hash mismatch" in broken.stderr


def test_bad_input_is_one_line_and_exit_1(env: dict[str, str], tmp_path: Path) -> None:
    bad = [
        ("publish", "NoSuchType", "{}"),
        ("publish", "JobQueued", "{not json"),
        ("publish", "JobQueued", json.dumps({"job_id": "j"})),
        ("replay", "--database", str(tmp_path / "missing.db")),
        ("audit", "verify", "--database", str(tmp_path / "missing.db")),
    ]
    with ThreadPoolExecutor(len(bad) + 1) as pool:  # each run is mostly interpreter start-up
        nothing = pool.submit(runner, env, "events", "tail", "--no-follow")
        results = list(pool.map(lambda args: runner(env, *args), bad))
    for args, result in zip(bad, results, strict=True):
        assert result.returncode == 1, args
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "missing.db").exists()
    assert (nothing.result().returncode, nothing.result().stdout) == (0, "")


async def test_tail_follows_live_messages_and_exits_cleanly(
        env: dict[str, str], settings: Settings, vhost: str) -> None:
    follow = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "events", "tail", "--json", "--limit", "1",
         "--type", "HostOnline"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bus = AmqpBus(settings, "test")
    await bus.start()
    try:
        online = Envelope.wrap(HostOnline(host_id="h1", capacity=1, hostname="box", pid=1),
                               stream="host-h1")
        deadline = time.monotonic() + 20
        while follow.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(PublishFailed):  # unroutable until the tail has bound
                await bus.publish(online)
            await asyncio.sleep(0.2)
    finally:
        await bus.close()
        if follow.poll() is None:
            follow.kill()
    out, err = follow.communicate(timeout=10)
    assert follow.returncode == 0, err
    assert [json.loads(line)["event_id"] for line in out.splitlines()] == [str(online.event_id)]

    interrupted = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "events", "tail"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    await eventually(lambda: any(name.startswith("cli.watch.") for name in queues(vhost)), 20,
                     "the tail listening")
    interrupted.send_signal(signal.SIGINT)
    out, err = interrupted.communicate(timeout=10)
    assert interrupted.returncode == 0
    assert "Traceback" not in err


def test_replay_tables_show_the_first_workers_and_say_how_many_more(
        capsys: pytest.CaptureFixture[str]) -> None:
    def entry(n: int) -> dict[str, Any]:
        worker = {"workerId": f"worker-{n}", "userId": "alice", "strategyId": "s", "brokerId":
                  "paper", "status": "running", "hostId": "h", "pid": n, "restartCount": 0,
                  "startedAt": None, "reason": None}
        stats = {"totalTrades": 1, "winningTrades": 1, "losingTrades": 0, "totalPnL": 1.0,
                 "winRate": 100.0}
        return {"worker": worker, "positions": [], "stats": stats}

    result = {"position": 9, "queueStats": {"queuedJobs": 0, "runningWorkers": 3,
                                            "totalWorkers": 3, "failedJobs": 0},
              "workers": [entry(n) for n in (1, 2, 3)]}
    _print_status(result, 2)
    shown = capsys.readouterr().out
    assert "worker-1" in shown and "worker-2" in shown and "worker-3" not in shown
    assert "the first 2 of 3" in shown and "1 more workers not shown" in shown

    _print_status(result, None)
    assert "worker-3" in capsys.readouterr().out
