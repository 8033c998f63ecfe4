"""One settings object for every service, read from `RUNNER_*` environment variables."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

POSTGRES_NAME_MAX = 63  # PostgreSQL silently truncates longer database names


AMQP_URL_FORM = "amqp[s]://[login[:password]@]host[:port][,host[:port]…][/vhost][?options]"


def amqp_node_urls(amqp_url: str) -> tuple[str, ...]:
    """One URL per broker node that `amqp_url` names: it may list several hosts, comma-separated,
    sharing its login, vhost and options (`AMQP_URL_FORM`); a URL with one host is returned as
    it is. Raises ValueError for a malformed list."""
    if "," not in amqp_url:
        return (amqp_url,)
    match = re.fullmatch(r"(amqps?)://([^/?#]*)(.*)", amqp_url, re.DOTALL)
    if match is None:
        raise ValueError(f"a list of broker nodes must look like {AMQP_URL_FORM}")
    scheme, authority, rest = match.groups()
    login, at, hosts = authority.rpartition("@")
    if "://" in rest or "://" in hosts:
        raise ValueError("list the nodes as hosts of one URL, not as several URLs: "
                         "amqp://user:password@host1:5672,host2:5672/vhost")
    urls = []
    for host in hosts.split(","):
        if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?", host):
            raise ValueError(f"{host!r} is not a host[:port] (RUNNER_AMQP_URL: {AMQP_URL_FORM})")
        port = host.rpartition(":")[2] if not host.endswith("]") and ":" in host else None
        if port is not None and not 0 < int(port) < 65536:
            raise ValueError(f"{host!r}: port out of range")
        urls.append(f"{scheme}://{login}{at}{host}{rest}")
    if len(set(urls)) != len(urls):
        raise ValueError("a broker node is listed twice")
    return tuple(urls)


def node_addresses(amqp_url: str) -> list[tuple[str, int]]:
    """(host, port) of each node `amqp_url` names, AMQP's default port where none is given."""
    from yarl import URL

    nodes = [URL(node) for node in amqp_node_urls(amqp_url)]
    return [(url.host or "localhost", url.port or (5671 if url.scheme == "amqps" else 5672))
            for url in nodes]


def variable_name(prefix: str, name: str) -> str:
    """The environment variable `prefix` + `name` in capitals, each character but a letter or a
    digit as `_` (`worker-host-h.1` -> `WORKER_HOST_H_1`)."""
    return prefix + re.sub(r"[^A-Z0-9]", "_", name.upper())


