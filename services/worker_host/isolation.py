"""The worker-host's side of worker isolation (docs/SECURITY.md): who each worker runs as, the
directory it owns, what it is confined to, and when its uid may serve another worker.

Where the host can switch ids, every worker runs under a uid of its own from
`RUNNER_WORKER_UIDS`, given back only once no process runs under it (`sweep`) and claimed while
in use, so no two workers (nor two hosts on one machine) ever share one; elsewhere workers run
under the host's uid. Either way each worker is confined (`services.worker.confinement`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from yarl import URL

from services.worker.confinement import (
    Confinement,
    Limits,
    describe_limits,
    landlock_abi,
    libseccomp,
)
from services.worker_host import children

log = logging.getLogger(__name__)

LOG_NAME = "worker.log"
STATE_NAME = "state.json"  # a worker's RUNNER_WORKER_STATE, relative to its directory
MiB = 1024 * 1024

# Run as the uid being reclaimed: kill every process of it (in bursts, so that a process forking
# meanwhile is caught by the next), then prove none is left: with RLIMIT_NPROC at 2 a fork
# succeeds only while this is the uid's one task. Zombies count there until their parent reaps
# them, so when the fork keeps failing, a scan of /proc for a live task of the uid decides.
# Exit 0: none left; 1: some still there after about a second.
SWEEP = """
import os, resource, signal, sys, time

def live_tasks_of_mine():
    me, found = str(os.getuid()), False
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry == str(os.getpid()):
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except (OSError, ValueError):
            continue
        if fields.get("Uid", "").split()[:1] == [me]:
            found = found or not fields.get("State", "").strip().startswith("Z")
    return found

