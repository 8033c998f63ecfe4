"""The gateway's metrics and health on its API port: `/metrics`, `/health/live`,
`/health/ready` (ready: started and broker connected)."""

# no `from __future__ import annotations`: FastAPI reads the route signatures
from typing import Any

from fastapi import FastAPI, Response

from services import metrics, observability


def add_routes(app: FastAPI, gateway: Any) -> None:
    metrics.watch("runner_event_streams", "Open event streams (GET /events)", (),
                  lambda: [((), float(gateway.tail.subscribers))])
    metrics.watch("runner_event_stream_position", "The last log position the gateway read", (),
                  lambda: [((), float(gateway.tail.position))])

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        """Prometheus metrics of this gateway (open, like the health checks)."""
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    @app.get("/health/live")
    async def live() -> dict[str, bool]:
        """The process answers."""
        return {"alive": True}

    @app.get("/health/ready", responses={503: {"description": "not ready"}})
    async def ready(response: Response) -> dict[str, bool]:
        """Started and connected to the broker (else 503)."""
        is_ready, parts = observability.readiness(gateway)
        if not is_ready:
            response.status_code = 503
        return parts
