"""deploy/kubernetes/ validates against the Kubernetes schemas (strict: no unknown field), and
the worker-host's RBAC is the designed one: namespaced, Jobs, pods and Secrets only."""

from __future__ import annotations

from pathlib import Path

import pytest

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents() -> list[tuple[str, dict]]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (the dev extra)")
    kinds = set()
    for _, doc in documents():
        validate.validate(doc, "1.37.0", strict=True)  # raises ValidationError, naming the field
        kinds.add((doc["kind"], doc["metadata"]["name"]))
    for service in ("gateway", "entitlement", "scheduler", "monitor"):
        assert ("Deployment", service) in kinds
    assert ("StatefulSet", "worker-host") in kinds and ("Role", "runner-worker-host") in kinds


def test_the_worker_host_may_touch_its_jobs_pods_and_secrets_and_nothing_else() -> None:
    role = next(doc for _, doc in documents() if doc["kind"] == "Role")
    granted = {(group, resource) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    assert granted == {("batch", "jobs"), ("", "pods"), ("", "pods/log"), ("", "secrets")}
    assert not any(doc["kind"].startswith("Cluster") for _, doc in documents())
    secrets = next(rule for rule in role["rules"] if rule["resources"] == ["secrets"])
    assert "list" not in secrets["verbs"] and "watch" not in secrets["verbs"]  # by name only
