"""The whole system on a three-node RabbitMQ cluster (private nodes beside the default one):
`kill -9` of the node leading the busiest queues (the scheduler's inbox, the monitor's log)
while users start, stop and look: no runner restarted, every command answered with success
taking effect exactly once, no 5xx but 503, and the node, restarted, rejoins."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from services.cli.client import GatewayClient, GatewayError
from services.topology import MONITOR_LOG, SCHEDULER_INBOX
from tests.e2e.conftest import System, start_body
from tests.e2e.test_broker_outage import poll_status
from tests.e2e.test_lifecycle import alive
from tests.integration.broker_helpers import until
from tests.rabbit_nodes import RabbitCluster

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.broker]

REQUEST_TIMEOUT = 5.0
LEASED = {  # a lease far longer than a failover, far shorter than the defaults
    "RUNNER_HOST_LEASE": "5",
    "RUNNER_HOST_HEARTBEAT_INTERVAL": "0.5",
    "RUNNER_HOST_TIMEOUT": "10",
    "RUNNER_HEARTBEAT_INTERVAL": "0.5",
    "RUNNER_HEARTBEAT_TIMEOUT": "10",
    "RUNNER_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
}
ANSWERED_AFTER_KILL = 12  # starts and stops answered with success after the kill


class Traffic:
    """Starts and stops, one after the other, as a user would: what was answered."""

    def __init__(self, client: GatewayClient) -> None:
        self.client = client
        self.started: list[str] = []  # answered with success
        self.stopped: list[str] = []
        self.answers: Counter[int] = Counter()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                answer = await self.client.start(**start_body("hold", amount=1))
                self.started.append(answer["workerId"])
                self.answers[200] += 1
            except GatewayError as exc:
                self.answers[exc.status] += 1
            if len(self.started) > len(self.stopped) + 2:
                victim = self.started[len(self.stopped)]
                try:
                    await self.client.stop(victim)
                    self.stopped.append(victim)
                    self.answers[200] += 1
                except GatewayError as exc:
                    self.answers[exc.status] += 1
                    if exc.status == 503:  # not stopped: tried again next turn
                        continue
                    raise
            await asyncio.sleep(0.1)  # a user's pace, not a wait for a condition


def busiest_leader(cluster: RabbitCluster, vhost: str) -> str:
    """The node leading the scheduler's inbox and the monitor's log (or the first of them)."""
    leaders = cluster.leaders(vhost)
    counted = Counter(leaders[q.name] for q in (SCHEDULER_INBOX, MONITOR_LOG))
    return counted.most_common(1)[0][0]


async def test_killing_the_busiest_node_restarts_nothing_and_loses_nothing(
    tmp_path: Path, rabbit_cluster: RabbitCluster,
) -> None:
    for name in set(rabbit_cluster.names) - set(rabbit_cluster.running()):
        rabbit_cluster.restart(name)
    vhost = f"e2e-{uuid.uuid4().hex[:10]}"
    system = System(tmp_path, amqp_url=rabbit_cluster.vhost_url(vhost), **LEASED)
    await system.start()
    victim = None
    try:
        _, client = await system.user(tier="enterprise")
        pids = await system.running_workers(client, 2)
        before = list(pids)

        traffic = Traffic(client)
        polled: list[tuple[int, str | None, float]] = []
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=system.base_url, timeout=30,
                                     headers=dict(client.http.headers)) as raw:
            tasks = [asyncio.create_task(traffic.run(stop)),
                     asyncio.create_task(poll_status(raw, stop, polled))]
            await until(lambda: traffic.answers[200] >= 3, 30, "traffic flowing before the kill")
            victim = busiest_leader(rabbit_cluster, vhost)
            rabbit_cluster.kill(victim)
            answered = traffic.answers[200]
            await until(lambda: traffic.answers[200] >= answered + ANSWERED_AFTER_KILL, 60,
                        "starts and stops answered again after the kill")
            stop.set()
            await asyncio.gather(*tasks)
        await asyncio.to_thread(rabbit_cluster.restart, victim)
        assert victim in rabbit_cluster.cluster_members(via=victim)  # it rejoined

        assert traffic.started and traffic.stopped, traffic.answers
        for wid in traffic.stopped:
            await system.wait_for_worker(client, wid, lambda e: e["worker"]["status"] == "stopped")
        running = [w for w in (*before, *traffic.started) if w not in traffic.stopped]
        for wid in running:
            await system.wait_for_worker(client, wid, lambda e: e["worker"]["status"] == "running")
        status = await client.status()
        workers = {e["worker"]["workerId"]: e["worker"] for e in status["workers"]}
        for wid in before:
            assert workers[wid]["pid"] == pids[wid] and alive(pids[wid])
            assert workers[wid]["restartCount"] == 0
        log = await system.wait_for_log(lambda events: all(
            any(e.type == "WorkerStopped" and e.payload["worker_id"] == wid for e in events)
            for wid in traffic.stopped))
        ran = Counter((e.type, e.payload.get("worker_id")) for e in log
                      if e.type in ("WorkerSpawned", "WorkerRestarted", "WorkerCrashed",
                                    "WorkerStopped", "HeartbeatMissed", "HostLost"))
        assert ran == Counter({("WorkerSpawned", wid): 1 for wid in workers}
                              | {("WorkerStopped", wid): 1 for wid in traffic.stopped}), ran
        failures = [code for code, _, _ in polled if code >= 500 or code == 0]
        failures += [code for code, n in traffic.answers.items() for _ in range(n) if code >= 500]
        assert set(failures) <= {503}, (failures, traffic.answers)
        logged = system.log_path.read_text()
        moved = logged.count("lost the connection to the broker")
        print(f"killed {victim}: {moved} connections moved, {logged.count(' nacked')} publishes "
              f"nacked; answers {dict(traffic.answers)}, polled "
              f"{dict(Counter(c for c, _, _ in polled))}")
        assert "Traceback" not in logged, logged[logged.index("Traceback") - 2000:][:6000]
        assert "fenced" not in logged
    finally:
        await system.stop()
        if victim is not None and victim not in rabbit_cluster.running():
            with contextlib.suppress(Exception):
                rabbit_cluster.restart(victim)
        rabbit_cluster.delete_vhost(vhost)
