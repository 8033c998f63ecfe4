"""`runner up`: each service gets only the environment it needs and a data directory of its own;
a data dir from before is moved into that layout."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from services.cli.supervisor import (
    Supervisor,
    prepare_data_dir,
    service_environment,
    system,
    worker_uids,
)
from services.settings import Settings

CALLER = {
    "PATH": "/usr/bin",
    "LANG": "C.UTF-8",
    "PYTHONPATH": "/plugins",
    "HTTPS_PROXY": "http://proxy:3128",
    "AWS_SECRET_ACCESS_KEY": "the caller's",
    "RUNNER_AMQP_URL": "amqp://runner:pw@broker/",
    "RUNNER_HEARTBEAT_INTERVAL": "5",
    "RUNNER_SECRET_KEY": "the sealing key",
    "RUNNER_ADMIN_TOKEN": "the admin token",
    "RUNNER_TOKEN": "a user's token",
    "RUNNER_API_SECRET": "a user's exchange secret",
    "RUNNER_DATABASE_ADMIN_URL": "postgresql://postgres:admin@db/postgres",
    "RUNNER_DATABASE_PASSWORD_GATEWAY": "the gateway role's, for `runner db setup`",
}


@pytest.mark.parametrize(
    ("service", "secrets"),
    [
        ("gateway", {"RUNNER_SECRET_KEY", "RUNNER_ADMIN_TOKEN"}),
        ("worker-host", {"RUNNER_SECRET_KEY"}),
        ("scheduler", set()),
        ("entitlement", set()),
        ("monitor", set()),
    ],
)
def test_a_service_gets_its_settings_and_only_its_own_secrets(
    service: str, secrets: set[str]
) -> None:
    common = {"PATH", "LANG", "PYTHONPATH", "HTTPS_PROXY", "RUNNER_AMQP_URL",
              "RUNNER_HEARTBEAT_INTERVAL"}
    assert set(service_environment(CALLER, service)) == common | secrets


def test_runner_up_gives_each_service_its_own_data_dir_and_the_key_file_to_two(
    tmp_path: Path,
) -> None:
    supervisor = Supervisor({"PATH": "/usr/bin", "RUNNER_DATA_DIR": str(tmp_path),
                             "RUNNER_ADMIN_TOKEN": "t"})
    system(supervisor, hosts=2)
    envs = {child.label: child.env for child in supervisor.children}
    assert {label: env["RUNNER_DATA_DIR"] for label, env in envs.items()} == {
        "monitor": str(tmp_path / "monitor"),
        "entitlement": str(tmp_path / "entitlement"),
        "scheduler": str(tmp_path / "scheduler"),
        "worker-host host-1": str(tmp_path / "worker-host-host-1"),
        "worker-host host-2": str(tmp_path / "worker-host-host-2"),
        "gateway": str(tmp_path / "gateway"),
    }
    keyed = {label for label, env in envs.items() if "RUNNER_SECRET_KEY_FILE" in env}
    assert keyed == {"worker-host host-1", "worker-host host-2", "gateway"}
    assert {label for label, env in envs.items() if "RUNNER_ADMIN_TOKEN" in env} == {"gateway"}
    assert envs["worker-host host-1"]["RUNNER_WORKER_UIDS"] == "60000-60499"
    assert envs["worker-host host-2"]["RUNNER_WORKER_UIDS"] == "60500-60999"


def test_hosts_on_one_machine_share_the_uid_range_out() -> None:
    assert worker_uids(None, 1, 1) == {}
    assert worker_uids("61000-61009", 3, 3) == {"RUNNER_WORKER_UIDS": "61006-61008"}
    assert worker_uids("", 1, 2) == {}
    with pytest.raises(ValueError, match="fewer uids"):
        worker_uids("61000-61001", 1, 3)


def test_a_data_dir_laid_out_before_is_moved_into_each_services_own(tmp_path: Path) -> None:
    root = tmp_path / "var"
    root.mkdir()
    for name in ("monitor.db", "monitor.db-wal", "gateway.db", "worker-host-host-1.db",
                 "admin.token", "secret.key"):
        (root / name).write_text(name)
    workers = root / "worker-host-host-1"  # the host's workers, before it had a directory
    workers.mkdir()
    (workers / "w-1.state.json").write_text("{}")

    prepare_data_dir(root)
    prepare_data_dir(root)  # and again: nothing more moves

    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["gateway/admin.token", "gateway/gateway.db", "keys/secret.key",
                     "monitor/monitor.db", "monitor/monitor.db-wal",
                     "worker-host-host-1/worker-host-host-1.db",
                     "worker-host-host-1/worker-host-host-1/w-1.state.json"]
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    settings = Settings(data_dir=root)
    assert settings.own("monitor").database_for("monitor").endswith("/var/monitor/monitor.db")
    assert settings.own("nowhere").data_dir == root
