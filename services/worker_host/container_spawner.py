"""Workers as containers, through the Docker Engine API (Docker or Podman): `RUNNER_SPAWN_MODE=
container` (docs/CONTAINERS.md).

Each worker runs `python -m services.worker` in a container of its own (its strategy's image, a
read-only root filesystem, no capability, a non-root user), speaking the process workers' protocol
over a Unix socket in its own directory, the only host directory mounted into it, so no port is
opened. A host starting again removes the containers its earlier run left, which nothing could
drive any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from services.worker import protocol
from services.worker_host.isolation import (
    LOG_NAME,
    Identity,
    Isolation,
    Placement,
    prepare_directory,
)
from services.worker_host.spawner import (
    INHERITED,
    PlacingSpawner,
    SpawnError,
    SpawnRequest,
    WorkerProcess,
    greeted,
    send_credentials,
)
from services.worker_host.worker_image import WORKDIR, WORKER_UID

log = logging.getLogger(__name__)

LABEL_HOST = "io.runner.host"
LABEL_JOB = "io.runner.job"
LABEL_WORKER = "io.runner.worker-id"
LABEL_ATTEMPT = "io.runner.attempt"
LABEL_USER = "io.runner.user"
# Which host's store it belongs to: host ids are unique within one deployment only, and two
# deployments (or test systems) may share an engine; a host is "the same" as an earlier run
# when it has the same id and the same workers' directory.
LABEL_STORE = "io.runner.host-store"
SOCKET_NAME = "control.sock"
UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, its NUL aside)
# Host variables a container worker keeps; the rest (PATH, HOME, the venv's) are the image's.
KEPT = ("LANG", "LC_ALL", "TZ", "RUNNER_ENABLE_CHAOS", "UV_USE_IO_URING")
ENGINE_TIMEOUT = 30.0  # seconds an engine call may take


class EngineUnavailable(ConnectionError):
    """The container engine cannot be reached, or lacks the worker image."""


def engine_client(url: str) -> Any:
    """A `docker.DockerClient` for `url` (empty: DOCKER_HOST, else the default socket)."""
    import docker

    if url:
        return docker.DockerClient(base_url=url, timeout=ENGINE_TIMEOUT)
    return docker.from_env(timeout=ENGINE_TIMEOUT)


def exit_code(status: int | None) -> int | None:
    """The engine's exit status as the host reports codes: 128+n (the init's way of saying
    killed by signal n) as -n."""
    if status is not None and 128 < status <= 128 + 64:
        return 128 - status
    return status


class ContainerProcess:
    """A worker's container: `pid` is its init's on this machine. Its end is watched once, from
    creation: exit, code, output kept, container removed."""

    def __init__(self, spawner: ContainerSpawner, container: Any, pid: int, log_file: Path,
                 ) -> None:
        self.spawner = spawner
        self.container = container
        self.pid = pid
        self.log_file = log_file
        self.code: int | None = None
        self.cause = ""
        self._oom_kills: int | None = None  # the kernel's count, read the moment it exits
        self._memory = memory_events(pid) if in_cgroup_of(pid, container.id) else None
        self._ended = asyncio.Event()
        self._watch = asyncio.create_task(self._watched(), name=f"container-{container.name}")

    @property
    def running(self) -> bool:
        return not self._ended.is_set()

    async def wait(self) -> int | None:
        await self._ended.wait()
        return self.code

    def signal(self, sig: int) -> None:
        """`sig` through the engine to its init, which passes it on (SIGKILL ends them all)."""
        if self.running:
            self.spawner.call_soon(self._kill, sig)

    def _kill(self, sig: int) -> None:
        import docker.errors

        with contextlib.suppress(docker.errors.APIError):  # gone, or no longer running
            self.container.kill(signal=int(sig))

    async def _watched(self) -> None:
        try:
            await self._exited()
            self.code = exit_code(await self.spawner.call(self._status))
            await self.spawner.call(self._keep_output_and_remove)
        except Exception as exc:  # the engine failed us: the end is still reported
            log.warning("container %s: its end could not be read from the engine (%s)",
                        self.container.name, exc)
        finally:
            if self._memory is not None:
                os.close(self._memory)
                self._memory = None
            self._ended.set()

    async def _exited(self) -> None:
        """Returns once the container's init has exited: a pidfd, where its pid is the
        container's in this machine's view, else the engine's wait."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except (OSError, ValueError):
            pidfd = None
        if pidfd is not None and not in_cgroup_of(self.pid, self.container.id):
            os.close(pidfd)  # another pid namespace than the engine's: not our process
            pidfd = None
        if pidfd is None:
            await self.spawner.call_waiting(self._engine_wait)
            return
        loop = asyncio.get_running_loop()
        gone = loop.create_future()

        def exited() -> None:
            # its cgroup, and the count of its memory limit's kills, go with the engine's
            # clean-up right after: read it now
            if not gone.done():
                self._oom_kills = oom_kills(self._memory)
                gone.set_result(None)

        loop.add_reader(pidfd, exited)
        try:
            await gone
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)

    def _engine_wait(self) -> None:
        """Until the engine says it is not running (blocking; a wait cut by the client's
        timeout is made again)."""
        import docker.errors
        import requests.exceptions

        while True:
            try:
                self.container.wait(timeout=ENGINE_TIMEOUT)
                return
            except requests.exceptions.RequestException:
                try:
                    self.container.reload()
                except docker.errors.NotFound:
                    return
                if self.container.status not in ("running", "created", "paused"):
                    return

    def _status(self) -> int | None:
        """Its exit status, and what ended it when the engine knows (its memory limit)."""
        status = self.container.wait(timeout=ENGINE_TIMEOUT).get("StatusCode")
        self.container.reload()
        if self._oom_kills or self.container.attrs.get("State", {}).get("OOMKilled"):
            limit = self.spawner.settings.container_memory_mb
            self.cause = f"out of memory (over its {limit} MiB limit)"
        return status

    def _keep_output_and_remove(self) -> None:
        import docker.errors

        try:
            early = self.container.logs(stdout=True, stderr=True)
            if early:
                fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
                with os.fdopen(fd, "ab") as out:
                    out.write(early)
        except (OSError, docker.errors.APIError):
            pass
        remove(self.container)


