"""A seeded chaos drill: every service is SIGKILLed at random moments (and restarted by the
supervisor) while users start and stop runners; on a three-node RabbitMQ cluster (private nodes
beside the default one), broker nodes are killed too (`kill -9`, one at a time, each restarted
at once and rejoining). Afterwards the invariants are checked from the log: no accepted job
lost, no worker ever running twice, no limit exceeded, no event recorded twice, the hash chain
intact, and the live projections equal to a replay of the log."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from services.cli.client import GatewayClient, GatewayError
from tests.e2e.conftest import System, start_body
from tests.e2e.test_hosts import NeverTwice
from tests.rabbit_nodes import RabbitCluster

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.drill]

SEED = int(os.environ.get("CHAOS_SEED", "20261126"))
DURATION = float(os.environ.get("CHAOS_SECONDS", "20"))
VICTIMS = (
    "gateway",
    "entitlement",
    "scheduler",
    "monitor",
    "worker-host host-1",
    "worker-host host-2",
)
BROKER_NODE = "a broker node"  # on a cluster: twice as likely as each service
TIERS = {"free": 1, "basic": 3, "pro": 10}
ENDINGS = ("WorkerStopped", "RestartsExhausted")


async def traffic(
    rng: random.Random, users: dict[str, GatewayClient], stop: asyncio.Event, seen_workers: set[str]
) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    mine: dict[str, list[str]] = defaultdict(list)
    while not stop.is_set():
        user = rng.choice(sorted(users))
        client = users[user]
        try:
            if mine[user] and rng.random() < 0.4:
                wid = mine[user].pop(rng.randrange(len(mine[user])))
                await client.stop(wid, flatten=rng.random() < 0.5)
                outcomes["stopped"] += 1
            else:
                started = await client.start(**start_body("hold", amount=rng.choice((0.5, 1, 2))))
                mine[user].append(started["workerId"])
                seen_workers.add(started["workerId"])
                outcomes["started"] += 1
        except GatewayError as exc:
            outcomes[f"refused {exc.status}"] += 1
        await asyncio.sleep(rng.uniform(0.05, 0.3))
    return outcomes


async def chaos(rng: random.Random, system: System, stop: asyncio.Event,
                cluster: RabbitCluster | None = None) -> list[str]:
    """Kill a service (or, on `cluster`, a broker node: one at a time, restarted at once, the
    first kill always one) every 1.5-3 s; what was killed."""
    killed = []
    victims = VICTIMS + ((BROKER_NODE,) * 2 if cluster is not None else ())
    rejoining: asyncio.Task[None] | None = None
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(1.5, 3.0))
        victim = BROKER_NODE if cluster is not None and not killed else rng.choice(victims)
        if victim == BROKER_NODE:
            assert cluster is not None
            if rejoining is not None and not rejoining.done():
                continue  # a quorum needs two nodes of three
            node = rng.choice(cluster.names)
            cluster.kill(node)
            killed.append(node)
            rejoining = asyncio.create_task(asyncio.to_thread(cluster.restart, node))
            continue
        child = system.supervisor.child(victim)
        if child.process is not None and child.process.returncode is None:
            system.supervisor.kill(victim)
            killed.append(victim)
    if rejoining is not None:
        await rejoining
    return killed


async def settled(system: System, timeout: float = 60.0) -> dict:
    """Wait until no job is in flight (queued or crashed awaiting restart), every running worker
    has beaten within the last second, and nothing changes for longer than it takes the monitor
    to notice a killed host (so the workers of a host killed at the very end are not taken for
    running)."""
    stable_for = float(system.env["RUNNER_HOST_TIMEOUT"]) + 1.0
    previous, since = None, 0.0
    status: dict = {}
    for _ in range(int(timeout)):
        await asyncio.sleep(1.0)
        try:
            status = await system.admin.status()
        except GatewayError:
            continue
        now_ms = time.time() * 1000
        in_flight = [e for e in status["workers"] if e["worker"]["status"] in ("queued", "crashed")
                     or (e["worker"]["status"] == "running"
                     and now_ms - (e["worker"]["lastHeartbeat"] or 0) > 1000)]
        snapshot = json.dumps(
            [
                (e["worker"]["workerId"], e["worker"]["status"], e["worker"]["pid"])
                for e in status["workers"]
            ]
        )
        if in_flight or snapshot != previous:
            previous, since = snapshot, time.monotonic()
        elif time.monotonic() - since >= stable_for:
            return status
    stuck = [(e["worker"]["workerId"], e["worker"]["status"]) for e in status["workers"]
             if e["worker"]["status"] in ("queued", "crashed")]
    raise AssertionError(f"system never settled: {stuck}")


@pytest.mark.parametrize("broker", ["one node", "a cluster"])
async def test_services_killed_mid_traffic_keep_every_invariant(
    tmp_path: Path, broker: str, request: pytest.FixtureRequest,
) -> None:
    rng = random.Random(SEED)
    cluster: RabbitCluster | None = None
    amqp_url = None
    if broker == "a cluster":
        cluster = request.getfixturevalue("rabbit_cluster")
        for name in set(cluster.names) - set(cluster.running()):
            cluster.restart(name)
        amqp_url = cluster.vhost_url(f"chaos-{SEED}-{os.getpid()}")
    system = System(tmp_path, hosts=2, amqp_url=amqp_url)
    await system.start()
    try:
        users: dict[str, GatewayClient] = {}
        limits: dict[str, int] = {}
        for tier, limit in TIERS.items():
            name, client = await system.user(f"chaos-{tier}")
            if tier != "free":
                await system.admin.upgrade(name, tier, 1)
            users[name], limits[name] = client, limit

        seen: set[str] = set()
        stop = asyncio.Event()
        async with NeverTwice(seen).running() as guard:
            load = asyncio.create_task(traffic(rng, users, stop, seen))
            kills = asyncio.create_task(chaos(rng, system, stop, cluster))
            await asyncio.sleep(DURATION)
            stop.set()
            outcomes, killed = await load, await kills
            live = await settled(system)
        assert guard.doubles == [], f"a worker ran twice: {guard.doubles}"
        print("chaos:", dict(outcomes), killed)
        assert outcomes["started"] > 5 and killed, (outcomes, killed)
        if cluster is not None:
            assert set(killed) & set(cluster.names), killed  # a broker node was among them
            assert set(cluster.running()) == set(cluster.names)  # every killed node rejoined
            assert len(cluster.cluster_members()) == len(cluster.names)

        log = await system.log()
        ids = [e.event_id for e in log]
        assert len(ids) == len(set(ids)), "an event was recorded twice"

        # Exactly one decision per requested job, and no semantic duplicates.
        decisions = Counter(
            e.payload["job_id"]
            for e in log
            if e.type in ("JobAccepted", "JobRejected")
            and e.payload.get("reason") != "circuit_open"
        )
        assert all(n == 1 for n in decisions.values()), decisions.most_common(3)
        starts = Counter(
            (e.payload["worker_id"], e.payload["attempt"])
            for e in log
            if e.type in ("WorkerSpawned", "WorkerRestarted")
        )
        assert all(n == 1 for n in starts.values()), starts.most_common(3)

        # No limit exceeded: slots held (accepted, not yet ended) per user, in log order.
        held: dict[str, set[str]] = defaultdict(set)
        for e in log:
            if e.type == "JobAccepted":
                held[e.user_id].add(e.payload["job_id"])
                assert len(held[e.user_id]) <= limits[e.user_id], f"{e.user_id} over its limit"
            elif e.type in ENDINGS:
                held[e.user_id].discard(e.payload["job_id"])

        # No accepted job lost: each one runs, or ended, in the settled live state.
        accepted = {e.payload["worker_id"] for e in log if e.type == "JobAccepted"}
        final = {e["worker"]["workerId"]: e["worker"]["status"] for e in live["workers"]}
        assert accepted <= set(final)
        assert {final[w] for w in accepted} <= {"running", "stopped", "failed"}

        # Every event is on the stream of what the projections key it by (its job, its user, its
        # host): a long replay folds streams apart, in partitions.
        job_of = {e.payload["worker_id"]: e.payload["job_id"] for e in log
                  if e.type == "JobRequested"}
        for e in log:
            if "worker_id" in e.payload:
                job = e.payload.get("job_id") or job_of[e.payload["worker_id"]]
                assert e.stream == f"job-{job}", e
            elif e.type.startswith("Entitlement"):
                assert e.stream == f"user-{e.user_id}", e
            elif e.type in ("HostOnline", "HostLost"):
                assert e.stream == f"host-{e.payload['host_id']}", e

        # Live projections equal a replay of the log; the chain is intact.
        replayed = system.replay()
        assert replayed["queueStats"] == live["queueStats"]
        assert {
            e["worker"]["workerId"]: e["worker"]["status"] for e in replayed["workers"]
        } == final
        verify = system.runner("audit", "verify", check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        await system.stop()
