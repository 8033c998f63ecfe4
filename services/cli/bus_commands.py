"""`runner bus setup`: the shared topology declared once, with a privileged login, before the
services start on their own logins (which may not declare it)."""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console

from services.cli.broker_logins import declare_topology
from services.cli.errors import fail
from services.topology import EXCHANGES, STATIC_QUEUES

bus_app = typer.Typer(no_args_is_help=True, help="The broker's topology.")
console = Console()


@bus_app.command("setup")
def setup(
    admin_url: str = typer.Option(
        ..., envvar="RUNNER_AMQP_ADMIN_URL", show_default=False,
        help="a login that may configure everything on the vhost, e.g. "
        "amqp://admin:PASSWORD@broker:5672/runner (better in RUNNER_AMQP_ADMIN_URL than on a "
        "command line)"),
) -> None:
    """Declare the exchanges, the services' queues and their bindings (idempotent: run it
    again after an upgrade). A broker that loads rabbitmq/definitions.json at boot needs no
    setup; policies (the worker-host inboxes' expiry) come only with the definitions."""
    try:
        asyncio.run(declare_topology(admin_url))
    except (ValueError, OSError) as exc:
        fail(str(exc))
    except Exception as exc:  # the broker refused: name it, without a trace
        fail(f"the broker refused the setup: {exc}")
    console.print(f"declared {len(EXCHANGES)} exchanges and {len(STATIC_QUEUES)} queues")