class ContainerSpawner(PlacingSpawner):
    """Workers as containers of the engine at `settings.container_url`, labelled with
    `host_id` and its `workdir` (the workers' directory); placed by `isolation` (its directory,
    and its uid when the host has a pool)."""

    runs_images = True

    def __init__(self, settings: Any, host_id: str, workdir: Path,
                 isolation: Isolation | None = None) -> None:
        self.settings = settings
        self.host_id = host_id
        self.store = hashlib.sha256(os.fsencode(workdir.resolve())).hexdigest()[:16]
        # Of a process worker's isolation only the uid pool applies: the container confines it
        # (no Landlock, seccomp or rlimits of its own inside, the engine's instead).
        self.isolation = Isolation(isolation.uids if isolation else None)
        self.client: Any = None

    async def start(self) -> None:
        await self.isolation.start()
        try:
            self.client = await self.call(engine_client, self.settings.container_url)
            await self.call(self.client.ping)
            await self.call(self.client.images.get, self.settings.container_image)
        except Exception as exc:
            raise EngineUnavailable(engine_problem(self.settings, exc)) from None
        log.info("worker isolation: %s", self.describe())
        removed = await self.call(self.remove_leftovers)
        if removed:
            log.warning("removed %d container(s) of an earlier run of host %s: %s", len(removed),
                        self.host_id, ", ".join(removed))

    async def close(self) -> None:
        await self.isolation.close()
        if self.client is not None:
            self.client.close()

    def describe(self) -> str:
        settings = self.settings
        who = (self.isolation.reason if self.isolation.switches_ids
               else f"uid {WORKER_UID} (the image's user)" if os.geteuid() == 0
               else f"the host's uid {os.getuid()}")
        limits = ", ".join(part for part in (
            f"memory {settings.container_memory_mb} MiB" if settings.container_memory_mb else "",
            f"{settings.container_pids} pids" if settings.container_pids else "",
            f"{settings.container_cpus:g} CPUs" if settings.container_cpus else "") if part)
        return (f"a container each ({settings.container_network} network; {limits or 'no limits'})"
                f"; {who}; read-only root, no capabilities, no new privileges")

    def remove_leftovers(self) -> list[str]:
        """Remove every container labelled with this host: an earlier run's (blocking)."""
        removed = []
        for container in self.client.containers.list(all=True, filters={"label": [
                f"{LABEL_HOST}={self.host_id}", f"{LABEL_STORE}={self.store}"]}):
            remove(container)
            removed.append(container.labels.get(LABEL_WORKER, container.name))
        return removed

    async def call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """A blocking engine call, on the loop's thread pool."""
        return await asyncio.to_thread(function, *args, **kwargs)

    def call_soon(self, function: Any, *args: Any) -> None:
        """A blocking engine call whose answer nobody waits for."""
        asyncio.get_running_loop().run_in_executor(None, function, *args)

    async def call_waiting(self, function: Any) -> Any:
        """A blocking call that lasts (an engine's wait): a thread of its own, not one of the
        pool's few."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def run() -> None:
            try:
                result = function()
            except BaseException as exc:  # handed to the waiter
                loop.call_soon_threadsafe(
                    lambda error=exc: done.done() or done.set_exception(error))
            else:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        threading.Thread(target=run, daemon=True, name="container-wait").start()
        return await done

    def image_for(self, request: SpawnRequest) -> str:
        image = request.image or self.settings.container_image
        if image not in self.settings.allowed_images:
            raise SpawnError(f"image {image!r} is not allowed on host {self.host_id}",
                             permanent=True)
        return image

    async def _start(self, request: SpawnRequest, placement: Placement) -> WorkerProcess:
        os.close(placement.log_fd)  # the worker opens its log itself, through the mount
        image = self.image_for(request)
        identity = placement.identity or self._identity(request, placement)
        listener = listen(placement.directory / SOCKET_NAME, identity)
        container = None
        try:
            container = await self.call(self._create, request, placement, identity, image)
            await self.call(container.start)
            await self.call(container.reload)
            pid = int(container.attrs["State"]["Pid"] or 0)
            process = ContainerProcess(self, container, pid, request.log_file)
            host_end = await accepted(listener, process, request.hello_timeout)
        except BaseException as exc:
            listener.close()
            if container is not None:
                with contextlib.suppress(Exception):
                    await self.call(remove, container)
            if isinstance(exc, SpawnError) or not isinstance(exc, Exception):
                raise
            raise SpawnError(f"container engine: {exc}") from None
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(placement.directory / SOCKET_NAME)
        try:
            send_credentials(host_end, request.credentials)
        except OSError:
            pass  # it has died already: greeted reports it
        return await greeted(request, process, host_end)

    def _identity(self, request: SpawnRequest, placement: Placement) -> Identity:
        """Who a worker runs as without a uid of the pool: the image's user when the host can
        give it the worker's directory (root), else the host's own uid (never root)."""
        if os.geteuid() == 0:
            identity = Identity(WORKER_UID, WORKER_UID)
            prepare_directory(request.worker_id, placement.directory, identity)
            return identity
        return Identity(os.getuid(), os.getgid())

    def _create(self, request: SpawnRequest, placement: Placement, identity: Identity,
                image: str) -> Any:
        from docker.types import Mount, Ulimit

        settings = self.settings
        environment = {k: v for k, v in request.env.items() if k not in INHERITED or k in KEPT}
        environment |= {protocol.ENV_CONTROL_SOCKET: f"{WORKDIR}/{SOCKET_NAME}",
                        protocol.ENV_WORKER_LOG: f"{WORKDIR}/{LOG_NAME}"}
        limits: dict[str, Any] = {}
        if settings.container_memory_mb:
            limits["mem_limit"] = limits["memswap_limit"] = f"{settings.container_memory_mb}m"
        if settings.container_pids:
            limits["pids_limit"] = settings.container_pids
        if settings.container_cpus:
            limits["nano_cpus"] = int(settings.container_cpus * 1e9)
        if settings.container_runtime:
            limits["runtime"] = settings.container_runtime
        open_files = settings.worker_open_files or 4096
        return self.client.containers.create(
            image,
            name=f"runner-{request.worker_id}-{request.attempt}",
            environment=environment,
            labels={LABEL_HOST: self.host_id, LABEL_STORE: self.store, LABEL_JOB: request.job_id,
                    LABEL_WORKER: request.worker_id, LABEL_ATTEMPT: str(request.attempt),
                    LABEL_USER: request.user_id},
            user=f"{identity.uid}:{identity.gid}",
            working_dir=WORKDIR,
            mounts=[Mount(WORKDIR, str(placement.directory), type="bind", read_only=False)],
            tmpfs={"/tmp": "rw,nosuid,nodev,noexec,size=64m"},
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            init=True,
            network_mode=settings.container_network,
            ulimits=[Ulimit(name="nofile", soft=open_files, hard=open_files),
                     Ulimit(name="nproc", soft=4096, hard=4096)],
            **limits,
        )


def remove(container: Any, attempts: int = 20) -> None:
    """Remove `container`, running or not (blocking). Podman refuses now and then while a
    container is between exited and cleaned up ("container state improper"): asked again."""
    import docker.errors

    for attempt in range(attempts):
        try:
            container.remove(force=True)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def listen(path: Path, identity: Identity) -> socket.socket:
    """The worker's channel's listening end at `path` (in its directory, mounted into its
    container), connectable by `identity` only. A path too long for a Unix socket is reached
    through the directory's descriptor."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(path)) <= UNIX_PATH_MAX:
            listener.bind(str(path))
        else:
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                listener.bind(f"/proc/self/fd/{directory}/{path.name}")
            finally:
                os.close(directory)
        if os.geteuid() == 0 or identity.uid == os.getuid():
            os.chown(path, identity.uid, identity.gid, follow_symlinks=False)
        os.chmod(path, 0o600)
        listener.listen(1)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


