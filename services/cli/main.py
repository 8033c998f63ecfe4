"""`runner`: run the system or one service, talk to the gateway, and inspect the event log."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from services.cli.errors import fail
from services.settings import Settings

# rich_markup_mode=None: help texts are shown as written (rich would take "[default: …]" or
# "[type-instrument]" for markup and drop them)
app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()

# service name -> "module:Class" (imported lazily: each service pulls in only what it needs)
SERVICE_CLASSES = {
    "gateway": "services.gateway.service:GatewayService",
    "entitlement": "services.entitlement.service:EntitlementService",
    "scheduler": "services.scheduler.service:SchedulerService",
    "worker-host": "services.worker_host.service:WorkerHostService",
    "monitor": "services.monitor.service:MonitorService",
}


def load_service(name: str) -> type:
    try:
        module_name, class_name = SERVICE_CLASSES[name].split(":")
    except KeyError:
        fail(f"unknown service {name!r}; choose one of: {', '.join(SERVICE_CLASSES)}")
    return getattr(importlib.import_module(module_name), class_name)


def configure_logging(service: str = "", settings: Settings | None = None) -> None:
    """Text or JSON lines (`RUNNER_LOG_FORMAT`) from `RUNNER_LOG_LEVEL` on."""
    from services import logs

    settings = settings or Settings()
    logs.configure(service, format=settings.log_format, level=settings.log_level)


async def run_service(service: Any, settings: Settings) -> None:
    """Run `service` until SIGINT/SIGTERM, with its metrics and health on
    `RUNNER_METRICS_PORT` when set."""
    from services import observability

    server = None
    if settings.metrics_port:
        server = await observability.serve(service, settings.metrics_host, settings.metrics_port)
    try:
        await service.run()
    finally:
        if server is not None:
            server.close()


def keep_to_itself(settings: Settings) -> None:
    """What a service does first: every file it writes is its own (umask 077), in a data
    directory only its uid can enter (0700), and no other process of its uid may read its
    memory or environment (not dumpable: a worker under the host's uid, where it cannot switch
    ids, cannot read the host's secrets through /proc)."""
    from services.worker.confinement import set_dumpable

    os.umask(0o077)
    sys.dont_write_bytecode = True  # its own (0600) would be unreadable to the workers' uids
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.chmod(settings.data_dir, 0o700)
    except PermissionError:
        logging.getLogger(__name__).warning(
            "data dir %s is not ours: cannot make it 0700", settings.data_dir)
    set_dumpable(False)


@app.command()
def service(
    name: str = typer.Argument(
        ..., help="gateway | entitlement | scheduler | worker-host | monitor"
    ),
) -> None:
    """Run one service in the foreground until SIGINT/SIGTERM (for compose and scale-out)."""
    from services.bus import QueueMismatch, TopologyMissing
    from services.secrets import AdminTokenError

    cls = load_service(name)
    settings = Settings()
    configure_logging(name, settings)
    keep_to_itself(settings)
    try:
        # Services (and workers) run on uvloop, for less CPU per message; imported here, as
        # the other commands run on asyncio's own loop.
        import uvloop

        uvloop.run(run_service(cls(settings), settings))
    except KeyboardInterrupt:
        pass
    except (OSError, AdminTokenError, QueueMismatch, TopologyMissing) as exc:
        fail(f"{name}: {exc}")


@app.command()
def up(
    hosts: int = typer.Option(1, min=1, max=16, help="worker-hosts to run"),
    replicas: int = typer.Option(
        1, min=1, max=4,
        help="replicas of the entitlement service, the scheduler and the monitor (one active, "
        "the others standing by; needs PostgreSQL)"),
    broker_admin_url: str | None = typer.Option(
        None, "--broker-admin-url", envvar="RUNNER_AMQP_ADMIN_URL", show_default=False,
        help="an administrator's login on RUNNER_AMQP_URL's vhost: the topology is declared "
        "with it, and each service and worker-host runs on a login of its own with only its "
        "rights (made with rabbitmqctl on this machine, deleted at the end); without it, every "
        "service shares RUNNER_AMQP_URL's login"),
) -> None:
    """Run all five services (one process each, supervised, logs prefixed) until Ctrl-C."""
    from services.bus import broker_login
    from services.cli.broker_logins import (
        Login,
        can_make_vhosts,
        create_logins,
        declare_topology,
        delete_logins,
        login_urls,
        new_logins,
    )
    from services.cli.supervisor import (
        Supervisor,
        data_dir_of,
        host_ids,
        prepare_data_dir,
        system,
    )
    from services.secrets import AdminTokenError, check_admin_token

    if replicas > 1 and not (Settings().database_url or "").startswith("postgresql"):
        fail("--replicas needs the stores on PostgreSQL (RUNNER_DATABASE_URL): on SQLite every "
             "replica would be active")

    if token := Settings().admin_token:
        try:
            check_admin_token(token, "RUNNER_ADMIN_TOKEN")
        except AdminTokenError as exc:
            fail(str(exc))
    _broker_or_fail()
    settings = Settings()
    logins: list[Login] = []
    if broker_admin_url:
        if Settings(amqp_url=broker_admin_url, amqp_url_file=None).vhost != settings.vhost:
            fail("--broker-admin-url must name RUNNER_AMQP_URL's vhost")
        if not can_make_vhosts(settings.amqp_url):
            fail("a login per service is made with rabbitmqctl, on the broker's machine; for "
                 "another broker, render its definitions (rabbitmq/render_definitions.py)")
        logins = new_logins(host_ids(hosts))
    else:
        console.print(f"[yellow]warning:[/] every service logs in as "
                      f"{broker_login(settings.amqp_url)}, one shared login: the broker "
                      "cannot tell them apart, so any of them may publish anything; give "
                      "RUNNER_AMQP_ADMIN_URL for a login per service (docs/SECURITY.md §8)")

    async def main() -> None:
        prepare_data_dir(data_dir_of(os.environ))
        if logins:
            assert broker_admin_url is not None
            await declare_topology(broker_admin_url)
            create_logins(settings.vhost, logins)
        supervisor = Supervisor(os.environ)
        system(supervisor, hosts=hosts, replicas=replicas,
               amqp_urls=login_urls(settings.amqp_url, logins))
        try:
            await supervisor.start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            console.print("[bold]stopping (graceful drain)…[/]")
            await supervisor.stop()
        finally:
            delete_logins(logins)

    asyncio.run(main())


@app.command()
def demo(
    seconds: float = typer.Option(12.0, min=3, max=600, help="how long to watch live trading"),
) -> None:
    """The whole system live on the paper broker: users on two tiers, runners trading, a
    rejected over-limit start, a crash and its auto-restart, a stop with flatten, the audit."""
    from services.cli.demo import run_demo

    _broker_or_fail()
    wide = console if console.is_terminal else Console(width=150)  # logs, CI: no wrapping
    code = asyncio.run(run_demo(wide, watch_seconds=seconds))
    raise typer.Exit(code)


def _broker_or_fail() -> None:
    """One message when the broker is not there (and the local one started if it is only
    stopped), rather than a refused connection from each service."""
    from services.cli.broker_check import ensure_broker

    problem = ensure_broker(Settings().amqp_url, console)
    if problem is not None:
        fail(problem)


# ---------------------------------------------------------------- talking to the gateway

token_option = typer.Option(
    None,
    "--token",
    envvar="RUNNER_TOKEN",
    help="bearer token [default: the admin token in the data dir]",
)


def _token(token: str | None) -> str:
    """The token given, else the admin's (its setting, or its file in the data dir)."""
    settings = Settings()
    if token is None:
        path = settings.own("gateway").data_dir / "admin.token"
        token = settings.admin_token or (path.read_text().strip() if path.exists() else None)
    if not token:
        fail("no token: pass --token, set RUNNER_TOKEN, or run where the admin token is")
    assert token is not None
    return token


def _client(token: str | None) -> Any:
    from services.cli.client import GatewayClient

    return GatewayClient.for_settings(Settings(), _token(token))


def _call(token: str | None, op: Any) -> Any:
    from services.cli.client import GatewayError

    async def main() -> Any:
        client = _client(token)
        try:
            return await op(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except GatewayError as exc:
        fail(str(exc))


class TierName(StrEnum):
    free = "free"
    basic = "basic"
    pro = "pro"
    enterprise = "enterprise"


@app.command()
def start(
    strategy: str = typer.Argument(..., help="strategy type (runner strategies lists them)"),
    instrument: list[str] = typer.Option(["BTC-PERPETUAL"], "--instrument", "-i"),
    broker: str = typer.Option("paper", help="broker id"),
    user: str | None = typer.Option(None, help="user to act for (admin token only)"),
    strategy_id: str | None = typer.Option(
        None, help="your id for this strategy [type-instrument]"
    ),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="strategy parameter KEY=VALUE (JSON value)"
    ),
    max_position_size: float | None = typer.Option(None, help="risk: largest position [100]"),
    stop_loss_percent: float | None = typer.Option(None, help="risk: stop-loss, % [2]"),
    take_profit_percent: float | None = typer.Option(None, help="risk: take-profit, % [3]"),
    flatten_on_stop: bool = typer.Option(
        True, "--flatten-on-stop/--no-flatten-on-stop",
        help="close its positions whenever it stops [flatten]"),
    api_key: str = typer.Option("paper-key", envvar="RUNNER_API_KEY",
                                help="the broker account's key [paper-key]"),
    token: str | None = token_option,
) -> None:
    """Start a runner; prints its job and worker ids. The broker's API secret is read from
    RUNNER_API_SECRET, or asked for (never from the command line, where `ps` shows it); the
    paper broker needs none."""
    parameters: dict[str, Any] = {}
    for item in param:
        key, sep, raw = item.partition("=")
        if not sep:
            fail(f"--param {item!r}: expected KEY=VALUE")
        try:
            parameters[key] = json.loads(raw)
        except ValueError:
            parameters[key] = raw
    api_secret = os.environ.get("RUNNER_API_SECRET") or (
        "paper-secret" if broker == "paper" else
        typer.prompt(f"API secret for {broker}", hide_input=True))
    risk = {name: value for name, value in (("maxPositionSize", max_position_size),
                                            ("stopLossPercent", stop_loss_percent),
                                            ("takeProfitPercent", take_profit_percent))
            if value is not None}
    body = {
        "strategyId": strategy_id or f"{strategy}-{instrument[0].lower()}",
        "brokerId": broker,
        "credentials": {"apiKey": api_key, "apiSecret": api_secret},
        "config": {
            "name": strategy_id or strategy,
            "type": strategy,
            "parameters": parameters,
            "instruments": instrument,
            **({"riskManagement": risk} if risk else {}),
        },
        "flattenOnStop": flatten_on_stop,
    }
    if user:
        body["userId"] = user
    result = _call(token, lambda c: c.start(**body))
    console.print(
        f"[green]{result['message']}[/] job {result['jobId']} worker {result['workerId']}"
    )


@app.command()
def stop(
    worker_id: str,
    flatten: bool = typer.Option(
        False, "--flatten", help="close every open position at market first"
    ),
    token: str | None = token_option,
) -> None:
    """Stop a runner (optionally flattening its positions) and wait until it has stopped."""
    async def stopping(client: Any) -> dict[str, Any]:
        doing = "flattening and stopping" if flatten else "stopping"
        with console.status(f"{doing} {worker_id}…") as shown:
            call = asyncio.ensure_future(client.stop(worker_id, flatten))
            began = asyncio.get_running_loop().time()
            while not call.done():
                await asyncio.wait({call}, timeout=1.0)
                waited = asyncio.get_running_loop().time() - began
                shown.update(f"{doing} {worker_id}… {waited:.0f} s (a graceful stop, then "
                             "SIGTERM and SIGKILL after the grace period)")
            return call.result()

    result = _call(token, stopping)
    console.print(
        f"[green]{result['message']}[/] (flattened positions: {result['flattenedPositions']})"
    )


@app.command()
def halt(
    user: str | None = typer.Option(None, help="this user's runners (admin token)"),
    everyone: bool = typer.Option(False, "--all", help="every user's runners (admin token)"),
    token: str | None = token_option,
) -> None:
    """Kill switch: stop every runner in scope at once, flattening its positions (a user's
    token: their own runners; an admin's: --user's, or --all users')."""
    if user and everyone:
        fail("--user and --all exclude each other")
    result = _call(token, lambda c: c.halt(user, everyone))
    console.print(f"[green]{result['message']}[/] (flattened positions: "
                  f"{result['flattenedPositions']})")


@app.command()
def status(
    user: str | None = typer.Option(None, help="only this user's runners (admin)"),
    limit: int | None = typer.Option(None, min=1, max=1000,
                                     help="one page of this many runners, oldest first"),
    offset: int = typer.Option(0, min=0, help="the page's first runner"),
    watch: bool = typer.Option(False, "--watch", "-w",
                               help="a live view, updated from the event stream"),
    as_json: bool = typer.Option(False, "--json"),
    token: str | None = token_option,
) -> None:
    """Runners with positions and P&L, and the queue figures."""
    from services.cli.client import status_table

    if watch:
        from services.cli.watch import watch_status

        settings = Settings()
        try:
            asyncio.run(watch_status(f"http://{settings.http_host}:{settings.http_port}",
                                     _token(token), console, user=user, limit=limit,
                                     offset=offset))
        except KeyboardInterrupt:
            pass
        return
    result = _call(token, lambda c: c.status(user, offset=offset, limit=limit))
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        console.print(status_table(result, page=result.get("page")))


@app.command()
def hosts(token: str | None = token_option) -> None:
    """The worker-hosts: capacity, when last heard of, lost or online (admin)."""
    from rich.table import Table

    from services.cli.client import when

    result = _call(token, lambda c: c.hosts())
    table = Table(title="Worker-hosts")
    for column in ("host", "hostname", "capacity", "online since", "last seen", "state"):
        table.add_column(column)
    for host in result:
        table.add_row(host["hostId"], host.get("hostname") or "–", str(host.get("capacity")),
                      when(host.get("onlineAt")), when(host.get("lastSeen")),
                      "[red]lost[/]" if host.get("lost") else "[green]online[/]")
    console.print(table)


@app.command()
def strategies() -> None:
    """The installed strategies and their parameters (name, type, default, limits)."""
    from rich.table import Table

    from services.gateway.strategy_schemas import describe
    from services.worker.strategies import available_strategies

    found = describe(available_strategies())
    for name, strategy in found.strategies.items():
        console.print(f"\n[bold]{name}[/]: {strategy.description}", highlight=False)
        table = Table()
        for column in ("parameter", "type", "default", "limits"):
            table.add_column(column)
        for parameter, schema in strategy.parameters.get("properties", {}).items():
            table.add_row(parameter, *_describe(schema))
        console.print(table)
    console.print("Risk limits (--max-position-size, --stop-loss-percent, "
                  "--take-profit-percent): " + ", ".join(
                      f"{k} [{v.get('default')}]"
                      for k, v in found.riskManagement["properties"].items()))


def _describe(schema: dict[str, Any]) -> tuple[str, str, str]:
    """(type, default, limits) of a parameter's JSON schema."""
    options = [o for o in schema.get("anyOf", [schema]) if o.get("type") != "null"]
    kind = options[0] if options else {}
    type_name = " | ".join(o.get("type", "?") for o in options) or "any"
    if "enum" in kind:
        type_name = " | ".join(map(str, kind["enum"]))
    limits = ", ".join(f"{word} {kind[key]}" for key, word in (
        ("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
        ("exclusiveMaximum", "<")) if key in kind)
    return type_name, json.dumps(schema.get("default")), limits or "–"


users_app = typer.Typer(no_args_is_help=True, help="Users and their tokens (admin).",
                        rich_markup_mode=None)
entitlements_app = typer.Typer(no_args_is_help=True, help="Subscription tiers (admin).",
                               rich_markup_mode=None)
topology_app = typer.Typer(no_args_is_help=True, help="The RabbitMQ topology.",
                           rich_markup_mode=None)
app.add_typer(users_app, name="users")
app.add_typer(entitlements_app, name="entitlements")
app.add_typer(topology_app, name="topology")


expires_option = typer.Option(
    None, "--expires-days", min=0.0001, max=3660,
    help="the token stops working after this many days (fractions allowed) [never]")


@users_app.command("add")
def users_add(user_id: str, expires_days: float | None = expires_option,
              token: str | None = token_option) -> None:
    """Create a user; prints the user's bearer token (shown once)."""
    answer = _call(token, lambda c: c.create_user(user_id, expires_days))
    console.print(f"user {user_id} token: [bold]{answer['token']}[/]"
                  + (f" (expires {answer['expiresAt']})" if answer.get("expiresAt") else ""))


@users_app.command("rotate")
def users_rotate(user_id: str, expires_days: float | None = expires_option,
                 token: str | None = token_option) -> None:
    """Give a user a new token (printed, shown once); the old one is refused at once, on every
    gateway within a second."""
    answer = _call(token, lambda c: c.rotate_token(user_id, expires_days))
    console.print(f"user {user_id} new token: [bold]{answer['token']}[/]"
                  + (f" (expires {answer['expiresAt']})" if answer.get("expiresAt") else ""))


@users_app.command("revoke")
def users_revoke(user_id: str, token: str | None = token_option) -> None:
    """Refuse a user's token from now on (every gateway within a second); the user, their tier
    and their runners stay. `runner users rotate` gives them a new one."""
    console.print(_call(token, lambda c: c.revoke_token(user_id))["message"])


admin_app = typer.Typer(no_args_is_help=True, help="The admin token.", rich_markup_mode=None)
app.add_typer(admin_app, name="admin")


@admin_app.command("rotate-token")
def admin_rotate_token() -> None:
    """Replace the admin token in its file (the gateway's data dir; on the gateway's machine):
    every gateway reading that file takes the new one at its next request and refuses the old.
    Prints the file's path, never the token."""
    from services.secrets import admin_token_file, write_admin_token

    settings = Settings()
    if settings.admin_token:
        fail("the admin token is set by RUNNER_ADMIN_TOKEN: change it there and restart the "
             "gateways (or, on a gateway reading a token file, POST /admin/token)")
    path = admin_token_file(settings.own("gateway"))
    if not path.exists():
        fail(f"no admin token file at {path}: run this where the gateway keeps its data "
             "(RUNNER_DATA_DIR), or call POST /admin/token")
    write_admin_token(path)
    console.print(f"admin token rotated: the new one is in {path} (0600); the old one is "
                  "refused from now on")


@users_app.command("list")
def users_list(token: str | None = token_option) -> None:
    """Every user's id (admin)."""
    for user_id in _call(token, lambda c: c.users()):
        typer.echo(user_id)


@entitlements_app.command("upgrade")
def entitlements_upgrade(
    user_id: str,
    tier: TierName = typer.Argument(..., help="free (1 worker), basic (3), pro (10), "
                                              "enterprise (50)"),
    days: float = typer.Option(30.0, help="how long, in days (fractions allowed)"),
    token: str | None = token_option,
) -> None:
    """Put a user on a tier for a number of days (fractions allowed)."""
    result = _call(token, lambda c: c.upgrade(user_id, tier.value, days))
    console.print(
        f"{user_id}: {result['tier']} ({result['maxWorkers']} workers) until {result['expiresAt']}"
    )


@entitlements_app.command("check")
def entitlements_check(user_id: str, token: str | None = token_option) -> None:
    """A user's tier, limit and usage."""
    print(json.dumps(_call(token, lambda c: c.entitlement(user_id)), indent=2))


@topology_app.command("export")
def topology_export(
    output: Path = typer.Option(Path("rabbitmq/definitions.json"), "--output", "-o"),
    vhost: str = typer.Option("/"),
) -> None:
    """Write the broker definitions (exchanges, queues, bindings) for a RabbitMQ container."""
    from services.topology import definitions

    output.write_text(json.dumps(definitions(vhost), indent=2) + "\n")
    console.print(f"wrote {output}")


@topology_app.command("asyncapi")
def topology_asyncapi(
    output: Path = typer.Option(Path("docs/asyncapi.json"), "--output", "-o"),
) -> None:
    """Write the bus as an AsyncAPI 3 document (channels, operations, every message's schema)."""
    from services.asyncapi import document

    output.write_text(json.dumps(document(), indent=2, ensure_ascii=False) + "\n")
    console.print(f"wrote {output}")


def _register_optional_commands() -> None:
    """Command groups that live beside their subject (event log tools, gateway client, …)."""
    try:
        from services.cli import log_commands
    except ImportError:  # pragma: no cover - during bootstrap
        return
    from services.cli.bus_commands import bus_app
    from services.cli.db_commands import db_app
    from services.cli.images import images_app
    from services.cli.keys import keys_app

    app.add_typer(db_app, name="db")
    app.add_typer(bus_app, name="bus")
    app.add_typer(keys_app, name="keys")
    app.add_typer(images_app, name="images")
    app.add_typer(log_commands.events_app, name="events")
    app.add_typer(log_commands.audit_app, name="audit")
    app.command("replay")(log_commands.replay_command)
    app.command("publish")(log_commands.publish_command)


_register_optional_commands()

if __name__ == "__main__":
    app()
