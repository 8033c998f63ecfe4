"""A small HTTP client of the gateway, for the CLI and the demo; and how to print its answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
import orjson
from rich.table import Table

from services.settings import Settings


class GatewayError(RuntimeError):
    """The gateway answered `{success: false}` or could not be reached."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status


class GatewayClient:
    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        )

    @classmethod
    def for_settings(cls, settings: Settings, token: str) -> GatewayClient:
        return cls(f"http://{settings.http_host}:{settings.http_port}", token)

    async def close(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise GatewayError(0, f"gateway unreachable at {self.http.base_url}: {exc}") from None
        try:
            body = orjson.loads(response.content)  # a large status decodes faster than with json
        except ValueError:
            raise GatewayError(response.status_code, f"HTTP {response.status_code}") from None
        if response.status_code >= 400 or body.get("success") is False:
            raise GatewayError(response.status_code, str(body.get("error", body)))
        return body

    async def start(self, **body: Any) -> dict[str, Any]:
        return await self.call("POST", "/runner/start", json=body)

    async def stop(self, worker_id: str, flatten: bool = False) -> dict[str, Any]:
        return await self.call(
            "POST", "/runner/stop", json={"workerId": worker_id, "flattenPositions": flatten}
        )

    async def halt(self, user_id: str | None = None, everyone: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"userId": user_id} if user_id else {}
        return await self.call("POST", "/runner/halt", json=body | (
            {"all": True} if everyone else {}))

    async def status(self, user_id: str | None = None, *, offset: int = 0,
                     limit: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"userId": user_id} if user_id else {}
        if limit is not None:
            params |= {"offset": offset, "limit": limit}
        return await self.call("GET", "/runner/status", params=params or None)

    async def add_user(self, user_id: str) -> str:
        return (await self.create_user(user_id))["token"]

    async def create_user(self, user_id: str,
                          expires_in_days: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"userId": user_id}
        if expires_in_days is not None:
            body["expiresInDays"] = expires_in_days
        return await self.call("POST", "/admin/users", json=body)

    async def rotate_token(self, user_id: str,
                           expires_in_days: float | None = None) -> dict[str, Any]:
        body = {"expiresInDays": expires_in_days} if expires_in_days is not None else None
        return await self.call("POST", f"/admin/users/{user_id}/token", json=body)

    async def revoke_token(self, user_id: str) -> dict[str, Any]:
        return await self.call("DELETE", f"/admin/users/{user_id}/token")

    async def upgrade(self, user_id: str, tier: str, days: float) -> dict[str, Any]:
        return await self.call(
            "POST", f"/entitlements/{user_id}/upgrade", json={"tier": tier, "days": days}
        )

    async def entitlement(self, user_id: str) -> dict[str, Any]:
        return await self.call("GET", f"/entitlements/{user_id}")

    async def users(self) -> list[str]:
        return (await self.call("GET", "/admin/users"))["users"]

    async def hosts(self) -> list[dict[str, Any]]:
        return (await self.call("GET", "/admin/hosts"))["hosts"]


def when(ms: int | None) -> str:
    """An epoch-milliseconds time as local `HH:MM:SS` (a date too when not today)."""
    if ms is None:
        return "–"
    moment = datetime.fromtimestamp(ms / 1000)
    today = moment.date() == datetime.now().date()
    return f"{moment:%H:%M:%S}" if today else f"{moment:%Y-%m-%d %H:%M:%S}"


def status_table(status: dict[str, Any], title: str = "Runners",
                 page: dict[str, int] | None = None) -> Table:
    """Workers with their positions and P&L, and the queue figures in the caption (and which
    page of the workers this is, with `page`)."""
    q = status.get("queueStats", {})
    shown = (f" · runners {page['offset'] + 1}–{page['offset'] + len(status.get('workers', []))}"
             f" of {page['total']}" if page else "")
    table = Table(
        title=title,
        caption=(
            f"queued {q.get('queuedJobs', 0)} · running {q.get('runningWorkers', 0)} · "
            f"total {q.get('totalWorkers', 0)} · failed {q.get('failedJobs', 0)}{shown}"
        ),
    )
    for column in (
        "worker",
        "user",
        "strategy",
        "status",
        "pid",
        "host",
        "restarts",
        "positions",
        "unrealized",
        "trades",
        "win %",
        "P&L",
    ):
        table.add_column(
            column,
            justify="right"
            if column in ("pid", "restarts", "unrealized", "trades", "win %", "P&L")
            else "left",
        )
    for entry in status.get("workers", []):
        w, stats, positions = entry["worker"], entry["stats"], entry["positions"]
        colour = {"running": "green", "crashed": "red", "failed": "red", "queued": "yellow"}.get(
            w["status"], "dim"
        )
        table.add_row(
            w["workerId"],
            w["userId"],
            w["strategyId"],
            f"[{colour}]{w['status']}[/]",
            str(w.get("pid") or "–"),
            str(w.get("hostId") or "–"),
            str(w.get("restartCount", 0)),
            ", ".join(
                f"{p['side']} {p['amount']:g} {p['instrumentName']} @ {p['entryPrice']:,.2f}"
                for p in positions
            )
            or "–",
            f"{sum(p['unrealizedPnL'] for p in positions):,.2f}",
            str(stats["totalTrades"]),
            f"{stats['winRate']:.0f}",
            f"{stats['totalPnL']:,.2f}",
        )
    return table
