"""Broker logins of a system on one vhost: the shared topology declared once by a privileged
login (`runner bus setup`), and a login per service and per worker-host with only the rights
`services.topology` gives it, made with rabbitmqctl on the broker's own machine (`runner up`
given an administrator's login, and the end-to-end tests). A deployment renders them into the
broker's definitions instead (rabbitmq/render_definitions.py)."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from yarl import URL

from services.bus import AmqpBus
from services.settings import Settings, amqp_node_urls
from services.topology import (
    HOST_SERVICE,
    SERVICES,
    host_user,
    permissions,
    service_user,
    topic_permissions,
)


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60,
                            input=stdin)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def can_make_vhosts(amqp_url: str) -> bool:
    """Whether this machine runs the broker (so we may create a private vhost, and users): a
    lone local node (rabbitmqctl addresses the default one)."""
    nodes = amqp_node_urls(amqp_url)
    return (
        len(nodes) == 1 and URL(nodes[0]).host in ("localhost", "127.0.0.1")
        and shutil.which("rabbitmqctl") is not None
    )


@dataclass(frozen=True)
class Login:
    """One service's (or one worker-host's) broker login."""

    service: str
    password: str
    host_id: str | None = None
    namespace: str | None = None  # see `topology.service_user`

    @property
    def key(self) -> str:
        """How `supervisor.system` names its process: the service, or `worker-host.<id>`."""
        return self.service if self.host_id is None else f"{HOST_SERVICE}.{self.host_id}"

    @property
    def user(self) -> str:
        if self.host_id is not None:
            return host_user(self.host_id, self.namespace)
        return service_user(self.service, self.namespace)

    def url(self, amqp_url: str) -> str:
        """`amqp_url` (its host, port, vhost and options) with this login."""
        return str(URL(amqp_url).with_user(self.user).with_password(self.password))


def new_logins(host_ids: Iterable[str], namespace: str | None = None) -> list[Login]:
    """A login with a random password for each service and each of `host_ids`."""
    logins = [Login(s, secrets.token_urlsafe(18), namespace=namespace)
              for s in SERVICES if s != HOST_SERVICE]
    return logins + [Login(HOST_SERVICE, secrets.token_urlsafe(18), h, namespace)
                     for h in host_ids]


def login_urls(amqp_url: str, logins: Iterable[Login]) -> dict[str, str]:
    """Each login's broker URL, by its key (`supervisor.system`'s `amqp_urls`)."""
    return {login.key: login.url(amqp_url) for login in logins}


def create_logins(vhost: str, logins: Sequence[Login]) -> None:
    """Make `logins` on the local broker (an earlier user of the same name is replaced), with
    their permissions and topic permissions on `vhost`; passwords go through stdin, never
    `ps`."""
    for login in logins:
        with contextlib.suppress(RuntimeError):
            rabbitmqctl("delete_user", login.user)
        rabbitmqctl("add_user", login.user, stdin=login.password)
        granted = permissions(login.service, login.host_id)
        rabbitmqctl("set_permissions", "-p", vhost, login.user, granted.configure,
                    granted.write, granted.read)
        for topic in topic_permissions(login.service, login.host_id):
            rabbitmqctl("set_topic_permissions", "-p", vhost, login.user, topic.exchange,
                        topic.write, topic.read)


def delete_logins(logins: Sequence[Login]) -> None:
    for login in logins:
        with contextlib.suppress(RuntimeError):
            rabbitmqctl("delete_user", login.user)


async def declare_topology(amqp_url: str) -> None:
    """Declare the exchanges, the static queues and their bindings with `amqp_url`'s login,
    which must be allowed to (not a service's own)."""
    bus = AmqpBus(Settings(amqp_url=amqp_url, amqp_url_file=None), "setup")
    if not bus.declares_topology:
        raise ValueError(f"{bus.login} is a service's own login, which may not declare the "
                         "topology: give an administrator's")
    await bus.start()
    await bus.close()