resource.setrlimit(resource.RLIMIT_NPROC, (2, 2))
for attempt in range(200):
    for _ in range(20):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        pid = os.fork()
    except BlockingIOError:
        if attempt % 20 == 19 and not live_tasks_of_mine():
            sys.exit(0)
        time.sleep(0.005)
        continue
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    sys.exit(0)
sys.exit(1)
"""
PROBE = "import services.worker.runtime"  # what a worker under another uid must be able to do


class PoolExhausted(RuntimeError):
    """Every uid of the pool is held by a live worker (or quarantined)."""


class UidPool:
    """The uids of `uids` for workers: one uid is held by one worker at most, from `take` until
    `give_back`; the uid free for longest is handed out first, so a uid is reused as late as
    possible."""

    def __init__(self, uids: range) -> None:
        if not uids:
            raise ValueError("an empty uid range")
        self.uids = uids
        self._free: deque[int] = deque(uids)
        self._held: set[int] = set()

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise PoolExhausted(
                f"no free worker uid: all {len(self.uids)} of "
                f"{self.uids.start}-{self.uids.stop - 1} are in use"
            )
        uid = self._free.popleft()
        self._held.add(uid)
        return uid

    def give_back(self, uid: int) -> None:
        if uid not in self._held:
            raise ValueError(f"uid {uid} is not held")
        self._held.remove(uid)
        self._free.append(uid)

    def quarantine(self, uid: int) -> None:
        """Never hand `uid` out again (something could not be ended under it)."""
        self._held.discard(uid)
        with contextlib.suppress(ValueError):
            self._free.remove(uid)


def parse_uids(text: str) -> range | None:
    """`"60000-60999"` → range(60000, 61000); `""` → None (no uid of their own)."""
    text = text.strip()
    if not text:
        return None
    first, sep, last = text.partition("-")
    try:
        start, end = int(first), int(last if sep else first)
    except ValueError:
        raise ValueError(f"not a uid range: {text!r} (e.g. 60000-60999)") from None
    if not 0 < start <= end < 2**31 - 1:
        raise ValueError(f"not a uid range: {text!r} (e.g. 60000-60999)")
    return range(start, end + 1)


def allowed_tcp_ports(ports: str, broker_urls: str | None) -> tuple[int, ...]:
    """The TCP ports a sandboxed worker may connect to: `ports` ("443,8443") and the port of
    every URL in `RUNNER_BROKER_URLS` (a JSON object of exchange id → base URL)."""
    found = {int(p) for p in ports.replace(" ", "").split(",") if p}
    if broker_urls:
        for url in json.loads(broker_urls).values():
            if (port := URL(url).port) is not None:
                found.add(port)
    return tuple(sorted(found))


def can_switch_ids() -> bool:
    """Root, or CAP_SETUID and CAP_SETGID in the effective set."""
    if os.geteuid() == 0:
        return True
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
                return bool(effective & (1 << 6)) and bool(effective & (1 << 7))
    return False


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int


@dataclass
class Placement:
    """Where and as whom one worker runs: its identity (None: the host's) and the claim on it,
    its directory, and the host's descriptor of its log (opened for appending; the spawner
    closes it)."""

    worker_id: str
    identity: Identity | None
    directory: Path
    log_fd: int
    claim: socket.socket | None = None


def claim_uid(uid: int) -> socket.socket | None:
    """This host's claim on `uid`, held while one of its workers may run under it; None when
    another process on this machine (another worker-host) holds it."""
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0runner-worker-uid-{uid}")
    except OSError:
        claim.close()
        return None
    return claim


class Isolation:
    """The host's isolation policy and its uid pool. `Isolation()` (no uids, no limits, no
    sandbox, nothing said at start) is what a spawner made without settings uses;
    `from_settings` is a worker-host's."""

    def __init__(
        self,
        uids: range | None = None,
        *,
        limits: Limits | None = None,
        sandbox: bool = False,
        tcp_ports: tuple[int, ...] = (),
        announce: bool = False,
    ) -> None:
        self.uids = uids
        self.limits = limits or Limits()
        self.sandbox = sandbox
        self.tcp_ports = tcp_ports
        self.announce = announce  # log what it is (and warn when workers share the host's uid)
        self.switches_ids = False  # known after `start`
        self.reason = "workers run under the host's uid"
        self.pool: UidPool | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._private: set[Path] = set()  # workers' directories made 0700 already

    @classmethod
    def from_settings(cls, settings: Any) -> Isolation:
        return cls(
            uids=parse_uids(settings.worker_uids),
            limits=Limits(
                address_space=settings.worker_address_space_mb * MiB or None,
                open_files=settings.worker_open_files or None,
                processes=settings.worker_processes or None,
            ),
            sandbox=settings.worker_sandbox,
            tcp_ports=allowed_tcp_ports(
                settings.worker_tcp_ports, os.environ.get("RUNNER_BROKER_URLS")
            ),
            announce=True,
        )

    async def start(self) -> None:
        """Decide whether workers get uids of their own: the host can switch ids, and a process
        under the first uid can import the worker runtime (the interpreter and the venv are
        readable by it). Says why not in one WARNING line. Sweeps what earlier runs left under
        the range (but under the uids another host here holds)."""
        self.switches_ids, self.reason = await self._check()
        if not self.switches_ids:
            self.pool = None
        else:
            assert self.uids is not None and self.pool is not None
            for uid in leftover_uids(self.uids):
                if (claim := claim_uid(uid)) is None:
                    continue  # another worker-host's worker
                with claim:
                    if not await sweep(Identity(uid, uid)):
                        self.pool.quarantine(uid)
                        log.warning("uid %d still runs processes of an earlier run; not used",
                                    uid)
        if not self.announce:
            return
        if not self.switches_ids:
            log.warning("workers are NOT isolated from the host and each other: %s "
                        "(docs/SECURITY.md)", self.reason)
        log.info("worker isolation: %s", self.describe())

    async def _check(self) -> tuple[bool, str]:
        if self.uids is None and not self.announce:
            return False, "workers run under the host's uid"
        if self.uids is None:
            return False, "RUNNER_WORKER_UIDS is empty: workers run under the host's uid"
        if not can_switch_ids():
            return False, (f"this host (uid {os.geteuid()}) cannot switch ids (it needs root, or "
                           "CAP_SETUID and CAP_SETGID): workers run under the host's uid")
        self.pool = UidPool(self.uids)
        try:
            identity, claim = self._take()  # claimed: no other host sweeps it meanwhile
        except PoolExhausted:
            return False, "every uid of RUNNER_WORKER_UIDS is used by another worker-host here"
        with tempfile.TemporaryFile() as err:
            try:
                code = await children.run(
                    [sys.executable, "-c", PROBE], cwd="/", stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=err, user=identity.uid, group=identity.gid,
                    extra_groups=[],
                )
            finally:
                self.pool.give_back(identity.uid)
                claim.close()
            err.seek(0)
            said = err.read().decode(errors="replace")
        if code != 0:
            last = said.strip().splitlines()[-1:] or [f"exit code {code}"]
            return False, (f"uid {identity.uid} cannot run {sys.executable} with this project "
                           f"({last[0]}): build the venv from a Python every uid can read "
                           "(make clean; make)")
        return True, (f"each worker under a uid and gid of its own from "
                      f"{self.uids.start}-{self.uids.stop - 1}")

    def describe(self) -> str:
        """One line for the log and for `GET /admin/hosts`: how workers are isolated here."""
        layers = [self.reason if self.switches_ids else "under the host's uid"]
        layers.append(describe_limits(self.limits))
        layers.append("no new privileges, not dumpable")
        if self.sandbox:
            abi = landlock_abi()
            layers.append(f"landlock v{abi} (writes in its directory, tcp to "
                          f"{','.join(map(str, self.tcp_ports)) or 'no port'})"
                          if abi else "no landlock in this kernel")
            layers.append("seccomp (no unix socket, no tracing, namespaces, keyrings, bpf, "
                          "perf, userfaultfd, io_uring)" if libseccomp()
                          else "no seccomp (libseccomp missing)")
        return "; ".join(layers)

    async def close(self) -> None:
        """Stop waiting to give uids back (the host is going; its claims end with it)."""
        for task in self._releases:
            task.cancel()
        await asyncio.gather(*self._releases, return_exceptions=True)

    # ------------------------------------------------------------------ one worker

    def place(self, worker_id: str, directory: Path) -> Placement:
        """A uid for the worker (when switching ids), its directory made and given to it, and
        its log opened. Raises PoolExhausted or OSError; then nothing is held."""
        if directory.parent not in self._private:
            make_workers_dir(directory.parent)
            self._private.add(directory.parent)
        identity, claim = self._take() if self.switches_ids else (None, None)
        try:
            fresh = prepare_directory(worker_id, directory, identity)
            log_fd = open_log(directory / LOG_NAME, identity, fresh)
        except BaseException:
            if identity is not None:
                self.pool.give_back(identity.uid)  # type: ignore[union-attr]
                claim.close()  # type: ignore[union-attr]
            raise
        return Placement(worker_id, identity, directory, log_fd, claim)

    def _take(self) -> tuple[Identity, socket.socket]:
        """A uid of the pool no other host here holds now, and our claim on it."""
        assert self.pool is not None
        skipped = []
        try:
            while True:
                uid = self.pool.take()  # PoolExhausted when every one is held
                if (claim := claim_uid(uid)) is not None:
                    return Identity(uid, uid), claim
                skipped.append(uid)
        finally:
            for uid in skipped:
                self.pool.give_back(uid)

    def confinement(self, placement: Placement) -> Confinement:
        """What the worker of `placement` is confined to (a forked child switches ids itself)."""
        identity = placement.identity
        return Confinement(
            directory=str(placement.directory),
            uid=identity.uid if identity else None,
            gid=identity.gid if identity else None,
            limits=self.limits if identity else replace(self.limits, processes=None),
            sandbox=self.sandbox,
            tcp_ports=self.tcp_ports,
        )

    def release_when_gone(
        self, placement: Placement, exited: Callable[[], Awaitable[Any]] | None
    ) -> None:
        """Once `exited()` (the worker's exit; None: it never ran) completes, end whatever still
        runs under its uid and give the uid back."""
        if placement.identity is None:
            return  # the host's uid: nothing to give back
        task = asyncio.create_task(self._release(placement, exited),
                                   name=f"release-{placement.worker_id}")
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(
        self, placement: Placement, exited: Callable[[], Awaitable[Any]] | None
    ) -> None:
        if exited is not None:
            await exited()
        identity = placement.identity
        if identity is None or self.pool is None:
            return
        with contextlib.suppress(OSError):  # its files stay its own, out of the next one's reach
            os.chown(placement.directory, os.getuid(), os.getgid())
        if await sweep(identity):
            self.pool.give_back(identity.uid)
            if placement.claim is not None:
                placement.claim.close()
        else:  # the claim is kept too: no host here may use it
            self.pool.quarantine(identity.uid)
            log.warning("worker %s: processes under uid %d could not be ended; the uid is not "
                        "used again", placement.worker_id, identity.uid)


