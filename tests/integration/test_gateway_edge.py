"""The gateway's edge on real gateways (their HTTP servers, stores and broker connection; the
entitlement service and the monitor stood in for): hostile bodies are refused fast with a clear
message and reach nothing behind the gateway; a token over its rate gets 429s while another
user's goes on; a revoked or rotated token is refused by a second gateway within a second; a
rotated admin token works at once and the old one does not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from events import Envelope, JobAccepted
from events.queries import DecideStart, StatusQuery
from runner_client import RunnerClient
from services.bus import AmqpBus, RawJson
from services.cli.local import free_port
from services.gateway.service import GatewayService
from services.settings import Settings
from services.topology import rpc_queue

pytestmark = pytest.mark.broker

FAST_REFUSAL = 2.0  # seconds: a refusal on this shared, busy machine, with a wide margin


class Stand:
    """The services behind the gateways: the entitlement service accepts every start, the
    monitor shows nothing; `decided` counts what reached the entitlement service."""

    def __init__(self) -> None:
        self.decided = 0

    async def decide(self, query: DecideStart) -> Any:
        self.decided += 1
        command = query.envelope
        started = command.message()
        accepted = JobAccepted(job_id=started.job_id, worker_id=started.worker_id, tier="pro",
                               max_workers=10, in_use=0)
        return RawJson(Envelope.wrap(accepted, stream=command.stream, causation=command)
                       .to_json())

    async def status(self, query: StatusQuery) -> Any:
        return {"success": True, "workers": [], "queueStats": {}}


@contextlib.asynccontextmanager
async def gateways(settings: Settings, count: int = 1, **overrides: Any
                   ) -> AsyncIterator[tuple[Stand, list[GatewayService]]]:
    """`count` real gateways sharing one data dir and store (as gateways behind a balancer
    share a database), with the stand-ins behind them."""
    stand = Stand()
    bus = AmqpBus(settings, "fakes")
    bus.serve(rpc_queue("entitlement"), {DecideStart: stand.decide})
    bus.serve(rpc_queue("monitor"), {StatusQuery: stand.status})
    await bus.start()
    started: list[GatewayService] = []
    try:
        for _ in range(count):
            gateway = GatewayService(settings.model_copy(
                update={"http_port": free_port(), **overrides}))
            await gateway.start()
            started.append(gateway)
        yield stand, started
    finally:
        for gateway in started:
            await gateway.stop()
        await bus.close()


def client(gateway: GatewayService, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.settings.http_port}",
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)


def admin_of(gateway: GatewayService) -> str:
    return (gateway.settings.data_dir / "admin.token").read_text().strip()


def start_body(parameters: Any = None) -> dict[str, Any]:
    return {"userId": "alice", "strategyId": "s1", "brokerId": "paper",
            "credentials": {"apiKey": "k", "apiSecret": "s"},
            "config": {"name": "BTC", "type": "hold", "parameters": parameters or {}}}


def raw_start(parameters_json: bytes) -> bytes:
    """A start's JSON with `parameters` spliced in as written (NaN, nesting, …)."""
    marker = b'"@@"'
    return json.dumps(start_body("@@")).encode().replace(marker, parameters_json)


async def raw_exchange(port: int, head: bytes, body_chunks: int = 0,
                       chunk: bytes = b"") -> tuple[int, bytes, float]:
    """Sends a request head (and then `body_chunks` chunks of a chunked body, while reading),
    and returns the answer's status, its body and the seconds it took."""
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send_body() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(body_chunks):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()

    writer.write(head)
    sender = asyncio.create_task(send_body())
    try:
        status_line = await asyncio.wait_for(reader.readline(), 10)
        headers: dict[bytes, bytes] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers[b"content-length"]))
        return int(status_line.split()[1]), body, time.monotonic() - began
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()


