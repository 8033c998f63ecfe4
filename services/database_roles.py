"""A PostgreSQL role and a database per service, the role owning its database and nothing else.

`logins` reads them off the `RUNNER_DATABASE_URL` template (its `{service}` names both), and
`set_up` creates or repairs them idempotently with an administrator's connection; each database
refuses every role but its owner, so a service's login cannot open another service's store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from services.settings import Settings, variable_name

SERVICES = ("gateway", "entitlement", "scheduler", "monitor")  # a worker-host's: by host id


class SetupError(ValueError):
    """The setup cannot be done as asked (a message for the operator)."""


@dataclass(frozen=True)
class ServiceLogin:
    """A service's role and database, and the role's password."""

    service: str
    role: str
    database: str
    password: str

    def __repr__(self) -> str:
        return f"ServiceLogin({self.service!r}, role={self.role!r}, database={self.database!r})"


def service_names(host_ids: Iterable[str]) -> list[str]:
    """The stores of a deployment: the four services' and one per worker-host."""
    return [*SERVICES, *(f"worker-host-{host_id}" for host_id in host_ids)]


def password_variable(service: str) -> str:
    """The environment variable `runner db setup` reads `service`'s password from."""
    return variable_name("RUNNER_DATABASE_PASSWORD_", service)


def logins(template: str | None, services: Iterable[str],
           passwords: Mapping[str, str]) -> list[ServiceLogin]:
    """Each service's role, database and password, from the `RUNNER_DATABASE_URL` template and
    `passwords` (by `password_variable`)."""
    if not template:
        raise SetupError("RUNNER_DATABASE_URL is not set: it names each service's role and "
                         "database, e.g. postgresql://runner_{service}@postgres:5432/"
                         "runner_{service}")
    settings = Settings(database_url=template, database_password=None)
    found: list[ServiceLogin] = []
    for service in services:
        url = make_url(settings.database_for(service))
        if url.get_backend_name() != "postgresql":
            raise SetupError(f"RUNNER_DATABASE_URL is not a PostgreSQL URL ({url.drivername})")
        if not url.username:
            raise SetupError(_OWN_ROLE)
        if url.password is not None:
            raise SetupError("RUNNER_DATABASE_URL must not hold a password (one would be every "
                             "service's): give each its own, RUNNER_DATABASE_PASSWORD")
        password = passwords.get(password_variable(service), "")
        if not password:
            raise SetupError(f"{password_variable(service)} is not set: the password of "
                             f"{service}'s role {url.username!r}")
        found.append(ServiceLogin(service, url.username, url.database or "", password))
    if len({login.role for login in found}) < len(found):
        raise SetupError(_OWN_ROLE)
    return found


_OWN_ROLE = ("RUNNER_DATABASE_URL must give each service a role of its own: put {service} in "
             "its user name, e.g. postgresql://runner_{service}@…")


async def set_up(admin_url: str, wanted: Iterable[ServiceLogin]) -> list[str]:
    """Make or repair each login's role and database (see the module doc); one line each on
    what was done. `admin_url`: a superuser's, on a maintenance database (`postgres`)."""
    url = make_url(admin_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+asyncpg")
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT")
    done = []
    try:
        async with admin.connect() as conn:
            me = (await conn.execute(text("SELECT current_user"))).scalar_one()
            for login in wanted:
                if login.role == me:
                    raise SetupError(f"{login.service}'s role is the administrator's own "
                                     f"({me!r}): give the services roles of their own")
                role = await _role(conn, login)
                database = await _database(conn, login)
                await _restrict(url, login)
                done.append(f"{login.service}: role {login.role} ({role}), database "
                            f"{login.database} ({database}), PUBLIC's rights revoked")
    finally:
        await admin.dispose()
    return done


async def _sql(conn: AsyncConnection, template: str, *values: str) -> None:
    """Run DDL whose names and literals PostgreSQL itself quotes (`format`'s %I and %L)."""
    params = {f"v{n}": value for n, value in enumerate(values)}
    arguments = "".join(f", CAST(:v{n} AS text)" for n in range(len(values)))
    statement = (await conn.execute(
        text(f"SELECT format(CAST(:template AS text){arguments})"),
        {"template": template, **params},
    )).scalar_one()
    await conn.exec_driver_sql(statement)  # as it is: no bind markers parsed in a password


ROLE_ATTRIBUTES = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS"


async def _role(conn: AsyncConnection, login: ServiceLogin) -> str:
    exists = (await conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"),
                                 {"r": login.role})).first()
    verb = "ALTER" if exists else "CREATE"
    await _sql(conn, f"{verb} ROLE %I WITH {ROLE_ATTRIBUTES} PASSWORD %L",
               login.role, login.password)
    return "password set" if exists else "created"


async def _database(conn: AsyncConnection, login: ServiceLogin) -> str:
    owner = (await conn.execute(
        text("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :d"),
        {"d": login.database})).scalar_one_or_none()
    if owner is None:
        await _sql(conn, "CREATE DATABASE %I OWNER %I", login.database, login.role)
        state = "created"
    elif owner != login.role:
        await _sql(conn, "ALTER DATABASE %I OWNER TO %I", login.database, login.role)
        state = f"taken from {owner}"
    else:
        state = "kept"
    await _sql(conn, "REVOKE ALL ON DATABASE %I FROM PUBLIC", login.database)
    return state


async def _restrict(admin_url: URL, login: ServiceLogin) -> None:
    """Inside the database: its `public` schema and every table in it belong to the role (a
    store made before, by another role, is handed over), and PUBLIC may not create there."""
    inside = create_async_engine(admin_url.set(database=login.database),
                                 isolation_level="AUTOCOMMIT")
    try:
        async with inside.connect() as conn:
            await _sql(conn, "ALTER SCHEMA public OWNER TO %I", login.role)
            await _sql(conn, "REVOKE ALL ON SCHEMA public FROM PUBLIC")
            # tables, views and sequences of their own (a table's serial moves with it)
            owned = await conn.execute(text(
                "SELECT c.relname, c.relkind FROM pg_class c "
                "WHERE c.relnamespace = 'public'::regnamespace "
                "AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') "
                "AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = :role) "
                "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass "
                "AND d.objid = c.oid AND d.deptype IN ('a', 'i'))"), {"role": login.role})
            for name, kind in owned.all():
                what = "SEQUENCE" if kind == "S" else "TABLE"
                await _sql(conn, f"ALTER {what} public.%I OWNER TO %I", name, login.role)
    finally:
        await inside.dispose()
