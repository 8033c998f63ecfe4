"""`runner up`: every service as its own process, supervised, logs prefixed by service.

Each service gets a data directory of its own beneath RUNNER_DATA_DIR (0700, as everything it
writes: umask 077) and only the environment it needs (`service_environment`): the sealing key
reaches the gateway and the worker-hosts only, the admin token the gateway only, and nothing of
the caller's environment but what a Python service runs with.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.text import Text

COLOURS = {
    "gateway": "cyan",
    "entitlement": "magenta",
    "scheduler": "yellow",
    "monitor": "green",
    "worker-host": "blue",
}
# Stopped in this order: the edge first, the log last, so the log sees every final event.
STOP_ORDER = ("gateway", "scheduler", "entitlement", "worker-host", "monitor")
RESTART_DELAY = 1.0

# What a service may take from the environment it is started from: its settings, and what a
# Python process, its locale and its TLS and proxies need; but the secrets below only where
# named, and never the command line's own (a user's token, the credentials of `runner start`).
PASSED = ("PATH", "HOME", "LANG", "TZ", "TMPDIR", "VIRTUAL_ENV", "SSL_CERT_FILE",
          "SSL_CERT_DIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
          "no_proxy")
PASSED_PREFIXES = ("RUNNER_", "LC_", "PYTHON")
SECRETS_FOR = {
    "RUNNER_SECRET_KEY": {"gateway", "worker-host"},
    "RUNNER_SECRET_KEY_FILE": {"gateway", "worker-host"},
    "RUNNER_ADMIN_TOKEN": {"gateway"},
}
NEVER_PASSED = ("RUNNER_TOKEN", "RUNNER_API_KEY", "RUNNER_API_SECRET",
                "RUNNER_DATABASE_ADMIN_URL",  # `runner db setup`'s, with the services' below
                "RUNNER_AMQP_ADMIN_URL")  # `runner up`'s and `runner bus setup`'s
NEVER_PASSED_PREFIXES = ("RUNNER_DATABASE_PASSWORD_",)


def service_environment(env: Mapping[str, str], service: str) -> dict[str, str]:
    """The part of `env` that `service` is started with."""
    return {
        name: value
        for name, value in env.items()
        if (name in PASSED or name.startswith(PASSED_PREFIXES))
        and name not in NEVER_PASSED and not name.startswith(NEVER_PASSED_PREFIXES)
        and service in SECRETS_FOR.get(name, {service})
    }


def data_dir_of(env: Mapping[str, str]) -> Path:
    return Path(env.get("RUNNER_DATA_DIR") or "./var")


def prepare_data_dir(root: Path) -> None:
    """The data dir, 0700. A flat layout (the services' stores, the admin token and the sealing
    key side by side) is moved into a directory per service first, so no store is left behind."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    for store in list(root.glob("*.db")):
        own = root / store.stem
        if own.is_dir():  # a worker-host's workers, in a dir named as its store: it goes inside
            moving = root / f".{store.stem}.moving"
            own.rename(moving)
            own.mkdir(mode=0o700)
            moving.rename(own / store.stem)
        else:
            own.mkdir(mode=0o700)
        for part in list(root.glob(f"{glob.escape(store.name)}*")):  # with its -wal and -shm
            part.rename(own / part.name)
    for name, service in (("admin.token", "gateway"), ("secret.key", "keys")):
        if (root / name).exists() and not (root / service / name).exists():
            (root / service).mkdir(mode=0o700, exist_ok=True)
            (root / name).rename(root / service / name)


@dataclass
class Child:
    label: str
    service: str
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    keep_down: bool = False  # killed on purpose (fault drills): do not restart
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


