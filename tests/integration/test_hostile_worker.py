"""A hostile strategy (tests/plugins/hostile, installed through the `runner.strategies` entry
point like any plugin) on a real worker-host, beside two other users' workers, forked and exec'd:
every escape it tries fails, the others run on untouched, and its own limits end it. A worker
that breaks the control protocol is killed and reported crashed, saying how, its slot freed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from events import Envelope, JobDispatched, StrategyConfig
from events.routing import EVENTS_EXCHANGE
from services.memory_bus import MemoryBroker, MemoryBus, settled
from services.settings import Settings
from services.worker_host.fork_spawner import ForkSpawner
from services.worker_host.service import WorkerHostService
from tests.integration.broker_helpers import until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "hostile"
HOST = "h-1"
FIRST_UID = 63000 + (os.getpid() % 150) * 10  # a range of its own per test run
PROCESSES = 32
MEMORY_MB = 768
Host = tuple[WorkerHostService, "Emitted"]


class Emitted:
    """What the host publishes, seen on the in-memory bus it runs on."""

    def __init__(self, broker: MemoryBroker, service: WorkerHostService) -> None:
        self.broker, self.service = broker, service
        self.envelopes: list[Envelope] = []

    def of(self, kind: str, wid: str) -> dict[str, Any] | None:
        found = [e.payload for e in self.envelopes
                 if e.type == kind and e.payload["worker_id"] == wid]
        return found[0] if found else None


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The hostile distribution where every uid can read it, on the workers' import path."""
    where = Path(tempfile.mkdtemp(prefix="runner-hostile-"))
    shutil.copytree(PLUGIN, where, dirs_exist_ok=True)
    for path in [where, *where.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(where), *filter(None, [os.environ.get("PYTHONPATH")])]))
    yield where
    shutil.rmtree(where)


@pytest.fixture(params=["fork", "exec"])
async def host(request: pytest.FixtureRequest, tmp_path: Path, plugin: Path
               ) -> AsyncIterator[Host]:
    """A worker-host under its default isolation (tighter limits), on the in-memory bus."""
    settings = Settings(
        data_dir=tmp_path / "data", host_id=HOST, spawn_mode=request.param, stop_grace=2.0,
        worker_uids=f"{FIRST_UID}-{FIRST_UID + 9}", worker_processes=PROCESSES,
        worker_address_space_mb=MEMORY_MB, host_lease=30.0)
    broker = MemoryBroker()
    service = WorkerHostService(settings, bus=MemoryBus(broker, settings, "worker-host"))
    emitted = Emitted(broker, service)
    watcher = MemoryBus(broker, settings, "test")
    await watcher.start()
    await watcher.watch([(EVENTS_EXCHANGE, "#")],
                        lambda body: emitted.envelopes.append(Envelope.from_json(body)))
    await service.start()
    assert service.spawner.isolation.switches_ids, service.spawner.isolation.reason
    yield service, emitted
    for worker in list(service.live.values()):
        worker.signal(signal.SIGKILL)
    await service.stop()
    await watcher.close()


async def dispatch(service: WorkerHostService, emitted: Emitted, wid: str, user: str,
                   strategy: str = "hold", **parameters: Any) -> None:
    message = JobDispatched(
        job_id=f"j-{wid}", worker_id=wid, host_id=HOST, strategy_id=strategy,
        broker_id="paper", credentials_sealed=service.sealer.seal(
            {"apiKey": f"key-{user}", "apiSecret": f"secret-of-{user}-{uuid.uuid4().hex}"},
            user_id=user, worker_id=wid),
        config=StrategyConfig(name=strategy, type=strategy, parameters=parameters),
        host_incarnation=service.incarnation)
    await deliver(service, emitted, message, user)


async def deliver(service: WorkerHostService, emitted: Emitted, message: JobDispatched,
                  user: str) -> None:
    """Publish a dispatch to the host and wait until it has been handled (not dead-lettered)."""
    await service.bus.publish(Envelope.wrap(message, stream=f"job-{message.job_id}",
                                            user_id=user, correlation_id=message.job_id))
    await settled(emitted.broker, service)
    assert emitted.broker.dead_letters("worker-host") == []




async def crash_of(emitted: Emitted, wid: str) -> dict[str, Any] | None:
    return emitted.of("WorkerCrashed", wid)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


async def victims(service: WorkerHostService, emitted: Emitted) -> dict[str, int]:
    """Two other users' workers, beating: their pids."""
    await dispatch(service, emitted, "w-alice", "alice", amount=1)
    await dispatch(service, emitted, "w-bob", "bob", amount=2)
    await until(lambda: all(
        w in service.live and service.live[w].beating for w in ("w-alice", "w-bob")))
    return {wid: service.live[wid].pid for wid in ("w-alice", "w-bob")}


