"""RUNNER_AMQP_URL naming several broker nodes: one URL each, sharing login, vhost and options;
a malformed list refused at start with what is wrong; one URL unchanged; the URL read from a
file (RUNNER_AMQP_URL_FILE) instead."""

from __future__ import annotations

import inspect
from pathlib import Path

import aio_pika
import pytest
from pydantic import ValidationError

from services.bus import FailoverConnection, broker_login
from services.settings import Settings, amqp_node_urls, node_addresses


def test_a_single_url_is_unchanged() -> None:
    for url in ("amqp://guest:guest@localhost:5672/", "amqps://u:p@broker.example:5671/runner",
                "amqp://u:p@h/v?heartbeat=5&name=a,b"):
        assert amqp_node_urls(url) == (url,)
        assert Settings(amqp_url=url).amqp_nodes == (url,)


def test_several_hosts_share_login_vhost_and_options() -> None:
    settings = Settings(amqp_url="amqps://runner:p%2Cw@r1:5671,r2:5672,[::1]/prod?heartbeat=5")
    assert settings.amqp_nodes == (
        "amqps://runner:p%2Cw@r1:5671/prod?heartbeat=5",
        "amqps://runner:p%2Cw@r2:5672/prod?heartbeat=5",
        "amqps://runner:p%2Cw@[::1]/prod?heartbeat=5",
    )
    assert settings.vhost == "prod"
    assert broker_login(settings.amqp_url) == "runner"


@pytest.mark.parametrize(("url", "says"), [
    ("amqp://u:p@h1:5672,/v", "is not a host[:port]"),
    ("amqp://u:p@h1:5672,h2:x/v", "is not a host[:port]"),
    ("amqp://u:p@h1:5672,h2:70000/v", "port out of range"),
    ("amqp://u:p@h1/v,amqp://u:p@h2/v", "not as several URLs"),
    ("http://h1,h2/", "must look like"),
    ("amqp://h1,h1/", "listed twice"),
])
def test_a_malformed_list_is_refused_with_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValidationError, match="amqp_url") as error:
        Settings(amqp_url=url)
    assert says in str(error.value)


def test_the_url_may_come_from_a_file_a_secret_mounted_per_host(tmp_path: Path) -> None:
    url_file = tmp_path / "worker-host-0"
    url_file.write_text("amqp://runner-worker-host.worker-host-0:pw@r1:5672,r2:5672/runner\n")
    settings = Settings(amqp_url="amqp://ignored/", amqp_url_file=url_file)
    assert settings.amqp_url == "amqp://runner-worker-host.worker-host-0:pw@r1:5672,r2:5672/runner"
    assert broker_login(settings.amqp_url) == "runner-worker-host.worker-host-0"
    with pytest.raises(ValidationError, match=r"RUNNER_AMQP_URL_FILE .*No such file"):
        Settings(amqp_url_file=tmp_path / "absent")
    # a URL given in code (an administrator's, a test system's) is the one used
    assert Settings(amqp_url="amqp://admin:pw@r1/runner", amqp_url_file=None).amqp_url == (
        "amqp://admin:pw@r1/runner")


def test_each_node_has_an_address_and_a_node_list_a_login_and_a_vhost() -> None:
    listed = "amqp://runner-gateway:pw@r1,r2:5673/runner"
    assert node_addresses(listed) == [("r1", 5672), ("r2", 5673)]
    assert node_addresses("amqps://u:p@broker/") == [("broker", 5671)]
    assert broker_login(listed) == "runner-gateway"
    assert Settings(amqp_url=listed).vhost == "runner"


def test_the_client_hook_the_failover_uses_is_there() -> None:
    """`FailoverConnection` moves to the next node in `_on_connection_close`, which aio-pika
    (pinned) calls when a connection closes and when an attempt to make one fails."""
    hook = aio_pika.RobustConnection._on_connection_close
    assert list(inspect.signature(hook).parameters) == ["self", "closing"]
    assert FailoverConnection._on_connection_close is not hook
