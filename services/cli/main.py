"""`runner`: run the system or one service, talk to the gateway, and inspect the event log."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from services.settings import Settings

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False
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


def fail(message: str, code: int = 1) -> None:
    """One clear line on stderr and a non-zero exit: never a stack trace."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def load_service(name: str) -> type:
    try:
        module_name, class_name = SERVICE_CLASSES[name].split(":")
    except KeyError:
        fail(f"unknown service {name!r}; choose one of: {', '.join(SERVICE_CLASSES)}")
    return getattr(importlib.import_module(module_name), class_name)


def configure_logging(prefix: str = "", level: int = logging.INFO) -> None:
    fmt = f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("faststream").setLevel(logging.WARNING)


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
    cls = load_service(name)
    configure_logging(prefix=f"[{name}] ")
    settings = Settings()
    keep_to_itself(settings)
    try:
        # Services (and workers) run on uvloop: in `bench.density --quick`, five runs each, a
        # start's CPU over every process was 22 ms against 26 ms on asyncio's own loop
        # (bench/RESULTS.md). Imported here: the other commands run on asyncio's.
        import uvloop

        uvloop.run(cls(settings).run())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        fail(f"{name}: {exc}")


@app.command()
def up(hosts: int = typer.Option(1, min=1, max=16, help="worker-hosts to run")) -> None:
    """Run all five services (one process each, supervised, logs prefixed) until Ctrl-C."""
    from services.cli.supervisor import Supervisor, data_dir_of, prepare_data_dir, system

    async def main() -> None:
        prepare_data_dir(data_dir_of(os.environ))
        supervisor = Supervisor(os.environ)
        system(supervisor, hosts=hosts)
        await supervisor.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        console.print("[bold]stopping (graceful drain)…[/]")
        await supervisor.stop()

    asyncio.run(main())


@app.command()
def demo(
    seconds: float = typer.Option(12.0, min=3, max=600, help="how long to watch live trading"),
) -> None:
    """The whole system live on the paper broker: users on two tiers, runners trading, a
    rejected over-limit start, a crash and its auto-restart, a stop with flatten, the audit."""
    from services.cli.demo import run_demo

    wide = console if console.is_terminal else Console(width=150)  # logs, CI: no wrapping
    code = asyncio.run(run_demo(wide, watch_seconds=seconds))
    raise typer.Exit(code)


# ---------------------------------------------------------------- talking to the gateway

token_option = typer.Option(
    None,
    "--token",
    envvar="RUNNER_TOKEN",
    help="bearer token [default: the admin token in the data dir]",
)


def _client(token: str | None) -> Any:
    from services.cli.client import GatewayClient

    settings = Settings()
    if token is None:
        path = settings.own("gateway").data_dir / "admin.token"
        token = settings.admin_token or (path.read_text().strip() if path.exists() else None)
    if not token:
        fail("no token: pass --token, set RUNNER_TOKEN, or run where the admin token is")
    return GatewayClient.for_settings(settings, token)


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


@app.command()
def start(
    strategy: str = typer.Argument(..., help="strategy type, e.g. hold or scalping"),
    instrument: list[str] = typer.Option(["BTC-PERPETUAL"], "--instrument", "-i"),
    broker: str = typer.Option("paper", help="broker id"),
    user: str | None = typer.Option(None, help="user to act for (admin token only)"),
    strategy_id: str | None = typer.Option(
        None, help="your id for this strategy [type-instrument]"
    ),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="strategy parameter KEY=VALUE (JSON value)"
    ),
    api_key: str = typer.Option("paper-key", envvar="RUNNER_API_KEY"),
    api_secret: str = typer.Option("paper-secret", envvar="RUNNER_API_SECRET"),
    token: str | None = token_option,
) -> None:
    """Start a runner; prints its job and worker ids."""
    parameters: dict[str, Any] = {}
    for item in param:
        key, sep, raw = item.partition("=")
        if not sep:
            fail(f"--param {item!r}: expected KEY=VALUE")
        try:
            parameters[key] = json.loads(raw)
        except ValueError:
            parameters[key] = raw
    body = {
        "strategyId": strategy_id or f"{strategy}-{instrument[0].lower()}",
        "brokerId": broker,
        "credentials": {"apiKey": api_key, "apiSecret": api_secret},
        "config": {
            "name": strategy_id or strategy,
            "type": strategy,
            "parameters": parameters,
            "instruments": instrument,
        },
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
    result = _call(token, lambda c: c.stop(worker_id, flatten))
    console.print(
        f"[green]{result['message']}[/] (flattened positions: {result['flattenedPositions']})"
    )


@app.command()
def status(
    user: str | None = typer.Option(None, help="only this user's runners (admin)"),
    as_json: bool = typer.Option(False, "--json"),
    token: str | None = token_option,
) -> None:
    """Runners with positions and P&L, and the queue figures."""
    from services.cli.client import status_table

    result = _call(token, lambda c: c.status(user))
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        console.print(status_table(result))


users_app = typer.Typer(no_args_is_help=True, help="Users and their tokens (admin).")
entitlements_app = typer.Typer(no_args_is_help=True, help="Subscription tiers (admin).")
topology_app = typer.Typer(no_args_is_help=True, help="The RabbitMQ topology.")
app.add_typer(users_app, name="users")
app.add_typer(entitlements_app, name="entitlements")
app.add_typer(topology_app, name="topology")


@users_app.command("add")
def users_add(user_id: str, token: str | None = token_option) -> None:
    """Create a user; prints the user's bearer token (shown once)."""
    user_token = _call(token, lambda c: c.add_user(user_id))
    console.print(f"user {user_id} token: [bold]{user_token}[/]")


@entitlements_app.command("upgrade")
def entitlements_upgrade(
    user_id: str, tier: str, days: float = typer.Option(30.0), token: str | None = token_option
) -> None:
    """Put a user on a tier for a number of days (fractions allowed)."""
    result = _call(token, lambda c: c.upgrade(user_id, tier, days))
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


def _register_optional_commands() -> None:
    """Command groups that live beside their subject (event log tools, gateway client, …)."""
    try:
        from services.cli import log_commands
    except ImportError:  # pragma: no cover - during bootstrap
        return
    from services.cli.keys import keys_app

    app.add_typer(keys_app, name="keys")
    app.add_typer(log_commands.events_app, name="events")
    app.add_typer(log_commands.audit_app, name="audit")
    app.command("replay")(log_commands.replay_command)
    app.command("publish")(log_commands.publish_command)


_register_optional_commands()

if __name__ == "__main__":
    app()
