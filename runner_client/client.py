"""`RunnerClient`: the gateway's HTTP API, typed, and its event stream with resume."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx

from runner_client.models import (
    Entitlement,
    Event,
    Halted,
    Host,
    Started,
    Status,
    Stopped,
    Upgraded,
)
from runner_client.sse import parse


class RunnerError(RuntimeError):
    """The gateway refused a call (`status` its HTTP status, 0: unreachable) or cut a stream."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status


class RunnerClient:
    """One user's (or the admin's) connection to a gateway; `async with` closes it.

    ```python
    async with RunnerClient("http://127.0.0.1:8080", token) as runner:
        started = await runner.start("hold", parameters={"amount": 2})
        async for event in runner.events(worker_id=started.worker_id):
            print(event.position, event.type)
    ```
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                      headers={"Authorization": f"Bearer {token}"},
                                      transport=transport)

    async def __aenter__(self) -> RunnerClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One request; the JSON answer, or `RunnerError` with the gateway's error."""
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RunnerError(0, f"gateway unreachable at {self.base_url}: {exc}") from None
        return _answer(response)

    # ------------------------------------------------------------------ runners

    async def start(self, strategy: str, *, instruments: Iterable[str] = ("BTC-PERPETUAL",),
                    parameters: dict[str, Any] | None = None, broker_id: str = "paper",
                    api_key: str = "paper-key", api_secret: str = "paper-secret",
                    strategy_id: str | None = None, name: str | None = None,
                    risk_management: dict[str, float] | None = None,
                    flatten_on_stop: bool = True, user_id: str | None = None) -> Started:
        """Start a runner of `strategy`; answered once the entitlement decision is made."""
        instruments = list(instruments)
        config: dict[str, Any] = {"name": name or strategy_id or strategy, "type": strategy,
                                  "parameters": parameters or {}, "instruments": instruments}
        if risk_management is not None:
            config["riskManagement"] = risk_management
        body: dict[str, Any] = {
            "strategyId": strategy_id or f"{strategy}-{instruments[0].lower()}",
            "brokerId": broker_id,
            "credentials": {"apiKey": api_key, "apiSecret": api_secret},
            "config": config,
            "flattenOnStop": flatten_on_stop,
        }
        if user_id is not None:
            body["userId"] = user_id
        return Started.model_validate(await self.call("POST", "/runner/start", json=body))

    async def stop(self, worker_id: str, *, flatten: bool = False,
                   user_id: str | None = None) -> Stopped:
        """Stop a runner (closing its positions first with `flatten`); answered once stopped."""
        body: dict[str, Any] = {"workerId": worker_id, "flattenPositions": flatten}
        if user_id is not None:
            body["userId"] = user_id
        return Stopped.model_validate(await self.call("POST", "/runner/stop", json=body))

    async def halt(self, *, user_id: str | None = None, everyone: bool = False) -> Halted:
        """The kill switch: stop every runner of a user (by default the caller; the admin: any
        user, or all of them with `everyone`) with flatten, at once."""
        body: dict[str, Any] = {"all": True} if everyone else (
            {"userId": user_id} if user_id else {})
        return Halted.model_validate(await self.call("POST", "/runner/halt", json=body))

    async def status(self, *, user_id: str | None = None, offset: int = 0,
                     limit: int | None = None) -> Status:
        """Runners with positions and P&L, and the queue figures (one page with `limit`)."""
        params: dict[str, Any] = {"userId": user_id} if user_id else {}
        if limit is not None:
            params |= {"offset": offset, "limit": limit}
        return Status.model_validate(await self.call("GET", "/runner/status", params=params))

    async def strategies(self) -> dict[str, dict[str, Any]]:
        """Each installed strategy's parameters as a JSON schema."""
        return (await self.call("GET", "/strategies"))["strategies"]

    # ------------------------------------------------------------------ users (admin)

    async def entitlement(self, user_id: str) -> Entitlement:
        return Entitlement.model_validate(await self.call("GET", f"/entitlements/{user_id}"))

    async def upgrade(self, user_id: str, tier: str, days: float) -> Upgraded:
        return Upgraded.model_validate(await self.call(
            "POST", f"/entitlements/{user_id}/upgrade", json={"tier": tier, "days": days}))

    async def add_user(self, user_id: str, *, expires_in_days: float | None = None) -> str:
        """Create a user; their bearer token (shown once), lapsing after `expires_in_days`."""
        body: dict[str, Any] = {"userId": user_id}
        if expires_in_days is not None:
            body["expiresInDays"] = expires_in_days
        return (await self.call("POST", "/admin/users", json=body))["token"]

    async def rotate_token(self, user_id: str, *, expires_in_days: float | None = None) -> str:
        """A new token for the user (shown once); the old one is refused from now on."""
        body = {"expiresInDays": expires_in_days} if expires_in_days is not None else None
        return (await self.call("POST", f"/admin/users/{user_id}/token", json=body))["token"]

    async def revoke_token(self, user_id: str) -> None:
        """The user's token refused from now on (every gateway within a second)."""
        await self.call("DELETE", f"/admin/users/{user_id}/token")

    async def rotate_admin_token(self) -> str:
        """A new admin token (shown once; saved in the gateway's token file). This client
        goes on with the new one."""
        token = (await self.call("POST", "/admin/token"))["token"]
        self.http.headers["Authorization"] = f"Bearer {token}"
        return token

    async def users(self) -> list[str]:
        return (await self.call("GET", "/admin/users"))["users"]

    async def hosts(self) -> list[Host]:
        return [Host.model_validate(h) for h in (await self.call("GET", "/admin/hosts"))["hosts"]]

    # ------------------------------------------------------------------ events

    async def events(self, *, after: int | None = None, user_id: str | None = None,
                     types: Iterable[str] = (), worker_id: str | None = None,
                     job_id: str | None = None, follow: bool = True,
                     reconnect: bool = True) -> AsyncIterator[Event]:
        """The caller's events from after position `after` (None: from now on), history then
        live; without `follow`, up to the present only. A dropped connection, or a stream the
        gateway cut, resumes after the last event received (none lost, none twice) unless
        `reconnect` is False (then `RunnerError`)."""
        params: dict[str, Any] = {"type": list(types)} if types else {}
        params |= {k: v for k, v in (("userId", user_id), ("workerId", worker_id),
                                     ("jobId", job_id)) if v is not None}
        if not follow:
            params["follow"] = "false"
        last, pause = after, 0.2
        while True:
            headers = {} if last is None else {"Last-Event-ID": str(last)}
            try:
                async with self.http.stream("GET", "/events", params=params, headers=headers,
                                            timeout=httpx.Timeout(None, connect=10.0)
                                            ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        _answer(response)
                    async for sse in parse(response.aiter_lines()):
                        if sse is None:
                            continue
                        if sse.event == "end":
                            return
                        if sse.event in ("dropped", "error"):
                            raise _Cut(json.loads(sse.data).get("error", sse.event))
                        if sse.id is None:
                            continue
                        event = Event(position=int(sse.id), type=sse.event,
                                      envelope=json.loads(sse.data))
                        last, pause = event.position, 0.2
                        yield event
                if not follow:
                    return
            except (_Cut, httpx.TransportError) as exc:
                if not reconnect:
                    raise RunnerError(0, f"event stream cut: {exc}") from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


class _Cut(Exception):
    """The gateway ended a stream early (too slow, stopping, the log unavailable)."""


def _answer(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise RunnerError(response.status_code, f"HTTP {response.status_code}") from None
    if response.status_code >= 400 or (isinstance(body, dict) and body.get("success") is False):
        error = body.get("error", body) if isinstance(body, dict) else body
        raise RunnerError(response.status_code, str(error))
    return body
