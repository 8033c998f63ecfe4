"""Watching the system as a user, through the gateway: `runner events tail` and `runner replay`
with a user's token show that user's events only; the README's client-library examples run as
written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runner_client import RunnerClient
from services.cli.local import free_port
from tests.e2e.conftest import System, start_body
from tests.integration.broker_helpers import until

pytestmark = pytest.mark.asyncio(loop_scope="session")

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


async def test_the_readme_names_its_examples() -> None:
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


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A /metrics page as {(sample name, sorted labels): value}."""
    text = httpx.get(url, timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def ready(http: httpx.AsyncClient) -> bool:
    answer = await http.get("/health/ready")
    return answer.status_code == 200 and answer.json()["ready"]


def lifecycle(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {dict(labels)["event"]: value for (name, labels), value in samples.items()
            if name == "runner_workers_lifecycle_total"}


async def test_metrics_count_exactly_a_start_a_crash_a_restart_and_a_stop(tmp_path: Path) -> None:
    system = System(tmp_path, RUNNER_LOG_FORMAT="json")
    ports = {}
    for child in system.supervisor.children:
        if child.service != "gateway":
            ports[child.service] = child.env["RUNNER_METRICS_PORT"] = str(free_port())
    await system.start()
    try:
        base = {service: f"http://127.0.0.1:{port}" for service, port in ports.items()}
        base["gateway"] = system.base_url
        for service, url in base.items():
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                # a worker-host is ready once its fork-server is (it preloads ccxt)
                await until(lambda http=http: ready(http), 30, f"{service} ready")
                assert (await http.get("/health/live")).json() == {"alive": True}

        _, client = await system.user(tier="pro")
        started = await client.start(**start_body("hold"))
        worker_id = started["workerId"]
        entry = await system.wait_for_worker(client, worker_id,
                                             lambda e: e["worker"]["status"] == "running")
        os.kill(entry["worker"]["pid"], signal.SIGKILL)
        await system.wait_for_worker(client, worker_id, lambda e: e["worker"]["restartCount"] == 1
                                     and e["worker"]["status"] == "running")
        await client.stop(worker_id, flatten=True)

        counts = lifecycle(scrape(f"{base['monitor']}/metrics"))
        assert counts == {"started": 1, "crashed": 1, "restarted": 1, "stopped": 1}
        monitor = scrape(f"{base['monitor']}/metrics")
        assert monitor[("runner_workers", (("host", "host-1"), ("state", "stopped")))] == 1
        assert monitor[("runner_log_position", ())] == len(await system.log())
        gateway = scrape(f"{base['gateway']}/metrics")
        assert gateway[("runner_rpc_seconds_count", (("op", "DecideStart"), ("outcome", "ok"),
                                                     ("queue", "entitlement.rpc"),
                                                     ("service", "gateway")))] == 1
        scheduler = scrape(f"{base['scheduler']}/metrics")
        handled = scheduler[("runner_messages_handled_total",
                             (("queue", "scheduler.inbox"), ("service", "scheduler")))]
        assert handled >= 6  # JobRequested, JobAccepted, WorkerSpawned, crash, restart, stop …
        assert not any(name == "runner_messages_dead_lettered_total"
                       for name, _ in scheduler), "nothing was dead-lettered"
    finally:
        await system.stop()

    # every line the services logged is one JSON object (after the supervisor's prefix)
    lines = [line.split("] ", 1)[1] for line in system.log_path.read_text().splitlines()]
    records = [json.loads(line) for line in lines]
    assert records and all({"time", "level", "service", "message", "correlation_id"} <= r.keys()
                           for r in records)
    assert {r["service"] for r in records} >= {"gateway", "monitor", "scheduler"}
