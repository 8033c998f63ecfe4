"""A broker outage on the in-memory bus (`MemoryBroker.go_offline` … `go_online`): what is
committed meanwhile is published once the bus is back, without a warning per attempt; a
worker-host renews its lease the moment the bus is back; the gateway answers 503 with
Retry-After, at once, to what needs the bus, and serves what it holds itself."""

from __future__ import annotations

import logging
import time

import httpx
import pytest

from events import HostHeartbeat, JobQueued
from services.gateway.service import RETRY_AFTER, GatewayService
from services.memory_bus import MemoryBus
from services.settings import Settings
from services.store import OutboxRelay, Store
from services.topology import MONITOR_TELEMETRY
from services.worker_host.service import WorkerHostService
from tests.handlers.conftest import Harness

TOKEN = "test-admin-token-of-32-characters-at-least"


async def test_what_commits_during_an_outage_is_published_once_the_bus_is_back(
        harness: Harness, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.database_for("probe"))
    await store.open()
    relay = OutboxRelay(store, MemoryBus(harness.broker, settings, "probe"))
    relay.start()
    try:
        harness.broker.go_offline()
        async with store.transaction() as uow:
            uow.emit(JobQueued(job_id="j1", worker_id="w1"), stream="job-j1")
        await harness.until(lambda: relay.lag == 1, "the row handed to the relay")
        assert harness.of(JobQueued) == []

        harness.broker.go_online()
        await harness.until(lambda: harness.of(JobQueued), "JobQueued published")
        assert [m.job_id for m in harness.of(JobQueued)] == ["j1"]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        await relay.stop()
        await store.close()


async def test_a_host_renews_its_lease_the_moment_the_bus_is_back(harness: Harness) -> None:
    slow_beats = harness.settings.model_copy(update={
        "host_id": "h-1", "host_heartbeat_interval": 60.0, "host_lease": 120.0})
    beats: list[HostHeartbeat] = []
    monitor = MemoryBus(harness.broker, slow_beats, "monitor")
    monitor.subscribe_telemetry(MONITOR_TELEMETRY, lambda m: beats.append(m)
                                if isinstance(m, HostHeartbeat) else None)
    await monitor.start()
    try:
        host = await harness.start(WorkerHostService, slow_beats)
        await harness.until(lambda: beats, "the first beat")
        harness.broker.go_offline()
        back = host.lease.clock()
        harness.broker.go_online()  # the next beat is due in a minute: only the return sends one
        await harness.until(lambda: (host.lease.renewed_at or 0) >= back,
                            "the lease renewed by a beat sent on the bus's return", timeout=2.0)
        assert len(beats) == 2
    finally:
        await monitor.close()


async def test_the_gateway_answers_503_with_retry_after_at_once_while_the_bus_is_down(
        harness: Harness, settings: Settings) -> None:
    settings = settings.model_copy(update={"admin_token": TOKEN})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    gateway = GatewayService(settings, bus=MemoryBus(harness.broker, settings, "gateway"))
    await gateway.store.open()
    await gateway.bus.start()
    assert gateway.bus.connected()
    harness.broker.go_offline()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app),
                                     base_url="http://gateway",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            start = {"userId": "u-1", "strategyId": "s-1", "brokerId": "paper",
                     "credentials": {"apiKey": "k", "apiSecret": "s"},
                     "config": {"name": "hold", "type": "hold", "parameters": {},
                                "instruments": ["BTC-PERPETUAL"]}}
            for method, path, body in (
                    ("GET", "/runner/status", None),
                    ("POST", "/runner/start", start),
                    ("POST", "/runner/stop", {"workerId": "w-1"}),
                    ("GET", "/admin/hosts", None),
                    ("GET", "/entitlements/u-1", None)):
                began = time.monotonic()
                response = await http.request(method, path, json=body)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["retry-after"] == str(RETRY_AFTER)
                assert "unavailable" in response.json()["error"]
                assert time.monotonic() - began < 1.0
            for path in ("/me", "/admin/users", "/strategies", "/health"):  # what it holds
                assert (await http.get(path)).status_code == 200, path
            assert (await http.get("/health")).json()["connected"] is False
    finally:
        harness.broker.go_online()
        await gateway.bus.close()
        await gateway.store.close()
