"""Before starting services: is the broker there? One clear message if not (where we looked,
how to start one), instead of a "Connection refused" from every service; and a local RabbitMQ
that is installed but stopped is started."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

from rich.console import Console

from services.settings import node_addresses

LOCAL = ("localhost", "127.0.0.1", "::1")


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_broker(amqp_url: str, console: Console, wait: float = 60.0) -> str | None:
    """None when the broker answers (after starting the local one if need be); else the message
    saying where we looked and how to start one."""
    addresses = node_addresses(amqp_url)
    if any(reachable(host, port) for host, port in addresses):
        return None
    host, port = addresses[0]
    where = (f"RabbitMQ is not answering at {', '.join(f'{h}:{p}' for h, p in addresses)} "
             "(RUNNER_AMQP_URL)")
    if len(addresses) > 1:  # a cluster is not ours to start
        return f"{where}. Start the cluster's nodes, or point RUNNER_AMQP_URL at running ones."
    server = shutil.which("rabbitmq-server")
    if host in LOCAL and server is not None:
        console.print(f"{where}: starting the local one (rabbitmq-server -detached)…")
        subprocess.run([server, "-detached"], capture_output=True, timeout=60, check=False)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if reachable(host, port):
                console.print("RabbitMQ is up.")
                return None
            time.sleep(0.5)
        return (f"{where}, and the local rabbitmq-server did not come up within {wait:.0f} s; "
                "see its log (/var/log/rabbitmq/) or `rabbitmqctl status`.")
    return (f"{where}. Start one: `sudo systemctl start rabbitmq-server` (Debian/Ubuntu: "
            "`apt-get install rabbitmq-server`), or `docker run -d -p 5672:5672 "
            "rabbitmq:3.13-management`; or point RUNNER_AMQP_URL at a running broker.")