def prepare_directory(worker_id: str, directory: Path, identity: Identity | None) -> bool:
    """The worker's own directory, 0700, and everything in it, given to `identity` (its files
    may come from an earlier attempt under another uid), never following a symbolic link; True
    when it is new. A paper account left beside the directory (`<worker>.state.json`) is moved
    in."""
    try:
        os.mkdir(directory, 0o700)
        fresh = True
    except FileExistsError:
        fresh = False
    if fresh:
        legacy = directory.parent / f"{worker_id}.state.json"
        with contextlib.suppress(FileNotFoundError):
            os.rename(legacy, directory / STATE_NAME)
            if identity is not None:
                os.chown(directory / STATE_NAME, identity.uid, identity.gid,
                         follow_symlinks=False)
    else:  # an earlier attempt's: made by us, but its content is the worker's
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            raise OSError(f"{directory} is not a directory")
        os.chmod(directory, 0o700, follow_symlinks=False)
        if identity is not None:
            for root, dirs, files in os.walk(directory):
                for name in (*dirs, *files):
                    os.chown(os.path.join(root, name), identity.uid, identity.gid,
                             follow_symlinks=False)
    if identity is not None:
        os.chown(directory, identity.uid, identity.gid, follow_symlinks=False)
    return fresh


def make_workers_dir(path: Path) -> None:
    """The host's workers' directory, 0700: no worker lists its siblings (`ls ..`)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_uid == os.getuid():
        os.chmod(path, 0o700)


def open_log(path: Path, identity: Identity | None, fresh: bool) -> int:
    """The worker's log, opened for appending by the host. In a `fresh` directory nobody else
    has written yet; in an earlier attempt's, never through a symbolic link, never anything but
    a regular file (the worker may have put anything under that name)."""
    if fresh:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        if not fresh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{path} is not a regular file")
            os.set_blocking(fd, True)
        if identity is not None:
            os.fchown(fd, identity.uid, identity.gid)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def sweep(identity: Identity) -> bool:
    """End every process running under `identity`'s uid; True once none is left."""
    code = await children.run(
        [sys.executable, "-I", "-S", "-c", SWEEP], cwd="/", stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=identity.uid,
        group=identity.gid, extra_groups=[],
    )
    return code == 0


def leftover_uids(uids: range) -> set[int]:
    """The uids of `uids` some process runs under now (read from /proc, once, at start)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                for line in status:
                    if line.startswith("Uid:"):
                        found.update(int(u) for u in line.split()[1:] if int(u) in uids)
                        break
        except OSError:
            continue
    return found
