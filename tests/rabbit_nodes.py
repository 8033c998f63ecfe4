"""Private RabbitMQ nodes beside the default one (never touching it): one node, or a cluster of
three, each with its own name, ports, directories and Erlang cookie under a directory of ours;
killed (`kill -9`), restarted (it rejoins), its app stopped and started (a whole-broker
outage), and removed with everything it wrote. For test fixtures and for `bench/`.

    cluster = RabbitCluster(tmp_path, size=3)
    cluster.start()                 # boots and joins the three nodes
    cluster.url                     # amqp://guest:guest@127.0.0.1:p1,127.0.0.1:p2,…/
    cluster.kill(cluster.names[0])  # kill -9
    cluster.restart(cluster.names[0])
    cluster.close()

The recipe (environment, `rabbitmq-server -detached` without the /usr/sbin wrapper that
switches to the rabbitmq user and its cookie) is the one in the shared field notes; it needs
the rabbitmq-server package (Debian's 3.10.8 here) and runs as root or as any user.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
START_TIMEOUT = 60.0  # seconds a node may take to boot


def available() -> bool:
    """Whether this machine can run private nodes (the rabbitmq-server package is installed)."""
    return os.access(SERVER, os.X_OK) and os.access(CTL, os.X_OK)


def _free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (all bound at once, so never the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class RabbitNode:
    """One private node: `name` (e.g. `rt3f2a1@localhost`), its AMQP `port`, its `url`. Alone
    (`RabbitNode(tmp_path).start()` … `close()`), a broker of its own; in a `RabbitCluster`, a
    member."""

    def __init__(self, root: Path, name: str | None = None, cookie: str | None = None) -> None:
        self.root = root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.name = name or f"rt{secrets.token_hex(3)}@localhost"
        self.port, self.dist_port = _free_ports(2)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._cookie = cookie or secrets.token_hex(16)
        self.pid_file = root / "node.pid"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(root / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    # ---------------------------------------------------------------- control

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n <this node> …` with this node's cookie; its output, raising
        RuntimeError when it fails."""
        result = subprocess.run([CTL, "-n", self.name, *args], env=self.env, cwd=self.root,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.name} {' '.join(args)} failed: "
                               f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result.stdout

    def boot(self) -> None:
        """Start the node's VM, detached; `wait` for it to serve."""
        home = self.root / "home"
        for directory in (home, self.root / "mnesia", self.root / "log"):
            directory.mkdir(parents=True, exist_ok=True)
        cookie_file = home / ".erlang.cookie"
        if not cookie_file.exists():
            cookie_file.write_text(self._cookie)
            cookie_file.chmod(0o400)
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq.conf").write_text("loopback_users = none\n")
        self.pid_file.unlink(missing_ok=True)
        subprocess.run([SERVER, "-detached"], env=self.env, cwd=self.root, capture_output=True,
                       timeout=60, check=True)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Boot the node (and its app) and wait until it serves."""
        self.boot()
        self.wait(timeout)

    def wait(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the node's app has started."""
        deadline = time.monotonic() + timeout
        while not self.pid_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} wrote no pid file; see {self.root / 'log'}")
            time.sleep(0.05)
        while True:
            try:
                self.ctl("wait", "--timeout", str(int(timeout)), str(self.pid_file),
                         timeout=timeout + 10)
                break
            except RuntimeError as exc:
                # asked before the VM has begun starting the app, `wait` says so at once
                if ("rabbit_is_not_running" not in str(exc) or not self.running()
                        or time.monotonic() > deadline):
                    raise
                time.sleep(0.2)
        self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)

    @property
    def pid(self) -> int | None:
        """The node's OS process id, while it runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._alive(pid) else None

    def running(self) -> bool:
        return self.pid is not None

    def kill(self) -> None:
        """`kill -9` the node (its Erlang VM), and wait until it is gone."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} (pid {pid}) still runs 10 s after kill -9")
            time.sleep(0.02)

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a killed child of ours stays a zombie until reaped; it serves nothing
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                return False
        return True

    def stop_app(self) -> None:
        """Stop the broker application (connections dropped, the node stays): an outage."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """Start the broker application again after `stop_app`."""
        self.ctl("start_app")
        self.ctl("await_startup")

    def close(self) -> None:
        """Kill the node and delete its directory."""
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class RabbitCluster:
    """`size` private nodes (1: a lone broker; 3: a cluster joined to the first), all under
    `root`. `url` lists every node (RUNNER_AMQP_URL's several-hosts form), `urls` one URL each.
    Usable as a context manager; `close()` stops the nodes and deletes `root`."""

    def __init__(self, root: Path, size: int = 3, prefix: str | None = None) -> None:
        self.root = Path(root)
        # unique on this machine: epmd (shared with the default node) knows nodes by name
        prefix = prefix or f"rt{secrets.token_hex(3)}"
        cookie = secrets.token_hex(16)
        self.nodes = {
            f"{prefix}{i}@localhost": RabbitNode(self.root / f"{prefix}{i}",
                                                 f"{prefix}{i}@localhost", cookie)
            for i in range(1, size + 1)
        }

    @property
    def names(self) -> list[str]:
        return list(self.nodes)

    @property
    def url(self) -> str:
        """One URL naming every node: amqp://guest:guest@127.0.0.1:p1,127.0.0.1:p2,…/"""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes.values())
        return f"amqp://guest:guest@{hosts}/"

    def vhost_url(self, vhost: str) -> str:
        """`url` on a new vhost `vhost` (guest has every right on it)."""
        node = self.nodes[self.running()[0]]
        node.ctl("add_vhost", vhost)
        node.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return f"{self.url}{quote(vhost, safe='')}"

    def delete_vhost(self, vhost: str) -> None:
        with contextlib.suppress(RuntimeError):
            self.nodes[self.running()[0]].ctl("delete_vhost", vhost)

    def node(self, name: str) -> RabbitNode:
        return self.nodes[name]

    def start(self) -> RabbitCluster:
        """Boot every node, then join the others to the first."""
        nodes = list(self.nodes.values())
        try:
            for node in nodes:  # booted together: the VMs start in parallel
                node.boot()
            for node in nodes:
                node.wait()
            for node in nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", nodes[0].name)
                node.ctl("start_app")
                node.ctl("await_startup")
        except BaseException:
            self.close()
            raise
        return self

    def kill(self, name: str) -> None:
        """`kill -9` the node `name`."""
        self.nodes[name].kill()

    def restart(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """Boot the node `name` again (after `kill`); it rejoins the cluster from its own
        directory. Returns once it serves."""
        node = self.nodes[name]
        node.kill()
        node.start(timeout)

    def running(self) -> list[str]:
        """The nodes whose process is up."""
        return [name for name, node in self.nodes.items() if node.running()]

    def cluster_members(self, via: str | None = None) -> list[str]:
        """The running nodes of the cluster as `via` [a running node] sees them."""
        node = self.nodes[via] if via else self.nodes[self.running()[0]]
        out = node.ctl("eval", "rabbit_nodes:all_running().")
        return sorted(part.strip(" '\n[]") for part in out.strip().strip("[]").split(","))

    def leaders(self, vhost: str = "/") -> dict[str, str]:
        """Each quorum queue's leader (queue name → node name), asked of a running node."""
        node = self.nodes[self.running()[0]]
        out = node.ctl("list_queues", "-p", vhost, "name", "type", "leader", "--quiet",
                       "--no-table-headers")
        leaders = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1] == "quorum":
                leaders[parts[0]] = parts[2]
        return leaders

    def home(self, queue: str, vhost: str = "/") -> str:
        """The node a classic queue lives on (from its process id, `<node.N.N.N>`)."""
        node = self.nodes[self.running()[0]]
        out = node.ctl("list_queues", "-p", vhost, "name", "pid", "--quiet",
                       "--no-table-headers")
        pid = next(line.split("\t")[1] for line in out.splitlines()
                   if line.split("\t")[0] == queue)
        return pid.strip("<>").split(".")[0]

    def members(self, queue: str, vhost: str = "/") -> list[str]:
        """The nodes a quorum queue is replicated on."""
        node = self.nodes[self.running()[0]]
        out = node.ctl("list_queues", "-p", vhost, "name", "members", "--quiet",
                       "--no-table-headers")
        for line in out.splitlines():
            name, _, members = line.partition("\t")
            if name == queue:
                return sorted(m.strip(" '[]") for m in members.split(",") if m.strip(" []"))
        raise KeyError(queue)

    def close(self) -> None:
        """Kill every node (nothing of theirs is kept) and delete their directories."""
        for node in self.nodes.values():
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()
