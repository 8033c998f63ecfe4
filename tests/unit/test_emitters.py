"""The table of who may emit what (`topology.EMITTERS`) covers the catalogue and agrees with the
messages each service's code constructs."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from events import (
    REGISTRY,
    HostLost,
    HostOnline,
    JobAccepted,
    WorkerCrashed,
    WorkerSpawned,
    WorkerStopped,
)
from services.topology import (
    EMITTERS,
    SERVICES,
    Publisher,
    forged,
    host_user,
    permission_table,
    publisher,
    service_user,
)

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"
# A worker's messages travel on its host's connection; the CLI's `runner publish` is an operator.
PUBLISHED_BY = {"gateway": "gateway", "entitlement": "entitlement", "scheduler": "scheduler",
                "monitor": "monitor", "worker_host": "worker-host", "worker": "worker-host"}


def constructed() -> dict[str, set[str]]:
    """Message type -> the services whose code calls its constructor (`X(...)`, or
    `(X if c else Y)(...)`); matching on a type (`case X():`) is no call."""
    found: dict[str, set[str]] = defaultdict(set)
    for package, service in PUBLISHED_BY.items():
        for path in (SERVICES_DIR / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    for name in ast.walk(node.func):
                        if isinstance(name, ast.Name) and name.id in REGISTRY:
                            found[name.id].add(service)
    return found


def test_every_catalogue_message_has_its_emitters() -> None:
    assert set(EMITTERS) == set(REGISTRY)
    for type_name, services in EMITTERS.items():
        assert services, type_name
        assert services <= set(SERVICES), type_name


def test_the_table_is_what_the_services_emit() -> None:
    assert constructed() == {name: set(services) for name, services in EMITTERS.items()}


def test_shared_code_constructs_no_message() -> None:
    """Messages built outside a service's package would escape the check above."""
    for path in SERVICES_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in REGISTRY, f"{path.name}:{node.lineno}"


ACCEPTED = JobAccepted(job_id="j", worker_id="w", tier="pro", max_workers=3, in_use=1)


def test_a_service_login_may_publish_only_its_own_types() -> None:
    assert forged(service_user("entitlement"), ACCEPTED) is None
    assert forged(service_user("monitor"), HostLost(host_id="h1", silent_for=9.0)) is None
    assert forged(host_user("h1"), ACCEPTED) == (
        "published by runner-worker-host.h1, which may not emit JobAccepted")
    assert forged(service_user("gateway"), HostLost(host_id="h1", silent_for=9.0)) == (
        "published by runner-gateway, which may not emit HostLost")


def test_a_hosts_login_may_name_only_its_own_host() -> None:
    spawned = WorkerSpawned(job_id="j", worker_id="w", host_id="h1", pid=7)
    assert forged(host_user("h1"), spawned) is None
    assert forged(host_user("h1"), HostOnline(host_id="h1", capacity=1, hostname="x", pid=1)
                  ) is None
    assert forged(host_user("h2"), spawned) == (
        "published by runner-worker-host.h2, which may not emit a WorkerSpawned of host h1")
    assert forged(host_user("h2"), HostLost(host_id="h1", silent_for=0.0)) == (
        "published by runner-worker-host.h2, which may not emit a HostLost of host h1")
    crashed = WorkerCrashed(job_id="j", worker_id="w", host_id=None, reason="host_lost")
    assert forged(host_user("h1"), crashed) == (
        "published by runner-worker-host.h1, which may not emit a WorkerCrashed of no host")
    # a type that names no host is the host's to emit; the monitor names any host
    assert forged(host_user("h1"), WorkerStopped(job_id="j", worker_id="w", reason="r")) is None
    assert forged(service_user("monitor"), HostLost(host_id="h2", silent_for=9.0)) is None


def test_logins_are_read_as_their_service_and_host() -> None:
    assert publisher(host_user("h-1.a")) == Publisher("worker-host", "h-1.a")
    assert publisher(service_user("scheduler")) == Publisher("scheduler")
    # a login of one system among several on a broker (users are global to it)
    assert publisher(host_user("h1", "test-1")) == Publisher("worker-host", "h1")
    assert host_user("h1", "test-1") == "runner-worker-host.h1@test-1"
    assert publisher(service_user("gateway", "test-1")) == Publisher("gateway")
    for user in ("runner-scheduler.h1", "runner-worker-host.", "runner-worker-host.-x"):
        assert publisher(user) is None, user


def test_other_logins_are_not_checked() -> None:
    """The shared login of a development system, an operator's, or none at all."""
    for user in (None, "", "guest", "admin", "runner-nobody", "runner-"):
        assert publisher(user) is None
        assert forged(user, ACCEPTED) is None


def test_the_security_doc_holds_the_permission_table() -> None:
    doc = (SERVICES_DIR.parent / "docs" / "SECURITY.md").read_text()
    held = doc.split("<!-- bus-permissions -->\n")[1].split("\n<!-- /bus-permissions -->")[0]
    assert held == permission_table(), (
        "docs/SECURITY.md §8: paste `topology.permission_table()` between its markers")
