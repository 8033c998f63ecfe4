"""The HTTP API documents itself: the bearer scheme is declared (so `/docs` can authorize) and
every route's success answer has a schema."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from services.gateway.service import create_app
from services.settings import Settings

OPEN = {"/", "/health", "/health/live", "/health/ready", "/metrics"}


def spec() -> dict[str, Any]:
    gateway = SimpleNamespace(tail=SimpleNamespace(subscribers=0, position=0), strategies=set(),
                              settings=Settings())
    return create_app(gateway).openapi()  # type: ignore[arg-type]


def test_the_bearer_scheme_is_declared_and_required_off_the_open_paths() -> None:
    document = spec()
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert bool(operation.get("security")) == (path not in OPEN), (method, path)


def test_every_success_answer_has_a_schema() -> None:
    missing = []
    for path, operations in spec()["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if not status.startswith("2"):
                    continue
                content = response.get("content", {})
                json_schema = content.get("application/json", {}).get("schema")
                if not (json_schema or set(content) - {"application/json"}):
                    missing.append(f"{method.upper()} {path} {status}")
    assert not missing, missing


def test_errors_are_documented_as_failures() -> None:
    start = spec()["paths"]["/runner/start"]["post"]["responses"]
    assert start["403"]["content"]["application/json"]["schema"]["$ref"].endswith("/Rejected")
    assert start["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/Failure")


def test_every_503_says_when_to_try_again() -> None:
    unavailable = [(path, method, operation["responses"]["503"])
                   for path, operations in spec()["paths"].items()
                   for method, operation in operations.items()
                   if "503" in operation["responses"] and path not in OPEN]
    assert {path for path, _, _ in unavailable} >= {"/runner/start", "/runner/stop",
                                                    "/runner/status", "/admin/hosts"}
    assert all("Retry-After" in answer.get("headers", {}) for _, _, answer in unavailable)