async def accepted(listener: socket.socket, process: ContainerProcess,
                   timeout: float) -> socket.socket:
    """The worker's connection to `listener`; SpawnError when its container ends first or it
    does not connect within `timeout` seconds (then it is killed)."""
    loop = asyncio.get_running_loop()
    accepting = asyncio.ensure_future(loop.sock_accept(listener))
    ending = asyncio.ensure_future(process.wait())
    try:
        done, _ = await asyncio.wait({accepting, ending}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (accepting, ending):
            if not task.done():
                task.cancel()
    if accepting in done:
        connection, _ = accepting.result()
        connection.setblocking(False)
        return connection
    if ending in done:
        raise SpawnError(f"worker container exited before connecting (exit code "
                         f"{ending.result()}; see {LOG_NAME})")
    process.signal(signal.SIGKILL)
    raise SpawnError(f"worker container did not connect within {timeout:g}s")


def in_cgroup_of(pid: int, container_id: str) -> bool:
    """Whether process `pid`, as this machine numbers it, runs in the container `container_id`
    (engines name a container's cgroups after its id)."""
    try:
        with open(f"/proc/{pid}/cgroup") as cgroups:
            return container_id in cgroups.read()
    except OSError:
        return False


def memory_events(pid: int) -> int | None:
    """A descriptor of the file counting the kills of `pid`'s memory cgroup (v1's
    memory.oom_control, v2's memory.events); None where there is none to read. Opened while it
    runs: the engine removes the cgroup right after it exits (Podman does not always say
    OOMKilled itself)."""
    try:
        with open(f"/proc/{pid}/cgroup") as cgroups:
            lines = cgroups.read().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            candidates.append(f"/sys/fs/cgroup/memory{path}/memory.oom_control")
        elif hierarchy == "0" and not controllers:
            candidates.append(f"/sys/fs/cgroup{path}/memory.events")
    for candidate in candidates:
        with contextlib.suppress(OSError):
            return os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
    return None


def oom_kills(fd: int | None) -> int | None:
    """The `oom_kill` count in the file of `fd`; None when it cannot be read."""
    if fd is None:
        return None
    try:
        text = os.pread(fd, 4096, 0).decode()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def engine_problem(settings: Any, exc: Exception) -> str:
    """What to do when the engine or the image is missing, in one sentence."""
    import docker.errors

    where = settings.container_url or "DOCKER_HOST or /var/run/docker.sock"
    if isinstance(exc, docker.errors.ImageNotFound):
        return (f"the worker image {settings.container_image!r} is not in the container engine "
                f"at {where}: build it with `runner images build`")
    return (f"no container engine answers at {where} ({type(exc).__name__}): start one (e.g. "
            "`podman system service --time=0 unix:///run/podman/podman.sock`) and set "
            "RUNNER_CONTAINER_URL")
