"""`runner`: run the system or one service, talk to the gateway, and inspect the event log."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys

import typer

from services.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

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


@app.command()
def service(name: str = typer.Argument(..., help="gateway | entitlement | scheduler | worker-host | monitor")) -> None:
    """Run one service in the foreground until SIGINT/SIGTERM (for compose and scale-out)."""
    cls = load_service(name)
    configure_logging(prefix=f"[{name}] ")
    settings = Settings()
    try:
        asyncio.run(cls(settings).run())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        fail(f"{name}: {exc}")


def _register_optional_commands() -> None:
    """Command groups that live beside their subject (event log tools, gateway client, …)."""
    try:
        from services.cli import log_commands
    except ImportError:  # pragma: no cover - during bootstrap
        return
    app.add_typer(log_commands.events_app, name="events")
    app.add_typer(log_commands.audit_app, name="audit")
    app.command("replay")(log_commands.replay_command)
    app.command("publish")(log_commands.publish_command)


_register_optional_commands()

if __name__ == "__main__":
    app()
