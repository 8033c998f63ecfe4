"""Watching the system as a user, through the gateway: `runner events tail` and `runner replay`
with a user's token show that user's events only; the README's client-library examples run as
written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from runner_client import RunnerClient
from tests.e2e.conftest import System

README = Path(__file__).parents[2] / "README.md"


async def test_tail_and_replay_with_a_users_token_show_only_their_events(running: System) -> None:
    erin_token = await running.admin.add_user("erin")
    await running.admin.add_user("fred")
    await running.admin.upgrade("fred", "basic", 1)  # fred's event: erin must not see it
    async with RunnerClient(running.base_url, erin_token) as erin:
        started = await erin.start("hold", parameters={"amount": 1})
        await running.wait_for_worker(running.admin, started.worker_id,
                                      lambda e: e["worker"]["status"] == "running")

    tail = running.runner("events", "tail", "--from-start", "--no-follow", "--json",
                          "--token", erin_token)
    records = [json.loads(line) for line in tail.stdout.splitlines()]
    assert records, tail.stderr
    assert {r["user_id"] for r in records} == {"erin"}
    assert {"JobRequested", "JobAccepted", "WorkerSpawned"} <= {r["type"] for r in records}
    positions = [r["position"] for r in records]
    assert positions == sorted(set(positions))

    replayed = json.loads(running.runner("replay", "--json", "--token", erin_token).stdout)
    assert [e["worker"]["workerId"] for e in replayed["workers"]] == [started.worker_id]
    assert replayed["workers"][0]["worker"]["status"] == "running"
    assert replayed["queueStats"]["runningWorkers"] == 1

    refused = running.runner("events", "tail", "--no-follow", "--from-start", "--user", "fred",
                             "--token", erin_token, check=False)
    assert refused.returncode == 1 and "userId does not match your token" in refused.stderr


def readme_examples() -> dict[str, str]:
    """The README's Python examples, by the name in the comment that precedes each."""
    blocks = re.findall(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", README.read_text(),
                        re.S)
    return dict(blocks)


def test_the_readme_names_its_examples() -> None:
    assert set(readme_examples()) == {"admin", "user"}


async def test_the_readme_client_examples_run(running: System, tmp_path: Path) -> None:
    examples = readme_examples()
    env = running.env | {"RUNNER_URL": running.base_url, "RUNNER_TOKEN": running.admin_token}
    admin = subprocess.run([sys.executable, "-c", examples["admin"]], env=env,
                           capture_output=True, text=True, timeout=60)
    assert admin.returncode == 0, admin.stderr
    token = re.search(r"token: (\S+)", admin.stdout).group(1)  # type: ignore[union-attr]
    assert "pro" in admin.stdout
    user = subprocess.run([sys.executable, "-c", examples["user"]],
                          env=env | {"RUNNER_TOKEN": token}, capture_output=True, text=True,
                          timeout=90)
    assert user.returncode == 0, user.stderr
    assert "WorkerSpawned" in user.stdout
    assert "running [('long', 2.0, 'BTC-PERPETUAL')]" in user.stdout
    assert "stopped, 1 position flattened" in user.stdout
