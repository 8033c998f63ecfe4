"""The entitlement service's wiring on the real broker: `DecideStart` is answered with the
committed decision, whose request and decision reach the bus in order; a start waits for the
service only as long as its caller does. (Its decisions: tests/handlers/test_entitlement.py.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from events import Envelope, StartRunner, StrategyConfig
from events.queries import CheckEntitlement, DecideStart, StatusQuery
from events.routing import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from services.bus import AmqpBus
from services.entitlement.service import EntitlementService
from services.settings import Settings
from services.topology import ENTITLEMENT_RPC
from tests.integration.broker_helpers import (
    collecting,
    drained,
    gateway_against,
    until_queued,
)

pytestmark = pytest.mark.broker


def start_command(user: str = "alice") -> Envelope:
    job = f"job-{uuid.uuid4().hex[:12]}"
    command = StartRunner(job_id=job, worker_id=f"worker-{job[4:]}", strategy_id="s1",
                          broker_id="paper", credentials_sealed="sealed",
                          config=StrategyConfig(name="BTC", type="hold"))
    return Envelope.wrap(command, stream=f"job-{job}", user_id=user, correlation_id=job)


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[EntitlementService]:
    entitlement = EntitlementService(settings)
    await entitlement.start()
    yield entitlement
    await entitlement.stop()


async def test_the_answer_is_the_committed_decision_and_its_request_is_published_before_it(
        settings: Settings, service: EntitlementService) -> None:
    client = AmqpBus(settings, "test")
    await client.start()
    try:
        async with collecting(settings.amqp_url, (COMMANDS_EXCHANGE, "#"),
                              (EVENTS_EXCHANGE, "#")) as on_the_bus:
            command = start_command()
            decision = Envelope.from_json(await client.request_raw(
                ENTITLEMENT_RPC, DecideStart(envelope=command)))
            check = await client.request(ENTITLEMENT_RPC, CheckEntitlement(user_id="alice"))
            await drained(service, on_the_bus)
    finally:
        await client.close()
    assert (decision.type, decision.causation_id) == ("JobAccepted", command.event_id)
    assert check["currentWorkers"] == 1  # committed before the answer
    assert [e.type for e in on_the_bus] == ["JobRequested", "JobAccepted"]
    assert on_the_bus[0].payload == command.payload
    assert on_the_bus[1].event_id == decision.event_id


async def test_a_start_waits_for_a_late_entitlement_service_and_one_refused_never_starts(
        settings: Settings) -> None:
    """With the entitlement service down for less than the request timeout, the start is
    answered once it is back. Down for longer, the start gets a 504 and its request expires
    unread, so the job never starts behind the client's back."""
    async def monitor(query: StatusQuery) -> object:
        return {"success": True, "workers": [], "queueStats": {}}

    waiting = settings.model_copy(update={"request_timeout": 3.0})
    body = {"strategyId": "s1", "brokerId": "paper",
            "credentials": {"apiKey": "k", "apiSecret": "s"},
            "config": {"name": "BTC", "type": "hold"}}
    async with gateway_against(waiting, monitor={StatusQuery: monitor}) as http:
        pending = asyncio.create_task(http.post("/runner/start", json=body | {"userId": "alice"}))
        await until_queued(settings.amqp_url, ENTITLEMENT_RPC.name, 1)
        late = EntitlementService(waiting)
        await late.start()
        try:
            answered = await pending
        finally:
            await late.stop()
        assert answered.status_code == 200, answered.text

        refused = await http.post("/runner/start", json=body | {"userId": "bob"})
        assert refused.status_code == 504, refused.text
        assert "no entitlement decision came in time" in refused.json()["error"]
        back = EntitlementService(waiting)
        await back.start()
        client = AmqpBus(settings, "test")
        await client.start()
        try:  # a start queued after bob's is decided after it, or in the same commit
            await client.request(ENTITLEMENT_RPC, DecideStart(envelope=start_command("carol")))
            bob = await back.check(CheckEntitlement(user_id="bob"))
            alice = await back.check(CheckEntitlement(user_id="alice"))
        finally:
            await client.close()
            await back.stop()
    assert (bob["currentWorkers"], alice["currentWorkers"]) == (0, 1)
