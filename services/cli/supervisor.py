"""`runner up`: every service as its own process, supervised, logs prefixed by service."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

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
        child = Child(label or service, service, self.base_env | env)
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


def system(supervisor: Supervisor, hosts: int = 1) -> None:
    """Add the five services (with `hosts` worker-hosts) to `supervisor`. Those off the request
    path (monitor, scheduler, worker-hosts and so their workers) run at a lower CPU priority
    (`RUNNER_NICE`, 5 unless set), so that on a shared machine a start is answered first and
    carried out in the time left. At 50 starts/s the POST's p50 was 21–38 ms against 31–96 ms at
    nice 0, four runs each; a burst of starts got about 10 % slower (bench/RESULTS.md)."""
    background = supervisor.base_env.get("RUNNER_NICE") or str(BACKGROUND_NICE)
    supervisor.add("monitor", RUNNER_NICE=background)
    supervisor.add("entitlement")
    supervisor.add("scheduler", RUNNER_NICE=background)
    for n in range(1, hosts + 1):
        host_id = os.environ.get("RUNNER_HOST_ID") if hosts == 1 else None
        host_id = host_id or f"host-{n}"
        supervisor.add("worker-host", label=f"worker-host {host_id}", RUNNER_HOST_ID=host_id,
                       RUNNER_NICE=background)
    supervisor.add("gateway")
