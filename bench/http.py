"""The benchmarks' HTTP client: aiohttp over keep-alive connections, lean on purpose.

The benchmarks time the gateway's answers, and their load generator shares the machine's two
cores with the system under test. Against a bare keep-alive socket, at idle on the bench VM
(2026-11-27), the CLI's client (httpx) added 2.6–3.0 ms to a `GET /health` (1.1 ms bare) and
about 5 ms to a start (9.7 ms bare); aiohttp adds 0.4–1.3 ms. Timed through httpx, a figure would
be the client's as much as the gateway's.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from services.cli.client import GatewayClient, GatewayError


class BenchClient:
    """One user's (the token of `like`) calls to the gateway `like` talks to."""

    def __init__(self, like: GatewayClient) -> None:
        self.session = aiohttp.ClientSession(
            base_url=str(like.http.base_url),
            headers={"Authorization": like.http.headers["Authorization"]},
            connector=aiohttp.TCPConnector(limit=0),  # as many connections as calls in flight
            json_serialize=lambda value: orjson.dumps(value).decode(),
        )

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str, **params: Any) -> bytes:
        """The body of a successful GET, as received (inflated, not parsed)."""
        async with self.session.get(path, params=params or None) as response:
            body = await response.read()
        if response.status != 200:
            raise GatewayError(response.status, body[:200].decode(errors="replace"))
        return body

    async def start(self, **body: Any) -> dict[str, Any]:
        async with self.session.post("/runner/start", json=body) as response:
            payload = orjson.loads(await response.read())
        if response.status >= 400 or payload.get("success") is False:
            raise GatewayError(response.status, str(payload.get("error", payload)))
        return payload
