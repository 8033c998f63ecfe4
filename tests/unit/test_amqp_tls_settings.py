"""TLS to the broker from settings: amqps:// gets a verifying context built from
`RUNNER_AMQP_CA_FILE` (and a client certificate where one is set); TLS files with amqp://, or a
file that cannot be read, are refused with a message naming the variable."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.bus import amqp_ssl_context
from services.settings import Settings
from tests.tls_certs import Authority

AMQPS = "amqps://runner:pw@broker.example:5671/runner"


def test_amqp_needs_no_context() -> None:
    assert amqp_ssl_context(Settings(amqp_url="amqp://guest:guest@localhost:5672/")) is None


def test_amqps_verifies_the_broker_and_its_name_against_the_ca(tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    context = amqp_ssl_context(Settings(amqp_url=AMQPS, amqp_ca_file=ca.ca_file))
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    subjects = [dict(x[0] for x in c["subject"]) for c in context.get_ca_certs()]
    assert subjects == [{"commonName": "runner test CA"}]  # that CA alone, not the system's


def test_amqps_without_a_ca_file_trusts_the_systems_roots() -> None:
    context = amqp_ssl_context(Settings(amqp_url=AMQPS))
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED


def test_a_client_certificate_is_loaded_with_its_key(tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    client = ca.issue("client", client=True)
    settings = Settings(amqp_url=AMQPS, amqp_ca_file=ca.ca_file, amqp_cert_file=client.cert,
                        amqp_key_file=client.key)
    assert amqp_ssl_context(settings) is not None
    other = ca.issue("other", client=True)
    mismatched = settings.model_copy(update={"amqp_key_file": other.key})
    with pytest.raises(OSError, match="RUNNER_AMQP_CERT_FILE"):
        amqp_ssl_context(mismatched)


def test_a_missing_or_unreadable_ca_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"RUNNER_AMQP_CA_FILE \(.*nowhere.pem\): No such file"):
        amqp_ssl_context(Settings(amqp_url=AMQPS, amqp_ca_file=tmp_path / "nowhere.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(OSError, match="RUNNER_AMQP_CA_FILE"):
        amqp_ssl_context(Settings(amqp_url=AMQPS, amqp_ca_file=garbage))


@pytest.mark.parametrize("variable", ["amqp_ca_file", "amqp_cert_file"])
def test_tls_files_with_a_plain_amqp_url_are_refused(variable: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=f"RUNNER_{variable.upper()} is set but"):
        Settings(amqp_url="amqp://runner:pw@broker:5672/", **{variable: tmp_path / "x.pem"})


def test_a_key_without_its_certificate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="RUNNER_AMQP_KEY_FILE needs"):
        Settings(amqp_url=AMQPS, amqp_key_file=tmp_path / "client.key")
