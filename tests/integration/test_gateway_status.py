"""The gateway passes a large status on as the monitor sent it: deflated to a client that takes
`deflate` (nothing inflated or re-compressed on the way), plain or gzipped to one that does not."""

from __future__ import annotations

import zlib
from typing import Any

import httpx
import orjson
import pytest

from services.bus import COMPRESS_REPLIES_FROM, Bus, RawJson
from services.cli.local import free_port
from services.gateway.service import GatewayService
from services.settings import Settings
from services.topology import rpc_queue

pytestmark = pytest.mark.broker

TOKEN = "status-test-admin-token"


async def test_a_large_status_passes_through_deflated_or_plain(settings: Settings) -> None:
    document = {"success": True, "queueStats": {"queuedJobs": 0},
                "workers": [{"worker": {"workerId": f"w-{n}", "status": "running"}}
                            for n in range(2000)]}
    sent = orjson.dumps(document)
    assert len(sent) > COMPRESS_REPLIES_FROM

    async def monitor(body: dict[str, Any]) -> Any:
        assert body["op"] == "status"
        return RawJson(sent)

    fake_monitor = Bus(settings, "monitor")
    fake_monitor.serve(rpc_queue("monitor"), monitor)
    await fake_monitor.start()
    port = free_port()
    gateway = GatewayService(settings.model_copy(update={"http_port": port,
                                                         "admin_token": TOKEN}))
    await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as http:
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
    finally:
        await gateway.stop()
        await fake_monitor.close()
