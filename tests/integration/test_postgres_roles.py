"""One PostgreSQL role per service (`runner db setup`), on the local server: each service's
role opens its own database and runs its store there, and cannot open another service's; it
cannot make databases or roles; a store made before by another role is handed over; running
the setup again changes nothing but the passwords.

The local server trusts local connections (pg_hba `trust`), so what keeps a role out here is
the database's CONNECT privilege, not its password; the compose image checks passwords too.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from services.cli.main import app
from services.database_roles import logins, password_variable, service_names, set_up
from services.entitlement.service import EntitlementService
from services.gateway.service import GatewayService
from services.monitor.log import EventLog
from services.scheduler.service import SchedulerService
from services.settings import Settings
from services.store import Store
from services.worker_host.service import WorkerHostService
from tests.integration.test_postgres_stores import PG_DSN, _drop_databases, _postgres_unreachable

# characters a password may hold that SQL, URLs or bind markers would take for their own
PASSWORD = "p@ss:w/rd%'\"$1;"


@dataclass(frozen=True)
class Deployment:
    prefix: str
    template: str  # RUNNER_DATABASE_URL
    passwords: dict[str, str]

    def settings(self, service: str) -> Settings:
        return Settings(database_url=self.template,
                        database_password=self.passwords[password_variable(service)])

    def dsn(self, service: str, database_of: str | None = None) -> str:
        """A plain asyncpg DSN: `service`'s role, on `database_of`'s database (its own)."""
        url = make_url(self.settings(service).database_for(service))
        other = make_url(self.settings(database_of or service).database_for(database_of or service))
        return url.set(drivername="postgresql", database=other.database).render_as_string(
            hide_password=False)


async def _drop_roles(prefix: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        for row in await conn.fetch("SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1)",
                                    prefix):
            name = row["rolname"].replace('"', '""')
            await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
    finally:
        await conn.close()


@pytest.fixture
async def deployment() -> AsyncIterator[Deployment]:
    reason = await _postgres_unreachable()
    if reason:
        pytest.skip(reason)
    prefix = f"r_{uuid.uuid4().hex[:10]}_"
    server = make_url(PG_DSN)
    template = (f"postgresql://{prefix}{{service}}@{server.host or '127.0.0.1'}:"
                f"{server.port or 5432}/{prefix}{{service}}")
    services = service_names(["h1"])
    try:
        yield Deployment(prefix, template,
                         {password_variable(s): f"{PASSWORD}{s}" for s in services})
    finally:
        await _drop_databases(prefix)
        await _drop_roles(prefix)


async def _setup(deployment: Deployment) -> list[str]:
    return await set_up(PG_DSN, logins(deployment.template, service_names(["h1"]),
                                       deployment.passwords))


async def test_a_services_role_opens_its_own_database_and_no_other(
    deployment: Deployment,
) -> None:
    done = await _setup(deployment)
    assert len(done) == 5 and all("created" in line for line in done), done

    # each service makes its tables in its own database, on its own role
    for service, tables in [("gateway", GatewayService.tables),
                            ("entitlement", EntitlementService.tables),
                            ("scheduler", SchedulerService.tables),
                            ("worker-host-h1", WorkerHostService.tables),
                            ("monitor", ())]:
        store = Store(deployment.settings(service).database_for(service), tables)
        await store.open()
        if service == "monitor":
            await EventLog(store.db).open()
        await store.close()

    for me, other in [("gateway", "monitor"), ("worker-host-h1", "scheduler"),
                      ("entitlement", "worker-host-h1")]:
        conn = await asyncpg.connect(deployment.dsn(me))
        await conn.close()
        with pytest.raises(asyncpg.InsufficientPrivilegeError,
                           match="permission denied for database"):
            await asyncpg.connect(deployment.dsn(me, database_of=other))

    conn = await asyncpg.connect(deployment.dsn("gateway"))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f'CREATE DATABASE "{deployment.prefix}stolen"')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f'CREATE ROLE "{deployment.prefix}stolen"')
        attributes = await conn.fetchrow(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolinherit FROM pg_roles "
            "WHERE rolname = current_user")
        assert tuple(attributes) == (False, False, False, False)
    finally:
        await conn.close()


async def test_a_store_made_by_another_role_is_handed_over_and_setup_runs_again(
    deployment: Deployment,
) -> None:
    # a monitor database made before, by the administrator (as compose's superuser once did)
    monitor = make_url(deployment.settings("monitor").database_for("monitor")).database
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{monitor}"')
    finally:
        await admin.close()
    inside = await asyncpg.connect(make_url(PG_DSN).set(database=monitor).render_as_string(
        hide_password=False))
    try:
        await inside.execute("CREATE TABLE log (position serial PRIMARY KEY, body text)")
        await inside.execute("INSERT INTO log (body) VALUES ('before')")
    finally:
        await inside.close()

    done = await _setup(deployment)
    assert any("taken from" in line for line in done if line.startswith("monitor")), done
    again = await _setup(deployment)
    assert all("password set" in line and "kept" in line for line in again), again

    conn = await asyncpg.connect(deployment.dsn("monitor"))
    try:
        await conn.execute("INSERT INTO log (body) VALUES ('after')")  # its sequence moved too
        assert [r["body"] for r in await conn.fetch("SELECT body FROM log ORDER BY position")] \
            == ["before", "after"]
        await conn.execute("CREATE TABLE mine (id int)")
    finally:
        await conn.close()


async def test_runner_db_setup_makes_them_and_says_what_is_missing(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNER_DATABASE_URL", deployment.template)
    monkeypatch.setenv("RUNNER_DATABASE_ADMIN_URL", PG_DSN)
    for name, value in deployment.passwords.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(password_variable("worker-host-h1"))
    runner = CliRunner()

    # in a thread: the command runs its own event loop
    missing = await asyncio.to_thread(runner.invoke, app, ["db", "setup", "--host", "h1"])
    assert missing.exit_code == 1
    assert "RUNNER_DATABASE_PASSWORD_WORKER_HOST_H1 is not set" in missing.output
    assert "Traceback" not in missing.output

    made = await asyncio.to_thread(runner.invoke, app, ["db", "setup"])  # no worker-host
    assert made.exit_code == 0, made.output
    assert made.output.count("created") == 8  # a role and a database each
    assert PASSWORD not in made.output
    await (await asyncpg.connect(deployment.dsn("gateway"))).close()
