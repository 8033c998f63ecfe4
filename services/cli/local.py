"""The whole system as local processes on a private vhost and data directory: what the demo,
the end-to-end tests and the benchmarks run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from rich.console import Console
from yarl import URL

from events import Envelope
from services.bus import broker_login
from services.cli.broker_logins import (
    can_make_vhosts,
    create_logins,
    declare_topology,
    delete_logins,
    login_urls,
    new_logins,
    rabbitmqctl,
)
from services.cli.client import GatewayClient, GatewayError
from services.cli.supervisor import Supervisor, host_ids, prepare_data_dir, system
from services.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSystem:
    """Five services (and `hosts` worker-hosts, `replicas` of each single-active service) under a
    supervisor, on a private vhost or on the broker at `amqp_url` as it is. With
    `own_broker_user`, as a deployment runs: an administrator for the vhost and a login per
    service and per host with only its own rights, their random passwords listed in
    `broker_passwords` so that a test can look for them where they must not be."""

    def __init__(
        self,
        data_dir: Path,
        *,
        hosts: int = 1,
        vhost: str | None = None,
        env: Mapping[str, str] | None = None,
        log: IO[str] | None = None,
        console: Console | None = None,
        quiet: bool = False,
        own_broker_user: bool = False,
        replicas: int = 1,
        amqp_url: str | None = None,
    ) -> None:
        base = Settings() if amqp_url is None else Settings(amqp_url=amqp_url, amqp_url_file=None)
        self.vhost = vhost or f"runner-{uuid.uuid4().hex[:10]}"
        self.own_vhost = amqp_url is None and can_make_vhosts(base.amqp_url)
        amqp = URL(base.amqp_nodes[0])
        self.broker_user: tuple[str, str] | None = None
        if own_broker_user and self.own_vhost:
            self.broker_user = (self.vhost, secrets.token_urlsafe(18))
            amqp = amqp.with_user(self.broker_user[0]).with_password(self.broker_user[1])
        self.amqp_url = str(amqp.with_path(f"/{self.vhost}")) if self.own_vhost else base.amqp_url
        self.logins = (new_logins(host_ids(hosts), namespace=self.vhost)
                       if self.broker_user is not None else [])
        self.broker_passwords = [
            *((self.broker_user[1],) if self.broker_user else ()),
            *(login.password for login in self.logins)]
        self.data_dir = data_dir
        self.admin_token = secrets.token_urlsafe(24)
        self.port = free_port()
        self.env = (
            dict(os.environ)
            | dict(env or {})
            | {
                "RUNNER_AMQP_URL": self.amqp_url,
                "RUNNER_DATA_DIR": str(data_dir.resolve()),
                "RUNNER_HTTP_PORT": str(self.port),
                "RUNNER_ADMIN_TOKEN": self.admin_token,
            }
        )
        self.supervisor = Supervisor(
            self.env,
            console=console or Console(file=log, width=200, stderr=log is None),
            quiet=(lambda line: " INFO " in line or " DEBUG " in line) if quiet else None,
        )
        system(self.supervisor, hosts=hosts, replicas=replicas,
               amqp_urls=login_urls(self.amqp_url, self.logins))
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin = GatewayClient(self.base_url, self.admin_token)
        self._clients = [self.admin]
        self._vhost_ready = False

    def create_vhost(self) -> None:
        """A fresh, empty vhost (an earlier one of the same name is deleted first)."""
        if self.own_vhost and not self._vhost_ready:
            user = broker_login(self.amqp_url) or "guest"
            with contextlib.suppress(RuntimeError):
                rabbitmqctl("delete_vhost", self.vhost)
            rabbitmqctl("add_vhost", self.vhost)
            if self.broker_user is not None:
                with contextlib.suppress(RuntimeError):
                    rabbitmqctl("delete_user", user)
                rabbitmqctl("add_user", user, stdin=self.broker_user[1])  # not in `ps`
            rabbitmqctl("set_permissions", "-p", self.vhost, user, ".*", ".*", ".*")
            create_logins(self.vhost, self.logins)
        self._vhost_ready = True

    async def start(self, timeout: float = 60.0) -> None:
        self.create_vhost()
        if self.logins:  # the services' own logins may not declare it
            await declare_topology(self.amqp_url)
        prepare_data_dir(self.data_dir)
        await self.supervisor.start()
        for _ in range(int(timeout * 10)):
            try:
                await self.admin.call("GET", "/health")
                return
            except GatewayError:
                if not self.supervisor.alive():
                    raise RuntimeError("a service exited during start-up (see its log)") from None
                await asyncio.sleep(0.1)
        raise RuntimeError("the gateway did not come up in time")

    async def stop(self, *, keep_vhost: bool = False) -> None:
        for client in self._clients:
            await client.close()
        await self.supervisor.stop(grace=15)
        if self.own_vhost and not keep_vhost:
            with contextlib.suppress(RuntimeError):
                rabbitmqctl("delete_vhost", self.vhost)
        if self.broker_user is not None:
            with contextlib.suppress(RuntimeError):
                rabbitmqctl("delete_user", self.broker_user[0])
        delete_logins(self.logins)

    async def user(
        self, name: str | None = None, tier: str | None = None, days: float = 30
    ) -> tuple[str, GatewayClient]:
        """A new user (optionally upgraded) and a client holding its token."""
        name = name or f"u-{uuid.uuid4().hex[:8]}"
        client = GatewayClient(self.base_url, await self.admin.add_user(name))
        self._clients.append(client)
        if tier is not None:
            await self.admin.upgrade(name, tier, days)
        return name, client

    async def log(self) -> list[Envelope]:
        """Every envelope the monitor has recorded so far, in log order."""
        from services.monitor.log import EventLog

        event_log = EventLog.at(
            Settings(data_dir=self.data_dir).own("monitor").database_for("monitor"),
            must_exist=True,
        )
        try:
            return [e async for _, e in event_log.read()]
        finally:
            await event_log.close()
