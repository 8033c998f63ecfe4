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

    async def monitor(body: dict[str, Any]) -> Any:
        if body["op"] in ("head", "log"):  # the gateway's tail of the event log
            return {"position": 0} if body["op"] == "head" else []
        assert body["op"] == "status"
        return RawJson(sent)

    async with gateway_against(settings, monitor=monitor) as http:
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
    async def entitlement(body: dict[str, Any]) -> Any:
        assert body["op"] == "start"
        command = Envelope.model_validate(body["envelope"])
        started = command.message()
        accepted = JobAccepted(job_id=started.job_id, worker_id=started.worker_id, tier="pro",
                               max_workers=10, in_use=0)
        return RawJson(Envelope.wrap(accepted, stream=command.stream, causation=command)
                       .to_json())

    queries: list[dict[str, Any]] = []

    async def monitor(body: dict[str, Any]) -> Any:
        if body["op"] in ("head", "log"):  # the gateway's tail of the event log
            return {"position": 0} if body["op"] == "head" else []
        queries.append(body)
        return {"success": True, "workers": [], "queueStats": {}}

    async with gateway_against(settings, entitlement=entitlement, monitor=monitor) as http:
        started = await http.post("/runner/start", json={
            "userId": "alice", "strategyId": "s1", "brokerId": "paper",
            "credentials": {"apiKey": "k", "apiSecret": "s"},
            "config": {"name": "BTC", "type": "hold"}})
        assert started.status_code == 200, started.text
        worker_id = started.json()["workerId"]
        assert not queries, "the start waited for the monitor"
        for params in ({"userId": "bob"}, {"userId": "alice"}, {}):
            assert (await http.get("/runner/status", params=params)).status_code == 200
    assert [(q["user_id"], q.get("known"), q.get("wait")) for q in queries] == [
        ("bob", None, None), ("alice", [worker_id], 2.0), (None, None, None)]
