"""Shared fixtures: every broker test gets its own RabbitMQ vhost and its own data directory."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.cli.local import rabbitmqctl
from services.settings import Settings
from tests import rabbit_nodes
from tests.exchanges.deribit import LocalDeribit
from tests.rabbit_nodes import RabbitCluster

AMQP_HOST = "127.0.0.1"
AMQP_PORT = 5672

# Test runs side by side (pytest-xdist's processes, or two checkouts) each take worker uids of
# their own: a host sweeps everything left under a uid it gets back, another run's worker too.
os.environ.setdefault("RUNNER_WORKER_UIDS", f"{66000 + os.getpid() % 64 * 1000}-"
                                            f"{66999 + os.getpid() % 64 * 1000}")


def broker_reachable() -> bool:
    try:
        with socket.create_connection((AMQP_HOST, AMQP_PORT), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """Three private RabbitMQ nodes clustered beside the default one (tests/rabbit_nodes.py),
    shared by the session's tests and removed at its end; a test that kills a node restarts it."""
    if not rabbit_nodes.available():
        pytest.fail("rabbitmq-server is not installed (/usr/lib/rabbitmq/bin/rabbitmq-server)")
    with RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"), size=3) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(rabbit_cluster: RabbitCluster) -> Iterator[str]:
    """The private cluster's URL (every node) on a fresh vhost of the test's own, every node
    running."""
    for name in set(rabbit_cluster.names) - set(rabbit_cluster.running()):
        rabbit_cluster.restart(name)
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield rabbit_cluster.vhost_url(name)
    rabbit_cluster.delete_vhost(name)


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh, empty vhost (deleted afterwards), so tests never see each other's messages."""
    if not broker_reachable():
        pytest.fail(f"RabbitMQ is not reachable on {AMQP_HOST}:{AMQP_PORT} (.ci/run starts it)")
    name = f"test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    try:
        rabbitmqctl("delete_vhost", name)
    except RuntimeError:
        pass


@pytest.fixture
def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "var"
    path.mkdir()
    return path


@pytest.fixture
def settings(amqp_url: str, data_dir: Path) -> Settings:
    """Seed defaults shrunk so failure paths play out in seconds."""
    return Settings(
        amqp_url=amqp_url,
        data_dir=data_dir,
        heartbeat_interval=0.2,
        heartbeat_timeout=1.5,
        host_heartbeat_interval=0.2,
        host_timeout=1.5,
        host_lease=0.75,
        restart_backoff=0.1,
        restart_backoff_max=0.5,
        stop_grace=2.0,
        request_timeout=10.0,
        handler_attempts=3,
    )


@pytest.fixture(autouse=True)
async def no_leaked_tasks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test (but the end-to-end ones, which share one system per module) leaves no task of
    its own running: what it started it stopped, so it cannot disturb the tests after it."""
    before = set(asyncio.all_tasks())
    yield
    if request.node.get_closest_marker("asyncio") and "e2e" in request.node.nodeid:
        return
    ending = [t for t in asyncio.all_tasks() - before
              if not t.done() and t is not asyncio.current_task()]
    if ending:  # a library's own clean-up (a closed connection's) finishes by itself
        await asyncio.wait(ending, timeout=2.0)
    leaked = [t for t in ending if not t.done()]
    for task in leaked:
        task.cancel()
    assert not leaked, f"tasks left running: {sorted(t.get_name() for t in leaked)}"


@pytest_asyncio.fixture
async def deribit() -> AsyncIterator[LocalDeribit]:
    """A local Deribit (tests/exchanges/deribit.py) on a free port, for the real ccxt client."""
    exchange = LocalDeribit()
    await exchange.start()
    yield exchange
    await exchange.stop()