async def test_a_hostile_worker_escapes_nowhere_and_its_limits_end_it(
    host: Host, tmp_path: Path, plugin: Path
) -> None:
    service, emitted = host
    beats: Counter[str] = Counter()
    relay = service.beats.add
    service.beats.add = lambda beat, first=False: (  # type: ignore[method-assign]
        beats.update([beat.worker_id]), relay(beat, first=first))[1]
    pids = await victims(service, emitted)
    data, workers = service.settings.data_dir, service.workers_dir
    (data / "admin.token").write_text("decoy-admin-token\n")
    (data / "admin.token").chmod(0o600)
    states = {wid: (workers / wid / "state.json").read_bytes() for wid in pids}
    marker = uuid.uuid4().hex
    targets = {
        "siblings": list(pids.values()),
        "host": os.getpid(),
        "forkserver": service.spawner.server.pid
        if isinstance(service.spawner, ForkSpawner) else None,
        "read": [str(data / "secret.key"), str(data / "admin.token"),
                 str(data / f"worker-host-{HOST}.db"), str(workers / "w-alice" / "state.json"),
                 str(workers / "w-bob" / "worker.log"), str(workers / "forkserver.log")],
        "list": [str(data), str(workers), str(workers / "w-alice")],
        "write": [f"/tmp/hostile-{marker}", f"/dev/shm/hostile-{marker}",
                  str(data / f"hostile-{marker}"), str(workers / "w-alice" / "state.json"),
                  str(plugin / "sitecustomize.py")],
        "tcp": [["127.0.0.1", 5672], ["127.0.0.1", 5432]],
        "unix": [str(p) for p in Path("/var/run/postgresql").glob(".s.PGSQL.*")
                 if not p.name.endswith(".lock")],
    }

    await dispatch(service, emitted, "w-mallory", "mallory", "hostile", targets=targets)

    crash = await until(lambda: crash_of(emitted, "w-mallory"), timeout=60)
    assert crash["exit_code"] == 1  # its strategy raised once its limits stopped it
    escapes = json.loads((workers / "w-mallory" / "escapes.json").read_text())
    assert len(escapes) > 30
    assert not {name: outcome for name, outcome in escapes.items()
                if not outcome.startswith("blocked") and "refusal" not in name}, escapes
    assert 0 < int(escapes["forks before the refusal"]) < PROCESSES
    assert 0 < int(escapes["MiB before the refusal"]) < MEMORY_MB
    assert "hostile: ended by its own limits" in (workers / "w-mallory" / "worker.log").read_text()

    for wid, pid in pids.items():  # the others: untouched, and still beating
        assert alive(pid) and service.live[wid].pid == pid
        assert (workers / wid / "state.json").read_bytes() == states[wid]
    seen = Counter(beats)
    await until(lambda: all(beats[w] > seen[w] + 1 for w in pids))
    assert not list(Path("/tmp").glob(f"hostile-{marker}"))
    assert not list(Path("/dev/shm").glob(f"hostile-{marker}"))
    assert not list(data.glob("hostile-*")) and not (plugin / "sitecustomize.py").exists()
    pool = service.spawner.isolation.pool
    assert pool is not None
    await until(lambda: pool.free == 10 - 2)  # its uid back, swept


@pytest.mark.parametrize(
    ("host", "attack", "says"),
    [
        ("fork", "flood", "more than 100 lines a second"),
        ("exec", "flood", "more than 100 lines a second"),
        ("fork", "oversize", "a line over 65536 bytes"),
        ("fork", "nan", "a number that is not finite (NaN)"),
        ("fork", "host_line", "a stop line where only heartbeats, reports and subscriptions "
                              "may come"),
        ("fork", "bad_report", "an invalid OrderFilled report"),
    ],
    indirect=["host"],
)
async def test_a_worker_breaking_the_protocol_is_killed_and_reported(
    host: Host, attack: str, says: str
) -> None:
    service, emitted = host
    await dispatch(service, emitted, "w-mallory", "mallory", "hostile", attack=attack)
    crash = await until(lambda: crash_of(emitted, "w-mallory"))
    assert crash["reason"] == "exited" and crash["exit_code"] == -signal.SIGKILL
    assert crash["detail"] == f"broke the control protocol ({says}); killed by SIGKILL", crash
    assert "w-mallory" not in service.live  # its slot freed


async def spawn_failure_of(emitted: Emitted, wid: str) -> dict[str, Any] | None:
    return emitted.of("WorkerSpawnFailed", wid)


@pytest.mark.parametrize("host", ["fork"], indirect=True)
async def test_credentials_copied_into_another_job_are_refused(host: Host) -> None:
    service, emitted = host
    secret = f"sk-of-alice-{uuid.uuid4().hex}"
    alices = service.sealer.seal({"apiKey": "ak-alice", "apiSecret": secret},
                                 user_id="alice", worker_id="w-alice")
    message = JobDispatched(
        job_id="j-w-mallory", worker_id="w-mallory", host_id=HOST, strategy_id="hold",
        broker_id="paper", credentials_sealed=alices,  # copied from alice's job
        config=StrategyConfig(name="hold", type="hold"), host_incarnation=service.incarnation)
    await deliver(service, emitted, message, "mallory")
    failed = await until(lambda: spawn_failure_of(emitted, "w-mallory"))
    assert failed["error"] == "these sealed credentials belong to another job: refused"
    assert "w-mallory" not in service.live
    assert not (service.workers_dir / "w-mallory").exists()  # nothing was started