def async_driver(url: str) -> str:
    """`postgresql://…` means the async driver here (asyncpg), not psycopg2."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+asyncpg://" + url.removeprefix(plain)
    return url


class Settings(BaseSettings):
    """Every tunable of the system. Times are in seconds so tests can shrink them."""

    model_config = SettingsConfigDict(env_prefix="RUNNER_", extra="ignore", frozen=True)

    amqp_url: str = Field(
        default="amqp://guest:guest@localhost:5672/",
        description="the broker; for a cluster, every node, comma-separated, as hosts of one "
        f"URL: {AMQP_URL_FORM} (each connection fails over between them)",
    )
    amqp_url_file: Path | None = Field(
        default=None,
        description="a file holding the broker URL, read at start instead of `amqp_url`: a "
        "secret mounted as files, one login per worker-host (deploy/kubernetes)",
    )
    amqp_ca_file: Path | None = Field(
        default=None,
        description="amqps:// only: the PEM file of the CA(s) the broker's certificate must be "
        "signed by [the system's roots]; the broker's name in the URL must match its certificate",
    )
    amqp_cert_file: Path | None = Field(
        default=None,
        description="amqps:// only: this client's PEM certificate, for a broker that asks for "
        "one (its key in it, or in `amqp_key_file`)",
    )
    amqp_key_file: Path | None = Field(
        default=None, description="amqps:// only: the PEM private key of `amqp_cert_file`")
    data_dir: Path = Path("./var")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL template; '{service}' is replaced by the service name "
        "(required: services share no tables). Default: one SQLite file per service in the data "
        "dir. PostgreSQL: postgresql+asyncpg://runner_{service}@host/runner_{service}, a "
        "database and a role each (`runner db setup` makes them).",
    )
    database_password: SecretStr | None = Field(
        default=None,
        description="the password of this service's database role, where `database_url` has "
        "none (compose gives each service its own)",
    )
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    admin_token: str | None = Field(
        default=None,
        description="the admin's bearer token, 32 characters at least [generated at first "
        "start into <data dir>/admin.token, 0600]",
    )
    http_max_body: int = Field(
        default=64 * 1024, ge=1024,
        description="bytes a request body may have; a larger one is refused (413) before it is "
        "read, from its Content-Length, or cut off there",
    )
    http_max_json_depth: int = Field(
        default=32, ge=4, le=512, description="how deep a JSON body may nest")
    http_max_json_items: int = Field(
        default=2000, ge=100, description="object keys and array items a JSON body may hold")
    rate_limit: float = Field(
        default=20.0, ge=0,
        description="requests a second a user's token may make on average, on each gateway "
        "(0: no limit; the admin token is not limited)",
    )
    rate_burst: int = Field(
        default=100, ge=1, description="requests a user's token may make at once, over the rate")
    token_cache_seconds: float = Field(
        default=0.5, ge=0, lt=1.0,
        description="seconds a gateway trusts a token it looked up, before it asks its store "
        "again: a revoked token is refused by every gateway within this",
    )
    secret_key: str | None = Field(
        default=None,
        description="Fernet key sealing credentials (gateway and worker-hosts only); several, "
        "comma-separated, newest first, while keys rotate. When unset: the key file.",
    )
    secret_key_file: Path | None = Field(
        default=None,
        description="file of Fernet keys, one per line, newest first (0600; generated with one "
        "key at first start) [<data dir>/secret.key]",
    )

    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 30.0
    host_heartbeat_interval: float = 5.0
    host_timeout: float = 30.0
    host_lease: float = 15.0
    max_restarts: int = 3
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    healthy_reset_after: float = 300.0
    circuit_failures: int = 3
    circuit_window: float = 600.0
    circuit_cooldown: float = 300.0
    spawn_concurrency: int = 1
    enable_chaos: bool = Field(
        default=False,
        description="offer and run the fault-drill strategies (`chaos`): for tests and drills, "
        "never for users",
    )
    spawn_mode: str = Field(
        default="fork", pattern="^(fork|exec|container)$",
        description="how a worker-host starts a worker: fork (from its fork-server), exec (a "
        "fresh interpreter) or container (through the Docker Engine API: docs/CONTAINERS.md)",
    )
    max_system_workers: int = 1000
    stop_grace: float = 10.0
    request_timeout: float = 15.0

    host_id: str | None = None
    host_capacity: int = 100
    broker_urls: dict[str, str] = Field(
        default_factory=dict,
        description="JSON object overriding an exchange's API base URL, by exchange id (or "
        'broker id), e.g. {"deribit": "http://127.0.0.1:9000"}: private gateways, the tests\' '
        "local exchange. Applied after a `-testnet` id's sandbox URLs",
    )

    # Worker isolation (docs/SECURITY.md)
    worker_uids: str = Field(
        default="60000-60999",
        description="uid range for workers, each under a uid (and gid) of its own while it runs, "
        "where the host can switch ids (root, or CAP_SETUID and CAP_SETGID); worker-hosts on one "
        "machine need ranges of their own; empty: workers run under the host's uid",
    )
    worker_address_space_mb: int = Field(
        default=4096, ge=0, description="a worker's address space limit in MiB (0: none)"
    )
    worker_open_files: int = Field(
        default=256, ge=0, description="a worker's open files (0: as inherited)"
    )
    worker_processes: int = Field(
        default=64, ge=0,
        description="processes and threads under a worker's uid (0: no limit; not applied "
        "where workers share the host's uid)",
    )
    worker_sandbox: bool = Field(
        default=True,
        description="Landlock, where the kernel has it: a worker writes only in its directory, "
        "connects only to `worker_tcp_ports`, signals nothing outside itself",
    )
    worker_tcp_ports: str = Field(
        default="443",
        description="TCP ports a sandboxed worker may connect to (comma-separated), besides the "
        "ports of RUNNER_BROKER_URLS",
    )

    # Container workers (RUNNER_SPAWN_MODE=container, docs/CONTAINERS.md)
    container_url: str = Field(
        default="",
        description="the Docker Engine API of the worker-host's machine (Docker or Podman), e.g. "
        "unix:///run/podman/podman.sock; empty: DOCKER_HOST, else /var/run/docker.sock",
    )
    container_image: str = Field(
        default="runner-worker:latest",
        description="the image a worker runs in when its strategy names none (`runner images "
        "build` builds it)",
    )
    container_images: list[str] = Field(
        default_factory=list,
        description="JSON list of the other images a strategy may name (`config.image`); any "
        "other is refused at the gateway",
    )
    container_memory_mb: int = Field(
        default=512, ge=0, description="a container worker's memory limit in MiB (0: none)")
    container_pids: int = Field(
        default=128, ge=0, description="processes and threads in a container worker (0: none)")
    container_cpus: float = Field(
        default=1.0, ge=0, description="CPUs a container worker may use (0: no limit)")
    container_network: str = Field(
        default="bridge",
        description="the network of container workers: bridge (the internet, not the host's "
        "loopback), none, host, or a network's name",
    )
    container_runtime: str = Field(
        default="", description="the engine's OCI runtime for workers, e.g. runc (empty: its "
        "default)")

    lease_poll: float = Field(
        default=0.25, gt=0,
        description="seconds between a standby replica's attempts to become the active one, and "
        "between the active one's checks that it still is (replicas on PostgreSQL: "
        "docs/OPERATIONS.md)",
    )
    lease_grace: float = Field(
        default=5.0, ge=0,
        description="seconds an active replica whose lease connection broke tries to take its "
        "lease again before it exits, a standby being free to take over",
    )

    handler_attempts: int = Field(
        default=5, description="deliveries before a failing message is dead-lettered"
    )
    prefetch: int = 200
    nice: int = Field(
        default=0, ge=0, le=19,
        description="added to the process's niceness at start, and inherited by the workers "
        "it spawns: a lower CPU priority for a service off the request path that shares its "
        "machine with the gateway and the entitlement service (`runner up` gives the monitor, "
        "the scheduler and the worker-hosts 5)",
    )
    ledger_retention: float = Field(
        default=7 * 24 * 3600.0, gt=0,
        description="seconds a service remembers a processed message's id, to skip a redelivered "
        "copy; a copy arriving later would be handled again. Redeliveries come when a consumer "
        "reconnects or a service restarts, so this must outlast the longest outage. The "
        "scheduler keeps an ended job as long, from its end",
    )
    ledger_prune_every: float = Field(
        default=600.0, gt=0,
        description="seconds between deletions of the ids (and ended jobs) older than "
        "`ledger_retention`",
    )
    snapshot_every: int = Field(
        default=100_000, ge=0,
        description="recorded events between the monitor's snapshots of its folded state (a "
        "restart folds only the log after the latest); 0: no snapshots, a restart replays all",
    )

    sse_buffer: int = Field(
        default=5000, ge=1,
        description="events an event stream (`GET /events`) may fall behind before it is cut "
        "(the client resumes from its last id); more than a page of the log (1000), which "
        "arrives at once",
    )
    sse_keepalive: float = Field(
        default=15.0, gt=0, description="seconds between keep-alive comments on an idle stream")
    sse_recent: int = Field(
        default=10_000, ge=0,
        description="recent log entries a gateway keeps in memory, so a stream resuming from "
        "one of them asks the monitor for nothing",
    )

    metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="port of a service's /metrics, /health/live and /health/ready (0: none; "
        "the gateway answers them on its API port anyway)",
    )
    metrics_host: str = Field(default="127.0.0.1", description="address of that port")
    log_format: str = Field(default="text", pattern="^(text|json)$",
                            description="text, or json: one JSON object per log line")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")

    @field_validator("host_id")
    @classmethod
    def _host_id_names_files(cls, host_id: str | None) -> str | None:
        from events.values import ID_PATTERN

        if host_id and not re.fullmatch(ID_PATTERN, host_id):
            # it names the host's store and data dir, and is an Id in every event
            raise ValueError("letters, digits, '.', '_' and '-' only, 100 at most, starting "
                             "with a letter or digit")
        return host_id

    @model_validator(mode="before")
    @classmethod
    def _amqp_url_from_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("amqp_url_file"):
            path = Path(data["amqp_url_file"])
            try:
                url = path.read_text().strip()
            except OSError as exc:
                raise ValueError(f"RUNNER_AMQP_URL_FILE ({path}): {exc.strerror}") from None
            data = {**data, "amqp_url": url}
        return data

    @field_validator("amqp_url")
    @classmethod
    def _amqp_nodes(cls, url: str) -> str:
        amqp_node_urls(url)  # raises for a malformed list of nodes
        return url

    @property
    def amqp_nodes(self) -> tuple[str, ...]:
        """The broker URL of each node `amqp_url` lists (one for a lone broker)."""
        return amqp_node_urls(self.amqp_url)

    @field_validator("database_url")
    @classmethod
    def _one_database_per_service(cls, url: str | None) -> str | None:
        if not url:
            return None
        if "{service}" not in url:
            # one shared database would mix the services' outbox, timers and ledgers
            raise ValueError("must contain '{service}' (each service keeps its own database)")
        return async_driver(url)

    @field_validator("database_password")
    @classmethod
    def _no_empty_password(cls, password: SecretStr | None) -> SecretStr | None:
        return password if password and password.get_secret_value() else None

    @model_validator(mode="after")
    def _tls_files_need_amqps(self) -> Settings:
        given = [name for name in ("amqp_ca_file", "amqp_cert_file", "amqp_key_file")
                 if getattr(self, name) is not None]
        if given and not self.amqp_url.startswith("amqps://"):
            # the files would be ignored and the login sent in clear: refuse instead
            raise ValueError(f"RUNNER_{given[0].upper()} is set but RUNNER_AMQP_URL is not "
                             "amqps://: use amqps://host:5671/… for TLS to the broker")
        if self.amqp_key_file is not None and self.amqp_cert_file is None:
            raise ValueError("RUNNER_AMQP_KEY_FILE needs RUNNER_AMQP_CERT_FILE")
        return self

    @field_validator("broker_urls")
    @classmethod
    def _http_urls(cls, urls: dict[str, str]) -> dict[str, str]:
        for name, url in urls.items():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{name}: {url!r} is not an http(s) URL")
        return urls

    @property
    def allowed_images(self) -> frozenset[str]:
        """The images a strategy may run in: the default worker image and the allow-list."""
        return frozenset((self.container_image, *self.container_images))

    @property
    def flatten_timeout(self) -> float:
        """Seconds a worker's flatten may take: a stopping worker is sent SIGKILL two stop
        graces after its Stop, and it must report before that."""
        return 1.5 * self.stop_grace

    def own(self, service: str) -> Settings:
        """These settings as `service` has them under `runner up`, which gives each service a
        data directory of its own beneath the data dir (`service` names it: "monitor",
        "gateway", "worker-host-<host id>"); unchanged where there is none (compose, a single
        service), so that a tool finds the monitor's log or the admin token either way."""
        own = self.data_dir / service
        return self.model_copy(update={"data_dir": own}) if own.is_dir() else self

    @property
    def lease_check_interval(self) -> float:
        """How often a worker-host checks its own lease."""
        return min(self.host_lease / 4, 1.0)

    @property
    def host_fenced_within(self) -> float:
        """How long after being declared lost a host has surely killed its workers: its lease
        (counted from its last confirmed heartbeat, which came before the declaration), one
        lease check, and a margin for a slow event loop."""
        return self.host_lease + self.lease_check_interval + 0.5

    @cached_property
    def vhost(self) -> str:
        from yarl import URL

        return URL(self.amqp_nodes[0]).path.lstrip("/") or "/"

    def database_for(self, service: str) -> str:
        """The URL of `service`'s database, with `database_password` in it where the template
        has none."""
        if self.database_url:
            url = self.database_url.replace("{service}", service)
            if url.startswith("postgresql"):
                from sqlalchemy.engine import make_url  # not imported by workers

                parsed = make_url(url)
                for what, name in (("database", parsed.database or ""),
                                   ("role", parsed.username or "")):
                    if len(name.encode()) > POSTGRES_NAME_MAX:
                        raise ValueError(
                            f"{what} name {name!r} is longer than PostgreSQL's "
                            f"{POSTGRES_NAME_MAX} bytes (use a shorter RUNNER_HOST_ID or URL)"
                        )
                if self.database_password is not None and parsed.password is None:
                    url = parsed.set(password=self.database_password.get_secret_value()
                                     ).render_as_string(hide_password=False)
            return url
        return f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"
