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


def test_the_stateful_services_run_as_two_replicas_on_postgresql_on_different_nodes() -> None:
    docs = documents()
    stores = next(doc for _, doc in docs if doc["kind"] == "ConfigMap"
                  and doc["metadata"]["name"] == "runner-stores")
    assert stores["data"]["RUNNER_DATABASE_URL"].startswith("postgresql")
    assert "{service}" in stores["data"]["RUNNER_DATABASE_URL"]  # a role and database each
    for service in ("entitlement", "scheduler", "monitor"):
        deployment = next(doc for _, doc in docs if doc["kind"] == "Deployment"
                          and doc["metadata"]["name"] == service)
        spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
        assert spec["replicas"] == 2
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        container = pod["containers"][0]
        assert {"configMapRef": {"name": "runner-stores"}} in container["envFrom"]
        password = next(e for e in container["env"] if e["name"] == "RUNNER_DATABASE_PASSWORD")
        assert password["valueFrom"]["secretKeyRef"]["key"] == f"postgres-{service}"
        # no volume claim: a ReadWriteOnce claim would tie both replicas to one node
        assert not any("persistentVolumeClaim" in volume for volume in pod["volumes"])
        spread = pod["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
        budget = next(doc for _, doc in docs if doc["kind"] == "PodDisruptionBudget"
                      and doc["metadata"]["name"] == service)
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["selector"] == spec["selector"]
    assert not any(doc["kind"] == "PersistentVolumeClaim" for _, doc in docs)


def test_two_gateways_serve_on_postgresql_on_different_nodes() -> None:
    docs = documents()
    gateway = next(doc for _, doc in docs if doc["kind"] == "Deployment"
                   and doc["metadata"]["name"] == "gateway")
    spec, pod = gateway["spec"], gateway["spec"]["template"]["spec"]
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    container = pod["containers"][0]
    assert {"configMapRef": {"name": "runner-stores"}} in container["envFrom"]
    assert not any("persistentVolumeClaim" in volume for volume in pod["volumes"])
    assert pod["affinity"]["podAntiAffinity"]
    assert any(doc["kind"] == "PodDisruptionBudget" and doc["metadata"]["name"] == "gateway"
               for _, doc in docs)


def test_each_worker_host_pod_reads_a_broker_login_of_its_own() -> None:
    """A login per host (runner-worker-host.<id>): the pod's name is its host id, and its URL is
    the file of that name in the mounted secret."""
    host = next(doc for _, doc in documents() if doc["kind"] == "StatefulSet")
    pod = host["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["RUNNER_HOST_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "RUNNER_AMQP_URL" not in env
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "amqp")
    assert env["RUNNER_AMQP_URL_FILE"]["value"] == mount["mountPath"] + "/$(RUNNER_HOST_ID)"
    volume = next(v for v in pod["volumes"] if v["name"] == "amqp")
    assert volume["secret"]["secretName"] == "runner-worker-host-amqp"
