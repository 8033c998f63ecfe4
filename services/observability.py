"""A service's metrics and health over HTTP, on a port of its own (`RUNNER_METRICS_PORT`; the
gateway answers the same paths on its API port): `/metrics` (Prometheus text), `/health/live`
(the process answers) and `/health/ready` (started, consuming and connected to the broker, or
a replica standing by in good order: 200, else 503). A few lines of asyncio, not a web
framework: a service off the request path should not carry one for three fixed answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from services import metrics

log = logging.getLogger(__name__)


def readiness(service: Any) -> tuple[bool, dict[str, Any]]:
    """Whether `service` is ready (started and consuming, broker connected), and the parts. A
    replica standing by is ready as it is (an orchestrator must not restart it, nor wait for
    it to become active to roll an update out)."""
    if getattr(service, "replica_lease", None) is not None and not service.active:
        return True, {"ready": True, "standby": True, "started": False}
    started = bool(getattr(service, "ready", False))
    connected = service.bus.connected()
    ready = started and connected
    return ready, {"ready": ready, "started": started, "brokerConnected": connected}


def answer(service: Any, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) for a GET of `path`."""
    if path == "/metrics":
        return 200, metrics.CONTENT_TYPE, metrics.exposition()
    if path == "/health/live":
        return 200, "application/json", b'{"alive":true}'
    if path == "/health/ready":
        ready, parts = readiness(service)
        return (200 if ready else 503), "application/json", json.dumps(parts).encode()
    return 404, "application/json", b'{"error":"not found"}'


async def serve(service: Any, host: str, port: int) -> asyncio.Server:
    """Answer the three paths on `host:port` until the returned server is closed."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, kind, body = (answer(service, path.split("?", 1)[0]) if method == "GET"
                                  else (405, "application/json", b'{"error":"GET only"}'))
            writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                         f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
            pass  # a scraper that went away, or garbage: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics and health on http://%s:%d/metrics", host, port)
    return server
