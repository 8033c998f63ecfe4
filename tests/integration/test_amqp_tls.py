"""amqps:// to a broker with a TLS listener: a private RabbitMQ node of its own (beside, never
touching, the machine's node on 5672) with the deployment's TLS listener (rabbitmq/tls.conf):
a certificate from a CA made here, and every client asked for one from the same CA. The bus
connects with `RUNNER_AMQP_CA_FILE` and its client certificate, and refuses a broker whose
certificate another CA signed."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest

from events import Envelope, HostLost
from services.bus import AmqpBus
from services.settings import Settings
from tests.tls_certs import Authority

pytestmark = pytest.mark.broker

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
TLS_CONF = Path(__file__).parents[2] / "rabbitmq" / "tls.conf"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class TlsBroker:
    port: int
    ca: Authority
    client_cert: Path
    client_key: Path

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "amqp_url": f"amqps://guest:guest@127.0.0.1:{self.port}/",
            "amqp_ca_file": self.ca.ca_file,
            "amqp_cert_file": self.client_cert,
            "amqp_key_file": self.client_key,
        }
        return Settings(**(values | overrides))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    if not (SERVER.exists() and CTL.exists()):
        pytest.skip(f"no RabbitMQ installed here ({SERVER})")
    base = tmp_path_factory.mktemp("tls-broker")
    port, dist_port = _free_port(), _free_port()
    node = f"tls{secrets.token_hex(4)}@localhost"
    ca = Authority(base / "pki")
    ca.issue("server", server_names=("127.0.0.1", "localhost"))  # server.pem, server.key
    client = ca.issue("client", client=True)
    home = base / "home"
    home.mkdir()
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16))
    cookie.chmod(0o400)
    # the deployment's own TLS listener (rabbitmq/tls.conf), its files here, on a free port,
    # and asking every client for a certificate
    shipped = TLS_CONF.read_text()
    assert "fail_if_no_peer_cert = false" in shipped and "= 5671" in shipped
    config = base / "rabbitmq.conf"
    config.write_text("listeners.tcp = none\n" + shipped
                      .replace("/etc/rabbitmq/tls/", f"{ca.directory}/")
                      .replace("= 5671", f"= {port}")
                      .replace("fail_if_no_peer_cert = false", "fail_if_no_peer_cert = true"))
    plugins = base / "enabled_plugins"
    plugins.write_text("[].\n")
    (base / "rabbitmq-env.conf").write_text("")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_PID_FILE": str(base / "node.pid"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
        "RABBITMQ_CONFIG_FILE": str(config),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    ctl = [str(CTL), "-n", node]  # always this node by its full name, never the default one
    subprocess.run([str(SERVER), "-detached"], env=env, check=True, timeout=60,
                   capture_output=True)
    try:
        subprocess.run([*ctl, "wait", "--timeout", str(int(START_TIMEOUT)),
                        env["RABBITMQ_PID_FILE"]], env=env, check=True,
                       timeout=START_TIMEOUT + 10, capture_output=True)
        subprocess.run([*ctl, "await_startup", "--timeout", str(int(START_TIMEOUT))], env=env,
                       check=True, timeout=START_TIMEOUT + 10, capture_output=True)
        _wait_listening(port)
        yield TlsBroker(port, ca, client.cert, client.key)
    except subprocess.CalledProcessError as exc:
        logs = "".join(p.read_text(errors="replace")[-3000:] for p in (base / "log").glob("*"))
        raise AssertionError(f"the TLS node did not start: {exc.stderr!r}\n{logs}") from exc
    finally:
        subprocess.run([*ctl, "stop", env["RABBITMQ_PID_FILE"]], env=env, timeout=60,
                       capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


async def test_the_bus_connects_over_amqps_with_the_ca_and_its_client_certificate(
    tls_broker: TlsBroker,
) -> None:
    bus = AmqpBus(tls_broker.settings(), "tls-test")
    await bus.start()
    try:
        assert bus.connected()
        # routed and confirmed over the TLS connection (an unroutable one would raise)
        await bus.publish(Envelope.wrap(HostLost(host_id="h-tls", silent_for=1.0),
                                        stream="host-h-tls"))
    finally:
        await bus.close()


async def test_a_broker_certificate_signed_by_another_ca_is_refused(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    other = Authority(tmp_path / "other", name="another CA")
    bus = AmqpBus(tls_broker.settings(amqp_ca_file=other.ca_file), "tls-test")
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError) as refused:
        await bus.start()
    assert "certificate verify failed" in str(refused.value).lower(), refused.value
    assert not bus.connected()
    await bus.close()


async def test_a_client_without_a_certificate_is_refused_by_a_broker_asking_for_one(
    tls_broker: TlsBroker,
) -> None:
    bus = AmqpBus(tls_broker.settings(amqp_cert_file=None, amqp_key_file=None), "tls-test")
    # TLS 1.3: the broker's alert, or the reset that follows it, whichever the client reads first
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError,
                       match=r"(?i)certificate required|connection reset"):
        await bus.start()
    assert not bus.connected()
    await bus.close()
