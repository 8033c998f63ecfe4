"""Roles and databases read off `RUNNER_DATABASE_URL` for `runner db setup`, and a service's own
password put into its URL (`RUNNER_DATABASE_PASSWORD`)."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from services.database_roles import (
    ServiceLogin,
    SetupError,
    logins,
    password_variable,
    service_names,
)
from services.settings import Settings

TEMPLATE = "postgresql://runner_{service}@db:5432/runner_{service}"


def passwords(*services: str) -> dict[str, str]:
    return {password_variable(s): f"pw-{s}" for s in services}


def test_each_service_and_worker_host_gets_a_role_and_a_database_named_after_it() -> None:
    services = service_names(["worker-1"])
    assert services == ["gateway", "entitlement", "scheduler", "monitor",
                        "worker-host-worker-1"]
    found = logins(TEMPLATE, services, passwords(*services))
    assert found[0] == ServiceLogin("gateway", "runner_gateway", "runner_gateway", "pw-gateway")
    assert found[-1].role == found[-1].database == "runner_worker-host-worker-1"
    assert "pw-" not in repr(found)  # never printed


def test_password_variables() -> None:
    assert password_variable("gateway") == "RUNNER_DATABASE_PASSWORD_GATEWAY"
    assert (password_variable("worker-host-worker-1")
            == "RUNNER_DATABASE_PASSWORD_WORKER_HOST_WORKER_1")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (None, "RUNNER_DATABASE_URL is not set"),
        ("postgresql://runner@db/runner_{service}", "a role of its own"),
        ("postgresql://db/runner_{service}", "a role of its own"),
        ("postgresql://{service}:shared@db/{service}", "must not hold a password"),
        ("sqlite:///var/{service}.db", "not a PostgreSQL URL"),
    ],
)
def test_a_template_that_would_share_a_login_is_refused(template: str | None,
                                                        message: str) -> None:
    with pytest.raises(SetupError, match=message):
        logins(template, ["gateway", "monitor"], passwords("gateway", "monitor"))


def test_a_missing_password_names_its_variable() -> None:
    with pytest.raises(SetupError, match="RUNNER_DATABASE_PASSWORD_MONITOR is not set"):
        logins(TEMPLATE, ["gateway", "monitor"], passwords("gateway"))


def test_a_service_connects_with_its_own_password() -> None:
    settings = Settings(database_url=TEMPLATE, database_password="p@ss:w/rd%'")
    url = make_url(settings.database_for("scheduler"))
    assert (url.drivername, url.username, url.password, url.host, url.database) == (
        "postgresql+asyncpg", "runner_scheduler", "p@ss:w/rd%'", "db", "runner_scheduler")
    assert "p@ss" not in repr(settings)


def test_a_password_in_the_url_wins_and_sqlite_takes_none(tmp_path) -> None:  # type: ignore[no-untyped-def]
    inline = Settings(database_url="postgresql://u_{service}:inline@db/{service}",
                      database_password="other")
    assert make_url(inline.database_for("gateway")).password == "inline"
    sqlite = Settings(data_dir=tmp_path, database_password="unused")
    assert sqlite.database_for("gateway").startswith("sqlite:///")
    assert Settings(database_password="").database_password is None


def test_a_role_name_past_postgres_limit_is_refused() -> None:
    settings = Settings(database_url="postgresql://{service}_role_with_a_long_suffix@db/r")
    with pytest.raises(ValueError, match="role name"):
        settings.database_for("worker-host-" + "h" * 30)