class Supervisor:
    """Starts, watches and restarts service processes; stops them gracefully in order."""

    def __init__(
        self,
        base_env: Mapping[str, str],
        console: Console | None = None,
        quiet: Callable[[str], bool] | None = None,
    ) -> None:
        self.base_env = dict(base_env)
        self.console = console or Console(stderr=True)
        self.quiet = quiet or (lambda line: False)
        self.children: list[Child] = []
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    def add(self, service: str, label: str | None = None, **env: str) -> Child:
        """`service` started with its part of the base environment, and `env`."""
        child = Child(label or service, service, service_environment(self.base_env, service) | env)
        self.children.append(child)
        return child

    async def start(self) -> None:
        for child in self.children:
            await self._spawn(child)
            self._watchers.append(asyncio.create_task(self._watch(child)))

    async def _spawn(self, child: Child) -> None:
        child.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli.main",
            "service",
            child.service,
            env=child.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            umask=0o077,
        )
        assert child.process.stdout is not None
        child.pumps = [asyncio.create_task(self._pump(child, child.process.stdout))]

    async def _pump(self, child: Child, stream: asyncio.StreamReader) -> None:
        colour = COLOURS.get(child.service, "white")
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            if self.quiet(text):
                continue
            self.console.print(Text(f"[{child.label}] ", style=colour) + Text(text), soft_wrap=True)

    async def _watch(self, child: Child) -> None:
        """Restart a child that exits while we are not stopping (with a short delay)."""
        while True:
            assert child.process is not None
            code = await child.process.wait()
            await asyncio.gather(*child.pumps, return_exceptions=True)
            if self._stopping or child.keep_down:
                return
            child.restarts += 1
            self.console.print(
                f"[bold red]{child.label} exited with {code}; restarting (#{child.restarts})[/]"
            )
            await asyncio.sleep(RESTART_DELAY)
            if self._stopping:
                return
            await self._spawn(child)

    def child(self, label: str) -> Child:
        return next(c for c in self.children if c.label == label)

    def kill(self, label: str, *, restart: bool = True) -> int:
        """SIGKILL a service process (fault drills); returns its pid."""
        child = self.child(label)
        assert child.process is not None
        child.keep_down = not restart
        child.process.kill()
        return child.process.pid

    async def revive(self, label: str) -> None:
        """Start a service killed with `restart=False` again."""
        child = self.child(label)
        child.keep_down = False
        await self._spawn(child)
        self._watchers.append(asyncio.create_task(self._watch(child)))

    def alive(self) -> bool:
        return all(c.process is not None and c.process.returncode is None for c in self.children)

    async def stop(self, grace: float = 20.0) -> None:
        """SIGTERM in STOP_ORDER (one service kind at a time), SIGKILL after `grace`."""
        self._stopping = True
        rank = {name: i for i, name in enumerate(STOP_ORDER)}
        for service in sorted({c.service for c in self.children}, key=lambda s: rank.get(s, 99)):
            group = [
                c
                for c in self.children
                if c.service == service and c.process and c.process.returncode is None
            ]
            for child in group:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            for child in group:
                try:
                    await asyncio.wait_for(child.process.wait(), timeout=grace)  # type: ignore[union-attr]
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()  # type: ignore[union-attr]
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


BACKGROUND_NICE = 5


def host_ids(hosts: int) -> list[str]:
    """The ids of a system's `hosts` worker-hosts: `host-1`, `host-2`, …, or RUNNER_HOST_ID for
    a single one."""
    if hosts == 1 and os.environ.get("RUNNER_HOST_ID"):
        return [os.environ["RUNNER_HOST_ID"]]
    return [f"host-{n}" for n in range(1, hosts + 1)]


def system(supervisor: Supervisor, hosts: int = 1, replicas: int = 1,
           amqp_urls: Mapping[str, str] | None = None) -> None:
    """Add the five services to `supervisor`: `hosts` worker-hosts, `replicas` of the
    entitlement service, the scheduler and the monitor (one active, the others standing by),
    each with its broker login from `amqp_urls` (by `broker_logins.Login.key`). Those off the
    request path run at a lower CPU priority (`RUNNER_NICE`), so that a start is answered first."""
    background = supervisor.base_env.get("RUNNER_NICE") or str(BACKGROUND_NICE)
    root = data_dir_of(supervisor.base_env)
    keys = {} if {"RUNNER_SECRET_KEY", "RUNNER_SECRET_KEY_FILE"} & set(supervisor.base_env) else {
        "RUNNER_SECRET_KEY_FILE": str(root / "keys" / "secret.key")}

    def own(name: str) -> str:
        return str(root / name)

    def login(key: str) -> dict[str, str]:
        return {"RUNNER_AMQP_URL": amqp_urls[key]} if amqp_urls else {}

    for n in range(1, replicas + 1):
        suffix = "" if n == 1 else f"-{n}"
        supervisor.add("monitor", f"monitor{suffix}", RUNNER_NICE=background,
                       RUNNER_DATA_DIR=own("monitor"), **login("monitor"))
        supervisor.add("entitlement", f"entitlement{suffix}", RUNNER_DATA_DIR=own("entitlement"),
                       **login("entitlement"))
        supervisor.add("scheduler", f"scheduler{suffix}", RUNNER_NICE=background,
                       RUNNER_DATA_DIR=own("scheduler"), **login("scheduler"))
    uids = supervisor.base_env.get("RUNNER_WORKER_UIDS")
    for n, host_id in enumerate(host_ids(hosts), start=1):
        supervisor.add("worker-host", label=f"worker-host {host_id}", RUNNER_HOST_ID=host_id,
                       RUNNER_NICE=background, RUNNER_DATA_DIR=own(f"worker-host-{host_id}"),
                       **keys, **worker_uids(uids, n, hosts), **login(f"worker-host.{host_id}"))
    supervisor.add("gateway", RUNNER_DATA_DIR=own("gateway"), **keys, **login("gateway"))


def worker_uids(uids: str | None, n: int, hosts: int) -> dict[str, str]:
    """Host `n` of `hosts`' share of the worker uid range (hosts on one machine need their own):
    the default range, or the one set, cut in `hosts` equal parts."""
    from services.settings import Settings
    from services.worker_host.isolation import parse_uids

    whole = parse_uids(uids if uids is not None else Settings.model_fields["worker_uids"].default)
    if whole is None or hosts == 1:
        return {}
    size = len(whole) // hosts
    if size == 0:
        raise ValueError(f"RUNNER_WORKER_UIDS has fewer uids than the {hosts} worker-hosts")
    first = whole.start + (n - 1) * size
    return {"RUNNER_WORKER_UIDS": f"{first}-{first + size - 1}"}
