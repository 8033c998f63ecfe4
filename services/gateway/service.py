"""Gateway service: the HTTP contract (README, "HTTP API") over the bus.

A start answers once its entitlement decision has committed, a stop once the worker has stopped,
and status shows every start and stop this gateway has answered (read-your-writes); credentials
are sealed before anything leaves the request handler, never in a response, a log line or an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import timedelta
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from events import (
    EntitlementUpgraded,
    Envelope,
    FlattenFailed,
    JobAccepted,
    JobRejected,
    PositionsFlattened,
    RejectReason,
    StartRunner,
    StopRunner,
    UpgradeEntitlement,
    WorkerStopped,
)
from events.queries import (
    CheckEntitlement,
    Conflict,
    DecideStart,
    HostsQuery,
    Invalid,
    NotFound,
    QueryRefused,
    SlotQuery,
    StatusQuery,
    WorkerQuery,
)
from projections import ENDED
from services import logs
from services.bus import BusUnavailable, CallInterrupted, PublishFailed, RpcError, RpcTimeout
from services.gateway import (
    answers,
    dashboard,
    events_stream,
    observability_routes,
    strategy_schemas,
)
from services.gateway.edge import Edge
from services.gateway.models import (
    ID_PATTERN,
    CreateUserRequest,
    HaltRequest,
    RotateTokenRequest,
    StartRequest,
    StopRequest,
    UpgradeRequest,
    accepts_encoding,
    failed,
    ok,
)
from services.gateway.rate_limit import RateLimiter, retry_after
from services.gateway.users import AdminToken, Caller, UnknownUser, UserDirectory, UserRow
from services.gateway.waiters import Unseen, Waiters
from services.secrets import AdminTokenError, Sealer, admin_token, admin_token_file
from services.service import Service, now
from services.topology import ENTITLEMENT_RPC, GATEWAY_WAITS, MONITOR_RPC, QueueSpec
from services.worker.brokers import UnknownBroker, broker_spec
from services.worker.strategies.base import available_strategies

log = logging.getLogger(__name__)

REJECT_STATUS = {
    RejectReason.WORKER_LIMIT: 403,
    RejectReason.ENTITLEMENT_EXPIRED: 403,
    RejectReason.CIRCUIT_OPEN: 429,
    RejectReason.INVALID_REQUEST: 422,
}


RETRY_AFTER = 2  # seconds a client is told to wait when the bus is unavailable (it reconnects each)
READ_YOUR_WRITES_WAIT = 2.0  # seconds the monitor or entitlement may take to show what was answered
STATUS_PAGE_MAX = 1000  # workers per page of `GET /runner/status?limit=`


class ApiError(Exception):
    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(error)
        self.status, self.error, self.extra, self.headers = status, error, extra, headers


# How long an idle HTTP connection stays open. Longer than clients keep idle connections for
# reuse (httpx: 5 s, uvicorn's own default too): with equal times a client could send a request
# just as the server closed the connection, and get a bare `ReadError`.
HTTP_KEEP_ALIVE = 75.0


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service shell owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class GatewayService(Service):
    name = "gateway"
    tables = (UserRow.__table__,)  # type: ignore[attr-defined]

    def __init__(self, settings: Any, **wiring: Any) -> None:
        super().__init__(settings, **wiring)
        token, created = admin_token(settings)
        token_file = None if settings.admin_token else admin_token_file(settings)
        if created:
            print(f"admin token generated: saved in {token_file} (0600); read it there",
                  flush=True)
        self.users = UserDirectory(self.store, AdminToken(token, token_file),
                                   settings.token_cache_seconds)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self.sealer = Sealer.for_settings(settings)
        # plugins installed later: seen at restart; the fault drills only where enabled
        self.strategies = available_strategies(drills=settings.enable_chaos)
        self.waiters = Waiters()
        self.unseen = Unseen()
        self.tail = events_stream.log_tail(self.bus, settings)
        self.app = create_app(self)
        self._server: _QuietServer | None = None

    async def setup(self) -> None:
        waits = QueueSpec(
            f"gateway.waits.{uuid.uuid4().hex[:12]}",
            bindings=GATEWAY_WAITS,
            kind="transient",
            auto_delete=True,
        )
        self.bus.consume_batches(waits, self.waiters.deliver, max_batch=100)

    async def started(self) -> None:
        self.background(self.tail.run(), "event-log-tail")
        config = uvicorn.Config(
            events_stream.with_server_send(self.app),
            host=self.settings.http_host,
            port=self.settings.http_port,
            log_level="warning",
            lifespan="off",
            timeout_keep_alive=HTTP_KEEP_ALIVE,
        )
        self._server = _QuietServer(config)
        self._http = http = self.background(self._server.serve(), "http")
        while not self._server.started:
            await asyncio.sleep(0.01)
            if http.done():
                http.result()  # raises: e.g. the port is taken
                raise OSError(
                    f"HTTP server on {self.settings.http_host}:{self.settings.http_port} "
                    "did not start"
                )
        log.info(
            "gateway listening on http://%s:%d", self.settings.http_host, self.settings.http_port
        )

    async def drain(self) -> None:
        self.tail.close()  # open event streams end, so the HTTP server can
        if self._server is not None:
            self._server.should_exit = True
            await asyncio.wait({self._http}, timeout=5)

    # ------------------------------------------------------------------ operations

    async def start_runner(self, caller: Caller, body: StartRequest) -> tuple[int, dict[str, Any]]:
        user_id = _acting_user(caller, body.user_id)
        try:
            broker_spec(body.broker_id)
        except UnknownBroker as exc:
            raise ApiError(422, f"brokerId: {exc}") from None
        if body.config.type not in self.strategies:
            raise ApiError(
                422,
                f"config.type: unknown strategy type {body.config.type!r}; "
                f"available: {', '.join(sorted(self.strategies))}",
            )
        if problems := strategy_schemas.parameter_problems(body.config.type,
                                                           body.config.parameters):
            raise ApiError(422, "; ".join(problems)[:1000])
        image = body.config.image
        if image is not None and image not in self.settings.allowed_images:
            raise ApiError(
                422,
                f"config.image: {image!r} is not an allowed worker image; allowed: "
                f"{', '.join(sorted(self.settings.allowed_images))} (RUNNER_CONTAINER_IMAGES)",
            )
        job_id, worker_id = f"job-{uuid.uuid4().hex[:12]}", f"worker-{uuid.uuid4().hex[:12]}"
        logs.correlation.set(job_id)  # this request's log lines (its own task's context)
        command = StartRunner(
            job_id=job_id,
            worker_id=worker_id,
            strategy_id=body.strategy_id,
            broker_id=body.broker_id,
            credentials_sealed=self.sealer.seal(body.credentials.reveal(), user_id=user_id,
                                                worker_id=worker_id),
            config=body.config,
            flatten_on_stop=body.flatten_on_stop,
        )
        envelope = Envelope.wrap(command, stream=f"job-{job_id}", user_id=user_id,
                                 correlation_id=job_id)
        try:
            decision = Envelope.from_json(await self.bus.request_raw(
                ENTITLEMENT_RPC, DecideStart(envelope=envelope))).message()
        except RpcTimeout:
            raise ApiError(
                504, f"job {job_id} was submitted but no entitlement decision came in time"
            ) from None
        except CallInterrupted:
            raise ApiError(
                503, f"job {job_id} was submitted, but the connection to the broker was lost "
                "before its entitlement decision came: look for it in the status once the "
                "service is back before starting it again", jobId=job_id) from None
        if isinstance(decision, JobRejected):
            status = REJECT_STATUS.get(decision.reason, 400)
            return status, failed(
                decision.detail,
                reason=decision.reason.value,
                jobId=job_id,
                retryAt=decision.retry_at.isoformat() if decision.retry_at else None,
            )
        assert isinstance(decision, JobAccepted)
        self.unseen.add(worker_id, user_id)  # the next status call waits until it shows
        return 200, ok(
            jobId=job_id,
            workerId=worker_id,
            message=f"runner accepted and queued ({decision.in_use} of "
            f"{decision.max_workers} workers, {decision.tier})",
        )

    async def stop_runner(self, caller: Caller, body: StopRequest) -> dict[str, Any]:
        if body.user_id is not None:
            _acting_user(caller, body.user_id)
        entry = await self._owned_worker(caller, body.worker_id)
        worker = entry["worker"]
        logs.correlation.set(worker["jobId"])
        ran_and_failed = worker["status"] == "failed" and worker["startedAt"] is not None
        if worker["status"] in ENDED and not (body.flatten_positions and ran_and_failed):
            return ok(
                message=f"worker {body.worker_id} already {worker['status']}", flattenedPositions=0
            )
        wid = body.worker_id
        with self.waiters.watch(
            ("WorkerStopped", wid), ("PositionsFlattened", wid), ("FlattenFailed", wid)
        ) as answers:
            await self.bus.publish(
                Envelope.wrap(
                    StopRunner(
                        worker_id=wid, flatten=body.flatten_positions, reason="stopped by user"
                    ),
                    stream=f"job-{worker['jobId']}",
                    user_id=worker["userId"],
                    correlation_id=worker["jobId"],
                )
            )
            flattened, flatten_error = 0, None
            while True:
                _, event = await self._next(
                    answers,
                    f"worker {wid} did not stop in time",
                    timeout=self.settings.stop_grace * 2 + self.settings.request_timeout,
                )
                if isinstance(event, PositionsFlattened):
                    flattened = event.count
                elif isinstance(event, FlattenFailed):
                    flatten_error = event.error
                elif isinstance(event, WorkerStopped):
                    break
        await asyncio.gather(self._until_monitor_shows(wid, "ended"),
                             self._until_slot_freed(worker["jobId"]))
        if flatten_error is not None:
            return failed(
                f"worker stopped, but flatten failed: {flatten_error}",
                message=f"worker {wid} stopped",
                flattenedPositions=flattened,
            )
        closed = (
            f", {flattened} position{'s' if flattened != 1 else ''} flattened"
            if body.flatten_positions
            else ""
        )
        return ok(message=f"worker {wid} stopped{closed}", flattenedPositions=flattened)

    async def halt(self, caller: Caller, body: HaltRequest) -> dict[str, Any]:
        """The kill switch: every runner in scope (not yet ended) stopped with flatten, all at
        once; answers when each has stopped, with how many positions were flattened and the
        runners whose stop or flatten failed."""
        if body.everyone:
            if not caller.admin or body.user_id is not None:
                raise ApiError(403 if not caller.admin else 422,
                               "all: admin only, and without userId")
            scope = None
        else:
            scope = _acting_user(caller, body.user_id)
        found = await self.bus.request(MONITOR_RPC, StatusQuery(user_id=scope))
        targets = [entry["worker"]["workerId"] for entry in found["workers"]
                   if entry["worker"]["status"] not in ENDED]

        async def stop(worker_id: str) -> dict[str, Any]:
            try:
                return await self.stop_runner(
                    caller, StopRequest(worker_id=worker_id, flatten_positions=True))
            except ApiError as exc:
                return failed(exc.error)
            except BusUnavailable as exc:  # the others go on: each says how it ended
                return failed(f"service unavailable: {exc}")

        answers = await asyncio.gather(*(stop(worker_id) for worker_id in targets))
        problems = {w: a["error"] for w, a in zip(targets, answers, strict=True)
                    if not a["success"]}
        figures = dict(halted=targets, failed=problems,
                       flattenedPositions=sum(a.get("flattenedPositions", 0) for a in answers))
        if problems:
            return failed(f"{len(problems)} of {len(targets)} runners not halted cleanly: "
                          + "; ".join(f"{w}: {e}" for w, e in problems.items()), **figures)
        return ok(message=f"{len(targets)} runner{'s' if len(targets) != 1 else ''} halted",
                  **figures)

    async def status(self, caller: Caller, user_id: str | None, offset: int = 0,
                     limit: int | None = None, *,
                     deflate_ok: bool = False) -> tuple[bytes, str | None]:
        """The status document as JSON (every worker in scope, or with `limit` one page) and its
        content encoding, passed on as the monitor sent it: a large one stays deflated when the
        client takes `deflate`."""
        if user_id is not None:
            _acting_user(caller, user_id)
        scope = user_id if user_id is not None else (None if caller.admin else caller.user_id)
        awaited = self.unseen.of(scope)
        query = StatusQuery(user_id=scope, offset=offset, limit=limit, known=tuple(awaited),
                            wait=READ_YOUR_WRITES_WAIT if awaited else 0.0)
        if deflate_ok:
            answer = await self.bus.request_encoded(MONITOR_RPC, query)
        else:
            answer = await self.bus.request_raw(MONITOR_RPC, query), None
        self.unseen.seen(awaited)
        return answer

    async def upgrade(self, user_id: str, body: UpgradeRequest) -> dict[str, Any]:
        with self.waiters.watch(("EntitlementUpgraded", user_id)) as answers:
            await self.bus.publish(
                Envelope.wrap(
                    UpgradeEntitlement(tier=body.tier, days=body.days),
                    stream=f"user-{user_id}",
                    user_id=user_id,
                )
            )
            _, event = await self._next(
                answers, "the upgrade was submitted but not confirmed in time"
            )
        assert isinstance(event, EntitlementUpgraded)
        return ok(
            userId=user_id,
            tier=event.tier,
            maxWorkers=event.max_workers,
            expiresAt=event.expires_at.isoformat(),
        )

    async def check(self, user_id: str) -> dict[str, Any]:
        return await self.bus.request(ENTITLEMENT_RPC, CheckEntitlement(user_id=user_id))

    async def _owned_worker(self, caller: Caller, worker_id: str) -> dict[str, Any]:
        """The worker's status entry, if the caller may act on it; the monitor may lag a fresh
        start by a moment, so it waits for one started here, and an unknown worker is looked up
        again briefly (one started through another gateway)."""
        started_here = worker_id in self.unseen
        wait = READ_YOUR_WRITES_WAIT if started_here else 0.0
        for delay in (0.0,) if started_here else (0.0, 0.1, 0.3, 0.6, 1.0):
            await asyncio.sleep(delay)
            try:
                entry = await self.bus.request(MONITOR_RPC,
                                               WorkerQuery(worker_id=worker_id, wait=wait))
            except NotFound:
                continue
            if caller.may_act_for(entry["worker"]["userId"]):
                return entry
            break
        raise ApiError(404, f"no worker {worker_id!r} of yours")

    async def _until_monitor_shows(self, worker_id: str,
                                   until: Literal["known", "ended"]) -> None:
        """Read-your-writes: wait (bounded) until the monitor's projection shows what this
        request just caused ("known", "ended"), so a status call right after the answer sees it."""
        with contextlib.suppress(RpcError, QueryRefused):
            await self.bus.request(MONITOR_RPC, WorkerQuery(worker_id=worker_id, until=until,
                                                            wait=READ_YOUR_WRITES_WAIT))

    async def _until_slot_freed(self, job_id: str) -> None:
        """Read-your-writes: wait (bounded) until the entitlement service has freed the slot of
        a job just stopped, so a start right after the answer counts without it."""
        with contextlib.suppress(RpcError, QueryRefused):
            await self.bus.request(ENTITLEMENT_RPC, SlotQuery(job_id=job_id,
                                                              wait=READ_YOUR_WRITES_WAIT))

    async def _next(self, answers: asyncio.Queue, error: str, timeout: float | None = None) -> Any:
        try:
            return await asyncio.wait_for(answers.get(), timeout or self.settings.request_timeout)
        except TimeoutError:
            raise ApiError(504, error) from None


def _days(days: float | None) -> timedelta | None:
    return timedelta(days=days) if days is not None else None


def _acting_user(caller: Caller, user_id: str | None) -> str:
    """The user a request acts for: the caller, or (admin only) the named user."""
    if caller.admin:
        if not user_id:
            raise ApiError(422, "userId: required when acting as admin")
        return user_id
    if user_id is not None and user_id != caller.user_id:
        raise ApiError(403, "userId does not match your token")
    assert caller.user_id is not None
    return caller.user_id


bearer = HTTPBearer(auto_error=False, description="a user's token, or the admin's")
UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The bearer token's owner: the admin or a user; 401 otherwise (an expired token too), and
    429 for a user's token over its rate (the admin's is not limited)."""
    if credentials is None or not credentials.credentials.strip():
        raise ApiError(401, "missing bearer token", headers=UNAUTHORIZED)
    gateway = request.app.state.gateway
    found = await gateway.users.identify(credentials.credentials.strip())
    if found is None:
        raise ApiError(401, "invalid token (unknown, revoked or rotated)", headers=UNAUTHORIZED)
    if found.expires_at is not None and found.expires_at <= now():
        raise ApiError(401, f"token expired at {found.expires_at.isoformat()}; ask the admin "
                            "for a new one", headers=UNAUTHORIZED)
    if not found.admin and (wait := gateway.limiter.take(found.user_id, time.monotonic())):
        raise ApiError(429, f"rate limit: {gateway.limiter.rate:g} requests a second, bursts "
                            f"of {gateway.limiter.burst}; retry in {wait:.1f} s",
                       headers={"Retry-After": retry_after(wait)})
    return found