async def stream_until_cut(port: int, head: bytes, total: int) -> tuple[int, bytes, float]:
    """Streams a chunked body of `total` bytes until the gateway stops taking it; the bytes
    sent by then, the start of what came back (if it could be read before the connection
    was reset) and the seconds it took."""
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk, sent = b" " * (64 << 10), 0
    try:
        writer.write(head)
        while sent < total:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await asyncio.wait_for(writer.drain(), 10)
            sent += len(chunk)
    except ConnectionError:
        pass
    answer = b""
    with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
        answer = await asyncio.wait_for(reader.read(200), 1)
    writer.close()
    return sent, answer, time.monotonic() - began


async def test_hostile_bodies_are_refused_fast_and_reach_nothing_behind(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    async with gateways(settings) as (stand, (gateway,)):
        port = gateway.settings.http_port
        token = admin_of(gateway)
        head = (b"POST /runner/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                b"Content-Type: application/json\r\n" % token.encode())
        # 64 MiB announced: refused from the header, before a byte of it is sent
        status, body, took = await raw_exchange(port, head + b"Content-Length: %d\r\n\r\n"
                                                % (64 << 20))
        assert (status, json.loads(body)) == (413, {
            "success": False, "error": "body larger than 65536 bytes"})
        assert took < FAST_REFUSAL
        # streamed without a length: cut off at the limit
        status, body, took = await raw_exchange(
            port, head + b"Transfer-Encoding: chunked\r\n\r\n", body_chunks=4,
            chunk=b" " * (32 << 10))
        assert (status, json.loads(body)["error"]) == (413, "body larger than 65536 bytes")
        assert took < FAST_REFUSAL
        # 64 MiB streamed: the gateway stops taking it (after the limit, and 1 MiB it drops)
        sent, answer, took = await stream_until_cut(
            port, head + b"Transfer-Encoding: chunked\r\n\r\n", 64 << 20)
        assert sent < 32 << 20 and took < FAST_REFUSAL + 1, (sent, took)
        assert not answer or answer.startswith(b"HTTP/1.1 413"), answer

        # a client going away in the middle of its body: nobody to answer, nothing to report
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + b"Content-Length: 1000\r\n\r\n" + b"{" * 10)
        await writer.drain()
        writer.close()

        hostile = {
            "nested 200 deep": (raw_start(b"[" * 200 + b"]" * 200), 422,
                                "body: JSON nested deeper than 32 levels"),
            "nested 260 deep": (raw_start(b'{"a":' * 260 + b"1" + b"}" * 260), 422,
                                "body: JSON nested deeper than 32 levels"),
            "nested 5,000 deep": (raw_start(b"[" * 5000 + b"]" * 5000), 422,
                                  "body: JSON nested deeper than 32 levels"),
            "NaN": (raw_start(b'{"amount": NaN}'), 422, "body: NaN and Infinity are not JSON "
                                                       "numbers; send finite numbers only"),
            "1e999": (raw_start(b'{"amount": 1e999}'), 422, "body: NaN and Infinity"),
            "100,000 keys": (raw_start(json.dumps({f"k{n}": 0 for n in range(100_000)})
                                       .encode()), 413, "body larger than 65536 bytes"),
            "5,000 keys": (raw_start(json.dumps({f"{n}": 0 for n in range(5000)}).encode()),
                           422, "body: more than 2000 keys and array items"),
            "a string amount": (json.dumps(start_body({"amount": "lots"})).encode(), 422,
                                "config.parameters.amount: Input should be a valid number"),
            "a side of 5": (json.dumps(start_body({"side": 5})).encode(), 422,
                            "config.parameters.side: Input should be 'long' or 'short'"),
            "a negative amount": (json.dumps(start_body({"amount": -1})).encode(), 422,
                                  "config.parameters.amount: Input should be greater than 0"),
            "parameters a list": (json.dumps(start_body([1, 2])).encode(), 422,
                                  "config.parameters: Input should be a valid dictionary"),
            "not JSON": (b"{'a': 1}", 422, "body: not valid JSON"),
        }
        async with client(gateway, token) as http:
            for name, (body, status, says) in hostile.items():
                began = time.monotonic()
                response = await http.post("/runner/start", content=body,
                                           headers={"Content-Type": "application/json"})
                took = time.monotonic() - began
                answer = response.json()
                assert (response.status_code, answer["success"]) == (status, False), name
                assert answer["error"].startswith(says), (name, answer)
                assert "Traceback" not in response.text and "lots" not in response.text, name
                assert took < FAST_REFUSAL, (name, took)
            for path in (f"/runner/status?offset={2**70}", f"/events?after={2**70}"):
                response = await http.get(path)  # past 64 bits: found by the fuzz run
                assert response.status_code == 422, (path, response.text)
            response = await http.get("/events", headers={"Last-Event-ID": str(2**70)})
            assert response.status_code == 422, response.text
            assert stand.decided == 0, "a hostile start reached the entitlement service"
            # the gateway's own errors (a leaked task of an earlier test in this process may be
            # collected, and asyncio say so, at any moment)
            assert not [r for r in caplog.records
                        if r.levelno >= logging.ERROR and r.name.startswith("services")]
            fine = await http.post("/runner/start", json=start_body({"amount": 2}))
            assert fine.status_code == 200, fine.text
            assert stand.decided == 1

            async def broken(user_id: str) -> dict[str, Any]:
                raise RuntimeError("a bug with a secret inside")

            gateway.check = broken  # type: ignore[method-assign]
            response = await http.get("/entitlements/alice")
        assert response.status_code == 500  # a bug: a JSON answer naming an incident, no trace
        error = response.json()["error"]
        assert error.startswith("internal error (incident ") and "secret" not in response.text
        incident = error.split("incident ")[1].split(")")[0]
        assert any(incident in r.getMessage() and r.exc_info for r in caplog.records)


async def test_a_token_over_its_rate_gets_429s_while_another_users_goes_on(
        settings: Settings) -> None:
    # one request every 4 s: the burst is surely spent before a token comes back
    async with gateways(settings, rate_limit=0.25, rate_burst=5) as (_, (gateway,)):
        admin = client(gateway, admin_of(gateway))
        async with admin:
            tokens = {user: (await admin.post("/admin/users", json={"userId": user})
                             ).json()["token"] for user in ("alice", "bob")}
            async with client(gateway, tokens["alice"]) as alice, \
                    client(gateway, tokens["bob"]) as bob:
                codes = [(await alice.get("/me")).status_code for _ in range(5)]
                assert codes == [200] * 5  # the burst
                over = await alice.get("/me")
                assert over.status_code == 429
                assert over.json()["error"].startswith("rate limit: 0.25 requests a second, "
                                                       "bursts of 5; retry in")
                assert 1 <= int(over.headers["retry-after"]) <= 4
                assert (await bob.get("/me")).status_code == 200  # another user: unaffected
                assert [(await admin.get("/me")).status_code for _ in range(20)] == [200] * 20
                # the refill: tests/unit/test_gateway_edge.py


async def refused_within(http: httpx.AsyncClient, seconds: float) -> float:
    """Seconds until `http`'s token is refused (401); fails after `seconds`."""
    began = time.monotonic()
    while (response := await http.get("/me")).status_code == 200:
        assert time.monotonic() - began < seconds, "the token is still taken"
        await asyncio.sleep(0.02)
    assert response.status_code == 401, response.text
    return time.monotonic() - began


async def test_a_revoked_rotated_or_expired_token_is_refused_by_another_gateway_in_time(
        settings: Settings) -> None:
    async with gateways(settings, count=2) as (_, (one, two)), \
            client(one, admin_of(one)) as admin:
        token = (await admin.post("/admin/users", json={"userId": "alice"})).json()["token"]
        async with client(two, token) as alice_on_two:
            assert (await alice_on_two.get("/me")).json()["userId"] == "alice"  # cached
            revoked = await admin.delete("/admin/users/alice/token")
            assert revoked.json() == {"success": True, "userId": "alice",
                                      "message": "token of alice revoked"}
            assert await refused_within(alice_on_two, 1.0) < 1.0
            assert (await alice_on_two.get("/me")).json()["error"].startswith(
                "invalid token")
        rotated = (await admin.post("/admin/users/alice/token")).json()
        async with client(two, rotated["token"]) as new_on_two:
            assert (await new_on_two.get("/me")).status_code == 200  # at once
            again = (await admin.post("/admin/users/alice/token")).json()
            assert await refused_within(new_on_two, 1.0) < 1.0
        async with client(two, again["token"]) as newest:
            assert (await newest.get("/me")).status_code == 200
        assert (await admin.post("/admin/users/nobody/token")).status_code == 404
        assert (await admin.delete("/admin/users/nobody/token")).status_code == 404

        created = (await admin.post("/admin/users", json={
            "userId": "carol", "expiresInDays": 1 / 86400})).json()  # a second
        assert created["expiresAt"] is not None
        async with client(two, created["token"]) as carol:
            assert (await carol.get("/me")).status_code == 200
            await refused_within(carol, 3.0)
            assert (await carol.get("/me")).json()["error"].startswith("token expired at ")
        rotated = (await admin.post("/admin/users/carol/token",
                                    json={"expiresInDays": 30})).json()
        assert rotated["expiresAt"] is not None
        async with client(two, rotated["token"]) as carol:
            assert (await carol.get("/me")).status_code == 200


async def test_a_rotated_admin_token_works_at_once_on_every_gateway_and_the_old_does_not(
        settings: Settings) -> None:
    async with gateways(settings, count=2) as (_, (one, two)):
        first = admin_of(one)
        async with client(one, first) as old_on_one:
            rotated = (await old_on_one.post("/admin/token")).json()
            assert rotated["path"] == str(one.settings.data_dir / "admin.token")
            second = rotated["token"]
            assert second != first and len(second) >= 32 and admin_of(one) == second
            assert (await old_on_one.get("/me")).status_code == 401
        for gateway in (one, two):
            async with client(gateway, second) as new, client(gateway, first) as old:
                assert (await new.get("/me")).json() == {"success": True, "userId": None,
                                                         "admin": True}
                assert (await old.get("/me")).status_code == 401
        # the CLI, on the gateways' machine: prints the file's path, never the token
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "admin", "rotate-token",
            env={"RUNNER_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin",
                 "COLUMNS": "200"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output = (await asyncio.wait_for(cli.communicate(), 60))[0].decode()
        assert cli.returncode == 0, output
        third = admin_of(one)
        assert str(settings.data_dir / "admin.token") in output.replace("\n", "")
        assert third not in output and third != second
        async with client(two, third) as new, client(two, second) as old:
            assert (await new.get("/me")).status_code == 200
            assert (await old.get("/me")).status_code == 401
        # the Python client: it goes on with the admin token it rotated to
        async with RunnerClient(f"http://127.0.0.1:{two.settings.http_port}", third) as runner:
            fourth = await runner.rotate_admin_token()
            assert fourth == admin_of(two) and await runner.users() == []
            token = await runner.add_user("ivan", expires_in_days=1)
            new_token = await runner.rotate_token("ivan")
            await runner.revoke_token("ivan")
        for gone in (token, new_token, third):
            async with client(one, gone) as old:
                assert (await old.get("/me")).status_code == 401


async def test_the_cli_rotates_and_revokes_a_users_token(settings: Settings) -> None:
    async with gateways(settings) as (_, (gateway,)):
        env = {"RUNNER_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin",
               "RUNNER_HTTP_PORT": str(gateway.settings.http_port), "COLUMNS": "200"}

        async def runner(*args: str) -> str:
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.cli.main", *args, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output = (await asyncio.wait_for(cli.communicate(), 60))[0].decode()
            assert cli.returncode == 0, output
            return output

        added, _ = await asyncio.gather(runner("users", "add", "dave", "--expires-days", "30"),
                                        runner("users", "add", "erin"))
        assert "expires" in added
        first = added.split("token: ")[1].split()[0]
        rotated = await runner("users", "rotate", "dave")
        second = rotated.split("new token: ")[1].split()[0]
        async with client(gateway, first) as old, client(gateway, second) as new:
            assert (await old.get("/me")).status_code == 401
            assert (await new.get("/me")).status_code == 200
            assert "token of dave revoked" in await runner("users", "revoke", "dave")
            assert (await new.get("/me")).status_code == 401
