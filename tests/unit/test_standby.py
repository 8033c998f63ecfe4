"""The lease's pure parts, and what a replica standing by says about its health."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from services.observability import readiness
from services.standby import PostgresLease, holder_name, lease_for, lock_key


def test_only_postgres_stores_have_a_lease(tmp_path: Path) -> None:
    assert lease_for(f"sqlite:///{tmp_path}/scheduler.db", "scheduler") is None
    assert isinstance(lease_for("postgresql+asyncpg://u:p@db/scheduler", "scheduler"),
                      PostgresLease)


def test_each_service_contends_for_a_lock_of_its_own() -> None:
    keys = {lock_key(s) for s in ("scheduler", "entitlement", "monitor")}
    assert len(keys) == 3
    assert all(-(2**63) <= k < 2**63 for k in keys)  # a PostgreSQL bigint
    assert lock_key("scheduler") == lock_key("scheduler")


def test_the_holder_names_its_process_first_within_postgres_limit() -> None:
    name = holder_name("entitlement")
    assert name.startswith(f"runner entitlement pid {os.getpid()} on ")
    assert len(name) <= 63


def test_a_replica_standing_by_is_ready_and_says_it_stands_by() -> None:
    bus = SimpleNamespace(connected=lambda: False)
    standby = SimpleNamespace(replica_lease=object(), active=False, ready=False, bus=bus)
    assert readiness(standby) == (True, {"ready": True, "standby": True, "started": False})
    active = SimpleNamespace(replica_lease=object(), active=True, ready=True,
                             bus=SimpleNamespace(connected=lambda: True))
    assert readiness(active)[0] is True and "standby" not in readiness(active)[1]
    alone = SimpleNamespace(replica_lease=None, active=True, ready=False, bus=bus)
    assert readiness(alone)[0] is False


def test_replicas_on_sqlite_are_refused_before_anything_starts() -> None:
    from typer.testing import CliRunner

    from services.cli.main import app

    result = CliRunner().invoke(app, ["up", "--replicas", "2"], env={"RUNNER_DATABASE_URL": ""})
    assert result.exit_code == 1
    assert "--replicas needs the stores on PostgreSQL" in result.output
