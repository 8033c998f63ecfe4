"""The gateway's status against stand-ins for the monitor and the entitlement service: a large
status passes on as the monitor sent it, deflated to a client that takes `deflate` (nothing
inflated or re-compressed on the way), plain or gzipped to one that does not; a status right
after a start reads that start."""

from __future__ import annotations

import zlib
from typing import Any

import orjson
import pytest

from events import Envelope, JobAccepted
from events.queries import DecideStart, StatusQuery
from services.bus import COMPRESS_REPLIES_FROM, RawJson
from services.settings import Settings
from tests.integration.broker_helpers import gateway_against

pytestmark = pytest.mark.broker


async def test_a_large_status_passes_through_deflated_or_plain(settings: Settings) -> None:
    document = {"success": True, "queueStats": {"queuedJobs": 0},
                "workers": [{"worker": {"workerId": f"w-{n}", "status": "running"}}
                            for n in range(2000)]}
    sent = orjson.dumps(document)
    assert len(sent) > COMPRESS_REPLIES_FROM

    async def status(query: StatusQuery) -> Any:
        return RawJson(sent)

    async with gateway_against(settings, monitor={StatusQuery: status}) as http:
        answers = {}
        for accept in ("deflate", "gzip, deflate, br", "identity", "gzip"):
            response = await http.get("/runner/status", headers={"Accept-Encoding": accept})
            assert response.status_code == 200, response.text
            assert response.json() == document
            answers[accept] = response.headers.get("content-encoding")
        assert answers == {"deflate": "deflate", "gzip, deflate, br": "deflate",
                           "identity": None, "gzip": "gzip"}
        async with http.stream("GET", "/runner/status",
                               headers={"Accept-Encoding": "deflate"}) as response:
            wire = b"".join([chunk async for chunk in response.aiter_raw()])
        assert wire == zlib.compress(sent, 1)  # the monitor's own bytes


async def test_a_status_after_a_start_asks_the_monitor_to_wait_for_the_new_worker(
        settings: Settings) -> None:
    """A start is answered once the entitlement service has decided it, before the monitor
    shows the worker; the next status call that could show it (not another user's) asks the
    monitor to wait until it does, and the one after that no longer waits."""
    async def decide(query: DecideStart) -> Any:
        command = query.envelope
        started = command.message()
        accepted = JobAccepted(job_id=started.job_id, worker_id=started.worker_id, tier="pro",
                               max_workers=10, in_use=0)
        return RawJson(Envelope.wrap(accepted, stream=command.stream, causation=command)
                       .to_json())

    queries: list[StatusQuery] = []

    async def status(query: StatusQuery) -> Any:
        queries.append(query)
        return {"success": True, "workers": [], "queueStats": {}}

    async with gateway_against(settings, entitlement={DecideStart: decide},
                               monitor={StatusQuery: status}) as http:
        started = await http.post("/runner/start", json={
            "userId": "alice", "strategyId": "s1", "brokerId": "paper",
            "credentials": {"apiKey": "k", "apiSecret": "s"},
            "config": {"name": "BTC", "type": "hold"}})
        assert started.status_code == 200, started.text
        worker_id = started.json()["workerId"]
        assert not queries, "the start waited for the monitor"
        for params in ({"userId": "bob"}, {"userId": "alice"}, {}):
            assert (await http.get("/runner/status", params=params)).status_code == 200
    assert [(q.user_id, q.known, q.wait) for q in queries] == [
        ("bob", (), 0.0), ("alice", (worker_id,), 2.0), (None, (), 0.0)]


async def test_a_strategy_may_name_an_allowed_image_and_no_other(settings: Settings) -> None:
    """`config.image` on the allow-list (RUNNER_CONTAINER_IMAGES, or the default worker image)
    travels with the start; any other is refused at the gateway, saying which are allowed."""
    decided: list[str | None] = []

    async def decide(query: DecideStart) -> Any:
        command = query.envelope
        started = command.message()
        decided.append(started.config.image)
        accepted = JobAccepted(job_id=started.job_id, worker_id=started.worker_id, tier="pro",
                               max_workers=10, in_use=0)
        return RawJson(Envelope.wrap(accepted, stream=command.stream, causation=command)
                       .to_json())

    allowing = settings.model_copy(update={"container_images": ["strategies/ta:1"]})
    body = {"userId": "alice", "strategyId": "s1", "brokerId": "paper",
            "credentials": {"apiKey": "k", "apiSecret": "s"}}
    async with gateway_against(allowing, entitlement={DecideStart: decide}) as http:
        for image in ("strategies/ta:1", "runner-worker:latest"):
            started = await http.post("/runner/start", json=body | {
                "config": {"name": "BTC", "type": "hold", "image": image}})
            assert started.status_code == 200, started.text
        refused = await http.post("/runner/start", json=body | {
            "config": {"name": "BTC", "type": "hold", "image": "someone/miner:latest"}})
    assert refused.status_code == 422 and refused.json()["success"] is False
    error = refused.json()["error"]
    assert "config.image" in error and "'someone/miner:latest' is not an allowed" in error
    assert "strategies/ta:1" in error
    assert decided == ["strategies/ta:1", "runner-worker:latest"]
