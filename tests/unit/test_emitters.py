"""The table of who may emit what (`topology.EMITTERS`) covers the catalogue and agrees with the
messages each service's code constructs."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from events import REGISTRY
from services.topology import (
    EMITTERS,
    SERVICES,
    forged,
    permission_table,
    publisher_service,
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


def test_a_service_login_may_publish_only_its_own_types() -> None:
    assert forged(service_user("entitlement"), "JobAccepted") is None
    assert forged(service_user("monitor"), "HostLost") is None
    assert forged(service_user("worker-host"), "JobAccepted") == (
        "published by runner-worker-host, which may not emit JobAccepted")
    assert forged(service_user("gateway"), "HostLost") == (
        "published by runner-gateway, which may not emit HostLost")


def test_other_logins_are_not_checked() -> None:
    """The shared login of a development system, an operator's, or none at all."""
    for user in (None, "", "guest", "admin", "runner-nobody", "runner-"):
        assert publisher_service(user) is None
        assert forged(user, "JobAccepted") is None


def test_the_security_doc_holds_the_permission_table() -> None:
    doc = (SERVICES_DIR.parent / "docs" / "SECURITY.md").read_text()
    held = doc.split("<!-- bus-permissions -->\n")[1].split("\n<!-- /bus-permissions -->")[0]
    assert held == permission_table(), (
        "docs/SECURITY.md §8: paste `topology.permission_table()` between its markers")
