"""docker-compose.yml is hardened, service by service (no compose runs here, so its file is
read): no capabilities but the worker-hosts' few, no new privileges, a read-only root with a
tmpfs /tmp, memory and process limits, a non-root user, images pinned to a release; the
broker's shovel plugins off; each service its own database password, which `db-setup` gives
its role."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from yarl import URL

from services.database_roles import password_variable
from services.settings import Settings

ROOT = Path(__file__).parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _resolved(service: dict[str, Any]) -> dict[str, Any]:
    """A service with what it `extends` under it, as compose reads it (a key of its own wins)."""
    base = service.get("extends", {}).get("service")
    return service if base is None else _resolved(COMPOSE["services"][base]) | service


SERVICES: dict[str, dict[str, Any]] = {
    name: _resolved(service) for name, service in COMPOSE["services"].items()}
# what isolating workers under uids of their own takes (docs/SECURITY.md), and no more
WORKER_HOST_CAPABILITIES = {"SETUID", "SETGID", "CHOWN", "FOWNER", "DAC_OVERRIDE", "KILL"}
UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def default(value: Any) -> str:
    """A value as compose reads it with nothing set in .env: `${VAR:-default}` is its default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


def is_worker_host(service: dict[str, Any]) -> bool:
    return service.get("command") == ["service", "worker-host"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_container_is_confined(name: str) -> None:
    service = SERVICES[name]
    assert service.get("cap_drop") == ["ALL"], name
    assert "no-new-privileges:true" in service.get("security_opt", []), name
    assert service.get("read_only") is True, name
    assert any(t.split(":")[0] == "/tmp" for t in service.get("tmpfs", [])), name
    for escape in ("privileged", "pid", "ipc", "network_mode", "devices", "userns_mode"):
        assert escape not in service, (name, escape)
    for volume in service.get("volumes", []):
        assert "docker.sock" not in volume and not volume.startswith("/:"), (name, volume)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_container_has_memory_and_process_limits(name: str) -> None:
    service = SERVICES[name]
    memory = re.fullmatch(r"(\d+)([bkmg]?)", default(service.get("mem_limit", "")).lower())
    assert memory, (name, service.get("mem_limit"))
    assert 64 << 20 <= int(memory[1]) * UNITS[memory[2]] <= 64 << 30, name
    assert 16 <= int(default(service.get("pids_limit", 0))) <= 65536, name


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_only_the_worker_hosts_run_as_root_with_only_the_capabilities_isolation_takes(
    name: str,
) -> None:
    service = SERVICES[name]
    uid = str(service.get("user", "")).split(":")[0]
    if is_worker_host(service):
        assert uid == "0" and set(service["cap_add"]) == WORKER_HOST_CAPABILITIES, name
    else:
        assert uid.isdigit() and uid != "0", (name, service.get("user"))
        assert "cap_add" not in service, name


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_images_are_pinned_to_a_release(name: str) -> None:
    service = SERVICES[name]
    image = default(service["image"])
    if "build" in service:  # the project's own image, built from the Dockerfile
        return
    # a release has three numbers; PostgreSQL's have two since 10 (16.4)
    assert "@sha256:" in image or re.search(r":v?\d+\.\d+\.\d+", image) or re.fullmatch(
        r"postgres:\d+\.\d+(-\w+)?", image), (name, image)


def test_the_project_image_is_built_on_a_pinned_base_with_pinned_dependencies() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert base and re.search(r":\d+\.\d+\.\d+", base[1]), base
    assert "-c constraints.txt" in dockerfile


def test_the_shovel_plugins_are_off() -> None:
    plugins = (ROOT / "rabbitmq" / "enabled_plugins").read_text()
    assert "shovel" not in plugins


def test_each_service_has_its_own_database_password_and_db_setup_gives_its_role_that_one(
) -> None:
    """Replicas (the `replicas` profile) share the role and database of the service they are."""
    setup = SERVICES["db-setup"]["environment"]
    seen = set()
    for name, service in SERVICES.items():
        command = service.get("command", [])
        if command[:1] != ["service"]:
            continue
        env = service["environment"]
        store = command[1] if command[1] != "worker-host" else \
            f"worker-host-{env['RUNNER_HOST_ID']}"
        password = env["RUNNER_DATABASE_PASSWORD"]
        if base := COMPOSE["services"][name].get("extends", {}).get("service"):
            # a replica: its service's role and database
            assert password == SERVICES[base]["environment"]["RUNNER_DATABASE_PASSWORD"], name
            continue
        assert password not in seen, name  # no two services share one
        seen.add(password)
        assert setup[password_variable(store)] == password, name
        if is_worker_host(service):
            assert env["RUNNER_HOST_ID"] in SERVICES["db-setup"]["command"], name


def test_the_tls_override_adds_a_read_only_listener_to_the_broker_alone() -> None:
    override = yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())
    assert set(override["services"]) == {"rabbitmq"}
    broker = override["services"]["rabbitmq"]
    assert all(volume.endswith(":ro") for volume in broker["volumes"])
    assert [default(port) for port in broker["ports"]] == ["127.0.0.1:5671:5671"]
    conf = (ROOT / "rabbitmq" / "tls.conf").read_text()
    mounted = {volume.split(":")[1] for volume in broker["volumes"]}
    for path in re.findall(r"^ssl_options\.\w+ = (/\S+)$", conf, re.MULTILINE):
        assert any(path.startswith(m) for m in mounted), path


def test_the_cluster_profile_adds_two_nodes_that_join_the_first_and_every_service_lists_them(
) -> None:
    nodes = {name: service for name, service in SERVICES.items()
             if "rabbitmq" in default(service.get("image", ""))}
    assert set(nodes) == {"rabbitmq", "rabbitmq-2", "rabbitmq-3"}
    assert "profiles" not in nodes["rabbitmq"]
    for name in ("rabbitmq-2", "rabbitmq-3"):
        node = nodes[name]
        assert node["profiles"] == ["cluster"] and node["hostname"] == name
        assert "ports" not in node  # reached by the services on the compose network
        assert f"{name}-data:/var/lib/rabbitmq" in node["volumes"]
        assert "./rabbitmq/cluster.conf:/etc/rabbitmq/conf.d/30-cluster.conf:ro" in node["volumes"]
    cookies = {n["environment"]["RABBITMQ_ERLANG_COOKIE"] for n in nodes.values()}
    assert cookies == {"${RABBITMQ_ERLANG_COOKIE:-}"}  # one cookie for the three
    conf = (ROOT / "rabbitmq" / "cluster.conf").read_text()
    listed = re.findall(r"^cluster_formation\.classic_config\.nodes\.\d = rabbit@(\S+)$", conf,
                        re.MULTILINE)
    assert listed == [nodes[n]["hostname"] for n in ("rabbitmq", "rabbitmq-2", "rabbitmq-3")]

    three = "rabbitmq:5672,rabbitmq-2:5672,rabbitmq-3:5672"
    for name, service in SERVICES.items():
        url = service.get("environment", {}).get("RUNNER_AMQP_URL")
        if url is None:
            continue
        assert "@${RUNNER_AMQP_HOSTS:-rabbitmq:5672}/" in url, name
        with_three = re.sub(r"\$\{[A-Z0-9_]+:\?[^}]*\}", "pw",
                            url.replace("${RUNNER_AMQP_HOSTS:-rabbitmq:5672}", three))
        nodes_listed = Settings(amqp_url=default(with_three)).amqp_nodes
        assert [URL(n).host for n in nodes_listed] == ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]
