"""The entitlement service's `start` RPC on the real broker and SQLite: it answers with the
decision once that has committed; the request (JobRequested) and its decision reach the bus (and
so the log) in order; a command is decided once, whether it comes twice over RPC or also on the
bus; concurrent starts share the limit exactly; a start waits for the service only as long as its
caller does."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from events import (
    Envelope,
    JobAccepted,
    JobRejected,
    StartRunner,
    StrategyConfig,
    WorkerStopped,
)
from events.routing import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from services.bus import Bus, RpcError
from services.entitlement.service import (
    CircuitRow,
    EntitlementService,
    PlanRow,
    circuit_key,
)
from services.settings import Settings
from tests.integration.broker_helpers import collecting, eventually, gateway_against

pytestmark = pytest.mark.broker


def start_command(user: str = "alice", strategy: str = "s1") -> Envelope:
    job = f"job-{uuid.uuid4().hex[:12]}"
    command = StartRunner(job_id=job, worker_id=f"worker-{job[4:]}", strategy_id=strategy,
                          broker_id="paper", credentials_sealed="sealed",
                          config=StrategyConfig(name="BTC", type="hold"))
    return Envelope.wrap(command, stream=f"job-{job}", user_id=user, correlation_id=job)


async def decide(bus: Bus, command: Envelope) -> Envelope:
    reply = await bus.request_raw("entitlement.rpc",
                                  {"op": "start", "envelope": command.model_dump(mode="json")})
    return Envelope.from_json(reply)


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[EntitlementService]:
    entitlement = EntitlementService(settings)
    await entitlement.start()
    yield entitlement
    await entitlement.stop()


@pytest.fixture
async def bus(settings: Settings, service: EntitlementService) -> AsyncIterator[Bus]:
    client = Bus(settings, "test")
    await client.start()
    yield client
    await client.close()


@pytest.fixture
async def on_the_bus(settings: Settings, service: EntitlementService
                     ) -> AsyncIterator[list[Envelope]]:
    """Every command and event published, in the order the broker took them."""
    async with collecting(settings.amqp_url, (COMMANDS_EXCHANGE, "#"),
                          (EVENTS_EXCHANGE, "#")) as seen:
        yield seen


async def test_the_answer_is_the_committed_decision_and_its_request_is_published_before_it(
        service: EntitlementService, bus: Bus, on_the_bus: list[Envelope]) -> None:
    command = start_command()
    decision = await decide(bus, command)
    assert decision.type == "JobAccepted"
    assert decision.correlation_id == command.correlation_id
    assert decision.causation_id == command.event_id
    # committed before the answer: the slot is already counted
    check = await bus.request("entitlement.rpc", {"op": "check", "user_id": "alice"})
    assert check["currentWorkers"] == 1 and check["isEntitled"] is False

    await eventually(lambda: len(on_the_bus) >= 2, 10, "the request and its decision")
    await asyncio.sleep(0.3)  # nothing more follows
    assert [e.type for e in on_the_bus] == ["JobRequested", "JobAccepted"]
    assert on_the_bus[0].payload == command.payload  # the request, every field
    assert on_the_bus[0].causation_id == command.event_id
    assert on_the_bus[1].event_id == decision.event_id


async def test_a_command_is_decided_once(service: EntitlementService, bus: Bus,
                                         on_the_bus: list[Envelope]) -> None:
    """Over RPC twice, then on the bus (the CLI's way), which the inbox takes: one decision. A
    rejected command holds no slot, so only the ledger can tell that it was decided. The same
    job sent again in a new envelope finds its slot taken."""
    accepted = start_command()
    assert (await decide(bus, accepted)).type == "JobAccepted"
    again = Envelope.wrap(accepted.message(), stream=accepted.stream, user_id="alice",
                          correlation_id=accepted.correlation_id)
    with pytest.raises(RpcError, match="accepted before"):
        await decide(bus, again)
    command = start_command()
    assert (await decide(bus, command)).type == "JobRejected"  # over the free tier's one
    with pytest.raises(RpcError, match="decided before"):
        await decide(bus, command)
    publisher = Bus(service.settings, "test-publisher")
    await publisher.start()
    try:
        await publisher.publish(command)
        await asyncio.sleep(0.5)
    finally:
        await publisher.close()
    about = [e.type for e in on_the_bus if e.correlation_id == command.correlation_id]
    assert about == ["JobRequested", "JobRejected", "StartRunner"]  # the last: ours, skipped


async def test_concurrent_starts_against_a_limit_of_one_accept_exactly_one(
        service: EntitlementService, bus: Bus) -> None:
    decisions = await asyncio.gather(*(decide(bus, start_command()) for _ in range(12)))
    messages = [d.message() for d in decisions]
    assert sum(isinstance(m, JobAccepted) for m in messages) == 1
    rejected = [m for m in messages if isinstance(m, JobRejected)]
    assert len(rejected) == 11
    assert {m.reason.value for m in rejected} == {"worker_limit"}


async def test_a_malformed_request_is_refused_with_a_reason(bus: Bus) -> None:
    with pytest.raises(RpcError, match="must be a StartRunner envelope"):
        await bus.request("entitlement.rpc", {"op": "start"})
    with pytest.raises(RpcError, match="must be a StartRunner envelope"):
        await bus.request("entitlement.rpc", {"op": "start", "envelope": {"type": "StartRunner"}})
    other = Envelope.wrap(JobRejected(job_id="j", reason="worker_limit", detail="x"), stream="s")
    with pytest.raises(RpcError, match="not JobRejected"):
        await bus.request("entitlement.rpc",
                          {"op": "start", "envelope": other.model_dump(mode="json")})
    with pytest.raises(RpcError, match="unknown op"):
        await bus.request("entitlement.rpc", {"op": "launch"})


async def test_a_start_waits_for_a_late_entitlement_service_and_one_refused_never_starts(
        settings: Settings) -> None:
    """A start is decided only while its caller waits. With the entitlement service down for
    less than the request timeout, the start is answered once it is back. Down for longer, the
    start gets a 504 and its request expires unread, so the job never starts behind the
    client's back (as a command left in a durable queue would have)."""
    async def monitor(body: dict[str, Any]) -> Any:
        return {"success": True, "workers": [], "queueStats": {}}

    waiting = settings.model_copy(update={"request_timeout": 3.0})
    body = {"strategyId": "s1", "brokerId": "paper",
            "credentials": {"apiKey": "k", "apiSecret": "s"},
            "config": {"name": "BTC", "type": "hold"}}
    async with gateway_against(waiting, monitor=monitor) as http:
        pending = asyncio.create_task(http.post("/runner/start", json=body | {"userId": "alice"}))
        await asyncio.sleep(0.5)
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
        try:
            await asyncio.sleep(0.5)
            bob = await back.answer({"op": "check", "user_id": "bob"})
            alice = await back.answer({"op": "check", "user_id": "alice"})
        finally:
            await back.stop()
    assert (bob["currentWorkers"], alice["currentWorkers"]) == (0, 1)


async def test_the_decision_reads_the_plan_its_expiry_and_the_open_circuits(
        service: EntitlementService, bus: Bus) -> None:
    moment = datetime.now(UTC)
    open_until = moment + timedelta(minutes=5)
    async with service.store.transaction() as uow:
        uow.session.add(PlanRow(user_id="carol", tier="basic",
                                expires_at=moment + timedelta(days=1)))
        uow.session.add(PlanRow(user_id="dave", tier="pro",
                                expires_at=moment - timedelta(seconds=1)))  # lapsed: free
        uow.session.add(CircuitRow(key=circuit_key("carol", "flaky"), open_until=open_until))

    flaky = (await decide(bus, start_command("carol", strategy="flaky"))).message()
    assert isinstance(flaky, JobRejected) and flaky.reason.value == "circuit_open"
    assert flaky.retry_at == open_until
    carol = [(await decide(bus, start_command("carol"))).message() for _ in range(4)]
    assert [(m.in_use, m.max_workers, m.tier) for m in carol[:3]] == [
        (1, 3, "basic"), (2, 3, "basic"), (3, 3, "basic")]  # counting the one just taken
    assert isinstance(carol[3], JobRejected) and carol[3].reason.value == "worker_limit"
    dave = [(await decide(bus, start_command("dave"))).message() for _ in range(2)]
    assert isinstance(dave[0], JobAccepted) and (dave[0].tier, dave[0].max_workers) == ("free", 1)
    assert isinstance(dave[1], JobRejected)


async def test_a_slot_freed_earlier_in_the_same_transaction_counts_as_free(
        settings: Settings) -> None:
    """An inbox batch can hold a job's end and, after it, a start by the same user at their
    limit: the start must see the slot freed (the decision reads with a statement of its own,
    after what the batch has changed so far is flushed)."""
    service = EntitlementService(settings)
    await service.store.open()
    try:
        first = start_command()
        async with service.store.transaction() as uow:
            await service.on_start_runner(uow, first, first.message())
        ended = first.message()
        stopped = Envelope.wrap(WorkerStopped(job_id=ended.job_id, worker_id=ended.worker_id,
                                              reason="stopped by user"), stream=first.stream)
        second = start_command()
        async with service.store.transaction() as uow:
            await service.on_job_ended(uow, stopped, stopped.message())
            await service.on_start_runner(uow, second, second.message())
            decided = [e.type for e in uow.emitted]
    finally:
        await service.store.close()
    assert decided == ["JobRequested", "JobAccepted"]
