"""The CLI as a new user meets it: help texts shown as written, the tiers listed, users and
hosts listed, status paged and watched live, risk limits and flatten-on-stop set at start, the
API secret never on the command line, a stop that says what it is waiting for, strategies with
their parameters, and one clear message when the broker is not there."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from services.cli import broker_check
from services.cli.client import GatewayClient
from services.cli.main import app
from services.cli.watch import watch_status
from tests.conftest import AMQP_PORT
from tests.e2e.conftest import System
from tests.integration.broker_helpers import eventually

cli = CliRunner()


def test_help_texts_keep_their_brackets_and_the_tiers_are_listed() -> None:
    assert "[type-instrument]" in cli.invoke(app, ["start", "--help"]).output
    assert "[default: the admin token in" in cli.invoke(app, ["status", "--help"]).output
    upgrade = cli.invoke(app, ["entitlements", "upgrade", "--help"]).output
    assert "free|basic|pro|enterprise" in upgrade
    assert "--api-secret" not in cli.invoke(app, ["start", "--help"]).output


def test_strategies_lists_each_strategy_with_its_parameters() -> None:
    shown = cli.invoke(app, ["strategies"], env={"COLUMNS": "200"}).output
    for expected in ("hold", "scalping", "rsiPeriod", "amount", "maxPositionSize"):
        assert expected in shown


def test_a_missing_broker_is_one_message_saying_where_and_how(monkeypatch: Any) -> None:
    console = Console(file=io.StringIO())
    assert broker_check.ensure_broker(f"amqp://guest:guest@127.0.0.1:{AMQP_PORT}/", console) \
        is None
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no local RabbitMQ installed
    problem = broker_check.ensure_broker("amqp://guest:guest@localhost:1/", console)
    assert problem is not None
    assert "not answering at localhost:1" in problem and "systemctl start" in problem


@pytest.mark.asyncio(loop_scope="session")
async def test_users_hosts_paged_status_risk_limits_and_a_stop_with_progress(
        running: System) -> None:
    token = await running.admin.add_user("gina")
    await running.admin.upgrade("gina", "pro", 1)
    assert "gina" in running.runner("users", "list").stdout.split()
    assert "host-1" in running.runner("hosts").stdout

    user = running.env | {"RUNNER_TOKEN": token, "RUNNER_API_SECRET": "from-the-env"}
    started = []
    for amount in ("2", "3"):
        done = running.runner_with(user, "start", "hold", "-p", f"amount={amount}",
                                   "--max-position-size", "1", "--no-flatten-on-stop")
        started.append(done.stdout.split("worker ")[-1].strip())
    for worker_id in started:
        await running.wait_for_worker(running.admin, worker_id,
                                      lambda e: e["worker"]["status"] == "running"
                                      and e["positions"])
    page = json.loads(running.runner_with(user, "status", "--limit", "1", "--offset", "1",
                                          "--json").stdout)
    assert page["page"] == {"offset": 1, "limit": 1, "total": 2}
    assert [e["worker"]["workerId"] for e in page["workers"]] == [started[1]]
    assert page["workers"][0]["positions"][0]["amount"] == 1  # capped by maxPositionSize

    stopped = running.runner_with(user, "stop", started[0])
    assert "stopped" in stopped.stdout and stopped.returncode == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_status_watch_redraws_from_the_event_stream(running: System) -> None:
    token = await running.admin.add_user("hana")
    output = io.StringIO()
    console = Console(file=output, width=250, force_terminal=True, color_system=None)
    watching = asyncio.ensure_future(watch_status(running.base_url, token, console, user=None,
                                                  limit=None, offset=0))
    try:
        hana = GatewayClient(running.base_url, token)
        try:
            worker_id = (await hana.start(**{
                "strategyId": "watch-me", "brokerId": "paper",
                "credentials": {"apiKey": "k", "apiSecret": "s"},
                "config": {"name": "hold", "type": "hold"}}))["workerId"]
            await eventually(lambda: worker_id in output.getvalue()
                             and "WorkerSpawned" in output.getvalue(), 20, "the watch's lines")
        finally:
            await hana.close()
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