async def admin(who: Annotated[Caller, Depends(caller)]) -> Caller:
    if not who.admin:
        raise ApiError(403, "admin token required")
    return who


Who = Annotated[Caller, Depends(caller)]
Admin = Annotated[Caller, Depends(admin)]


def create_app(gateway: GatewayService) -> FastAPI:
    app = FastAPI(
        title="Runner Orchestrator",
        version="0.1.0",
        description="Start, stop and watch trading-strategy runners.",
    )
    app.state.gateway = gateway
    # A large status is a lot of JSON; gzip (fast level) for clients that take it.
    app.add_middleware(GZipMiddleware, minimum_size=32 * 1024, compresslevel=1)
    settings = gateway.settings
    app.add_middleware(Edge, max_body=settings.http_max_body,  # outermost: before all else
                       max_depth=settings.http_max_json_depth,
                       max_items=settings.http_max_json_items)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = exc.headers
        if exc.status == 503:
            headers = {"Retry-After": str(RETRY_AFTER), **(headers or {})}
        return JSONResponse(failed(exc.error, **exc.extra), status_code=exc.status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        ]  # never echo the input: it may hold credentials
        return JSONResponse(failed("; ".join(problems)[:1000]), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(failed(str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(QueryRefused)
    async def _refused(_: Request, exc: QueryRefused) -> JSONResponse:
        status = {Invalid: 422, NotFound: 404, Conflict: 409}.get(type(exc), 400)
        return JSONResponse(failed(str(exc)), status_code=status)

    @app.exception_handler(RpcError)
    @app.exception_handler(PublishFailed)
    async def _bus_down(_: Request, exc: Exception) -> JSONResponse:
        """503 with Retry-After: the broker is unreachable (the bus has logged it) or a service
        failed to answer."""
        if isinstance(exc, BusUnavailable):
            log.debug("answered 503: %s", exc)
        else:
            log.warning("service unavailable: %s", exc)
        return JSONResponse(failed(f"service unavailable: {exc}"), status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER)})

    @app.post("/runner/start", responses={
        **answers.body_failures(401, 503, 504), 200: {"model": answers.Started},
        403: {"model": answers.Rejected}, 429: {"model": answers.Rejected}})
    async def start(body: StartRequest, who: Who) -> JSONResponse:
        status, payload = await gateway.start_runner(who, body)
        return JSONResponse(payload, status_code=status)

    @app.post("/runner/stop", responses={200: {"model": answers.Stopped},
                                          **answers.body_failures(401, 403, 404, 503, 504)})
    async def stop(body: StopRequest, who: Who) -> dict[str, Any]:
        return await gateway.stop_runner(who, body)

    @app.post("/runner/halt", responses={200: {"model": answers.Halted},
                                          **answers.body_failures(401, 403, 503, 504)})
    async def halt(body: HaltRequest, who: Who) -> dict[str, Any]:
        """Kill switch: stop every runner of a user (admin: any user, or all without userId;
        a user: their own) with flatten."""
        return await gateway.halt(who, body)

    @app.get("/runner/status", responses={200: {"model": answers.Status},
                                           **answers.failures(401, 403, 503)})
    async def status(
        request: Request,
        who: Who,
        userId: str | None = None,
        offset: Annotated[int, Query(ge=0, le=events_stream.MAX_POSITION,
                                     description="first worker of the page")] = 0,
        limit: Annotated[int | None, Query(ge=1, le=STATUS_PAGE_MAX,
                                           description="page size; all workers if absent")] = None,
    ) -> Response:
        # Already JSON from the monitor, perhaps deflated: no decoding, no FastAPI encoder, no gzip.
        deflate_ok = accepts_encoding(request.headers.get("accept-encoding", ""), "deflate")
        body, encoding = await gateway.status(who, userId, offset, limit, deflate_ok=deflate_ok)
        headers = {"Vary": "Accept-Encoding"} | ({"Content-Encoding": encoding} if encoding else {})
        return Response(body, media_type="application/json", headers=headers)

    @app.post("/entitlements/{user_id}/upgrade", responses={
        200: {"model": answers.Upgraded}, **answers.body_failures(401, 403, 503, 504)})
    async def upgrade(user_id: str, body: UpgradeRequest, _: Admin) -> dict[str, Any]:
        return await gateway.upgrade(user_id, body)

    @app.get("/entitlements/{user_id}", responses={
        200: {"model": answers.Entitlement}, **answers.failures(401, 403, 503)})
    async def check(user_id: str, who: Who) -> dict[str, Any]:
        if not who.may_act_for(user_id):
            raise ApiError(403, "admin token required")
        return await gateway.check(user_id)

    @app.post("/admin/users", status_code=201, responses={
        201: {"model": answers.UserCreated}, **answers.body_failures(401, 403, 409)})
    async def create_user(body: CreateUserRequest, _: Admin) -> dict[str, Any]:
        """A new user and their token (shown once), with an expiry if `expiresInDays`."""
        at = now()
        expires_in = _days(body.expires_in_days)
        token = await gateway.users.create(body.user_id, at, expires_in)
        if token is None:
            raise ApiError(409, f"user {body.user_id!r} exists (a new token for them: POST "
                                f"/admin/users/{body.user_id}/token)")
        return {"userId": body.user_id, "token": token,
                "expiresAt": (at + expires_in).isoformat() if expires_in else None}

    @app.post("/admin/users/{user_id}/token", responses={
        200: {"model": answers.TokenRotated}, **answers.body_failures(401, 403, 404)})
    async def rotate_token(user_id: Annotated[str, Path(pattern=ID_PATTERN)], _: Admin,
                           body: RotateTokenRequest | None = None) -> dict[str, Any]:
        """A new token for the user (shown once); the old one is refused at once, on every
        gateway within a second. Optional expiry (`expiresInDays`)."""
        try:
            token, expires_at = await gateway.users.rotate(
                user_id, now(), _days(body.expires_in_days if body else None))
        except UnknownUser:
            raise ApiError(404, f"no user {user_id!r}") from None
        log.info("token of user %s rotated", user_id)
        return ok(userId=user_id, token=token,
                  expiresAt=expires_at.isoformat() if expires_at else None)

    @app.delete("/admin/users/{user_id}/token", responses={
        200: {"model": answers.TokenRevoked}, **answers.failures(401, 403, 404, 422)})
    async def revoke_token(user_id: Annotated[str, Path(pattern=ID_PATTERN)],
                           _: Admin) -> dict[str, Any]:
        """The user's token refused from now on (on every gateway within a second); the user,
        their entitlement and their runners stay. A new token: rotate."""
        try:
            await gateway.users.revoke(user_id)
        except UnknownUser:
            raise ApiError(404, f"no user {user_id!r}") from None
        log.info("token of user %s revoked", user_id)
        return ok(userId=user_id, message=f"token of {user_id} revoked")

    @app.post("/admin/token", responses={
        200: {"model": answers.AdminTokenRotated}, **answers.failures(401, 403, 409)})
    async def rotate_admin_token(_: Admin) -> dict[str, Any]:
        """A new admin token (shown once, and saved in the gateway's token file); the old one
        is refused from now on by every gateway reading that file. 409 where the token is set
        by RUNNER_ADMIN_TOKEN."""
        try:
            token = gateway.users.admin.rotate()
        except AdminTokenError as exc:
            raise ApiError(409, str(exc)) from None
        log.info("admin token rotated (saved in %s)", gateway.users.admin.path)
        return ok(token=token, path=str(gateway.users.admin.path))

    @app.get("/admin/users", responses={200: {"model": answers.Users},
                                         **answers.failures(401, 403)})
    async def list_users(_: Admin) -> dict[str, Any]:
        return ok(users=await gateway.users.list())

    @app.get("/me", responses={200: {"model": answers.Me}, **answers.failures(401)})
    async def me(who: Who) -> dict[str, Any]:
        """Whom the token names: a user, or the admin."""
        return ok(userId=who.user_id, admin=who.admin)

    @app.get("/admin/hosts", responses={200: {"model": answers.Hosts},
                                         **answers.failures(401, 403, 503)})
    async def list_hosts(_: Admin) -> dict[str, Any]:
        return ok(hosts=await gateway.bus.request(MONITOR_RPC, HostsQuery()))

    events_stream.add_routes(app, gateway.tail, gateway.settings, Who)
    strategy_schemas.add_routes(app, gateway.strategies, Who)
    dashboard.add_routes(app)
    observability_routes.add_routes(app, gateway)

    @app.get("/health", responses={200: {"model": answers.Health}})
    async def health() -> dict[str, Any]:
        return ok(connected=gateway.bus.connected())

    return app
