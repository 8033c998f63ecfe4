"""`runner db setup`: a PostgreSQL role and a database per service (services.database_roles)."""

from __future__ import annotations

import asyncio
import os

import typer
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy.exc import DBAPIError, InterfaceError

from services.cli.errors import fail
from services.database_roles import SetupError, logins, service_names, set_up
from services.settings import Settings

db_app = typer.Typer(no_args_is_help=True, help="The services' PostgreSQL roles and databases.")
console = Console()


@db_app.command("setup")
def setup(
    admin_url: str = typer.Option(
        ..., envvar="RUNNER_DATABASE_ADMIN_URL", show_default=False,
        help="a superuser's URL on the maintenance database, e.g. "
        "postgresql://postgres:PASSWORD@db:5432/postgres (better in RUNNER_DATABASE_ADMIN_URL "
        "than on a command line)"),
    host: list[str] = typer.Option(
        [], "--host", help="a worker-host's id (repeat for each): its store gets a role too"),
) -> None:
    """Create (or repair) each service's role and database from RUNNER_DATABASE_URL, whose
    {service} names both: the role owns its database, which no other role may open. Each
    role's password is read from RUNNER_DATABASE_PASSWORD_<SERVICE> (e.g. ..._GATEWAY,
    ..._WORKER_HOST_<HOST ID>); run it again after changing one. Prints no password."""
    services = service_names(host)
    try:
        wanted = logins(Settings().database_url, services, os.environ)
        for line in asyncio.run(set_up(admin_url, wanted)):
            console.print(line)
    except SetupError as exc:
        fail(str(exc))
    except ValidationError as exc:
        error = exc.errors()[0]
        fail(f"RUNNER_{str(error['loc'][0]).upper()}: {error['msg']}" if error["loc"]
             else error["msg"])
    except (DBAPIError, InterfaceError, OSError) as exc:
        fail(f"PostgreSQL refused the setup: {getattr(exc, 'orig', None) or exc}")
