"""The entitlement service on the in-memory bus: the start decision (as a query and as a
command), its limits, plans, expiry and circuits, decided once and race-free."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from events import (
    CircuitOpened,
    Envelope,
    JobAccepted,
    JobRejected,
    RestartsExhausted,
    StartRunner,
    StopRunner,
    StrategyConfig,
    UpgradeEntitlement,
    WorkerStopped,
)
from events.queries import (
    CheckEntitlement,
    Conflict,
    DecideStart,
    Invalid,
    SlotQuery,
    StatusQuery,
)
from services.entitlement import rows
from services.entitlement.rules import Plan
from services.entitlement.service import EntitlementService
from services.topology import ENTITLEMENT_RPC
from tests.handlers.conftest import Harness


def start_command(user: str = "alice", strategy: str = "s1") -> Envelope:
    job = f"job-{uuid.uuid4().hex[:12]}"
    command = StartRunner(job_id=job, worker_id=f"worker-{job[4:]}", strategy_id=strategy,
                          broker_id="paper", credentials_sealed="sealed",
                          config=StrategyConfig(name="BTC", type="hold"))
    return Envelope.wrap(command, stream=f"job-{job}", user_id=user, correlation_id=job)


async def decide(harness: Harness, command: Envelope) -> Envelope:
    return Envelope.from_json(await harness.bus.request_raw(ENTITLEMENT_RPC,
                                                            DecideStart(envelope=command)))


async def check(harness: Harness, user: str) -> dict[str, object]:
    return await harness.bus.request(ENTITLEMENT_RPC, CheckEntitlement(user_id=user))


@pytest.fixture
async def service(harness: Harness) -> EntitlementService:
    return await harness.start(EntitlementService)


async def test_the_answer_is_the_committed_decision_and_its_request_is_published_first(
        harness: Harness, service: EntitlementService) -> None:
    command = start_command()
    decision = await decide(harness, command)
    assert (decision.type, decision.correlation_id, decision.causation_id) == (
        "JobAccepted", command.correlation_id, command.event_id)
    assert (await check(harness, "alice"))["currentWorkers"] == 1  # committed before the answer

    await harness.settle()
    assert harness.types() == ["JobRequested", "JobAccepted"]
    requested = harness.seen[0]
    assert requested.payload == command.payload and requested.causation_id == command.event_id
    assert harness.seen[1].event_id == decision.event_id


async def test_a_command_is_decided_once_over_the_query_and_on_the_bus(
        harness: Harness, service: EntitlementService) -> None:
    """Asked again (a request redelivered after a replica died before answering, or the same
    job in a new envelope), a start gets its first decision back and nothing is emitted."""
    accepted = start_command()
    first = await decide(harness, accepted)
    assert first.type == "JobAccepted"
    again = Envelope.wrap(accepted.message(), stream=accepted.stream, user_id="alice",
                          correlation_id=accepted.correlation_id)
    assert (await decide(harness, again)).event_id == first.event_id
    assert (await decide(harness, accepted)).event_id == first.event_id
    command = start_command()
    rejected = await decide(harness, command)
    assert rejected.type == "JobRejected"  # over the free tier's one
    assert (await decide(harness, command)).event_id == rejected.event_id
    await harness.bus.publish(command)  # the CLI's way: the inbox finds it in the ledger
    await harness.settle()
    assert harness.types(about=command.correlation_id) == [
        "JobRequested", "JobRejected", "StartRunner"]
    assert harness.types(about=accepted.correlation_id) == ["JobRequested", "JobAccepted"]


async def test_a_start_decided_longer_ago_than_the_retention_is_refused_as_decided_before(
        harness: Harness, service: EntitlementService) -> None:
    command = start_command()
    await decide(harness, command)
    assert await service.forget_ended(before=2**40) == 1
    with pytest.raises(Conflict, match="decided before"):
        await decide(harness, command)


async def test_concurrent_starts_against_a_limit_of_one_accept_exactly_one(
        harness: Harness, service: EntitlementService) -> None:
    decisions = await asyncio.gather(*(decide(harness, start_command()) for _ in range(12)))
    messages = [d.message() for d in decisions]
    assert sum(isinstance(m, JobAccepted) for m in messages) == 1
    assert {m.reason.value for m in messages if isinstance(m, JobRejected)} == {"worker_limit"}
    assert len(messages) == 12


async def test_a_malformed_query_is_refused_with_a_reason(
        harness: Harness, service: EntitlementService) -> None:
    other = Envelope.wrap(JobRejected(job_id="j", reason="worker_limit", detail="x"), stream="s")
    with pytest.raises(Invalid, match="not JobRejected"):
        await harness.bus.request(ENTITLEMENT_RPC, DecideStart(envelope=other))
    with pytest.raises(Invalid, match="does not answer StatusQuery"):
        await harness.bus.request(ENTITLEMENT_RPC, StatusQuery())


async def test_the_decision_reads_the_plan_its_expiry_and_the_open_circuits(
        harness: Harness, service: EntitlementService) -> None:
    now = datetime.now(UTC)
    open_until = now + timedelta(minutes=5)
    async with service.store.transaction() as uow:
        await rows.save_plan(uow, "carol", Plan("basic", now + timedelta(days=1)))
        await rows.save_plan(uow, "dave", Plan("pro", now - timedelta(seconds=1)))  # lapsed
        await rows.open_circuit(uow, "carol", "flaky", open_until)

    flaky = (await decide(harness, start_command("carol", strategy="flaky"))).message()
    assert isinstance(flaky, JobRejected) and flaky.reason.value == "circuit_open"
    assert flaky.retry_at == open_until
    carol = [(await decide(harness, start_command("carol"))).message() for _ in range(4)]
    assert [(m.in_use, m.max_workers, m.tier) for m in carol[:3]] == [
        (1, 3, "basic"), (2, 3, "basic"), (3, 3, "basic")]  # counting the one just taken
    assert isinstance(carol[3], JobRejected) and carol[3].reason.value == "worker_limit"
    dave = [(await decide(harness, start_command("dave"))).message() for _ in range(2)]
    assert isinstance(dave[0], JobAccepted) and (dave[0].tier, dave[0].max_workers) == ("free", 1)
    assert isinstance(dave[1], JobRejected)


async def test_a_slot_freed_earlier_in_the_same_batch_counts_as_free(
        harness: Harness, service: EntitlementService) -> None:
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
        assert [e.type for e in uow.emitted] == ["JobRequested", "JobAccepted"]


async def test_a_job_ending_frees_its_slot_once(
        harness: Harness, service: EntitlementService) -> None:
    command = start_command()
    job = command.message()
    await decide(harness, command)
    await harness.send(RestartsExhausted(job_id=job.job_id, worker_id=job.worker_id,
                                         attempts=3), user_id="alice")
    await harness.send(WorkerStopped(job_id=job.job_id, worker_id=job.worker_id,
                                     reason="late"), user_id="alice")
    assert (await check(harness, "alice"))["currentWorkers"] == 0


async def test_the_slot_query_answers_once_the_job_has_freed_its_slot(
        harness: Harness, service: EntitlementService) -> None:
    """A stop's read-your-writes: asked with a wait, the answer comes when the slot is freed,
    not when the wait is over; without a wait, at once."""
    command = start_command()
    job = command.message()
    await decide(harness, command)
    assert await harness.bus.request(ENTITLEMENT_RPC, SlotQuery(job_id=job.job_id)) == {
        "held": True}
    answer = asyncio.create_task(harness.bus.request(
        ENTITLEMENT_RPC, SlotQuery(job_id=job.job_id, wait=5)))
    await harness.send(WorkerStopped(job_id=job.job_id, worker_id=job.worker_id,
                                     reason="stopped by user"), user_id="alice")
    assert await asyncio.wait_for(answer, 4) == {"held": False}


async def test_a_circuit_opened_refuses_starts_of_that_strategy_only(
        harness: Harness, service: EntitlementService) -> None:
    await harness.send(CircuitOpened(strategy_id="flaky", failures=3,
                                     retry_at=datetime.now(UTC) + timedelta(minutes=1)),
                       user_id="alice", stream="circuit-alice|flaky")
    assert (await decide(harness, start_command(strategy="flaky"))).type == "JobRejected"
    assert (await decide(harness, start_command(strategy="calm"))).type == "JobAccepted"


async def test_an_upgrade_then_its_expiry_downgrades_and_stops_the_newest_workers(
        harness: Harness, service: EntitlementService) -> None:
    await harness.send(UpgradeEntitlement(tier="basic", days=0.5 / 86400), user_id="bob",
                       stream="user-bob")
    starts = [start_command("bob") for _ in range(3)]
    for command in starts:
        assert (await decide(harness, command)).type == "JobAccepted"
    await harness.until(lambda: harness.of(StopRunner), "the downgrade's stops")
    await harness.settle()
    assert harness.types(about=None)[-4:] == [
        "EntitlementExpired", "EntitlementDowngraded", "StopRunner", "StopRunner"]
    stopped = [s.worker_id for s in harness.of(StopRunner)]
    assert stopped == [starts[2].payload["worker_id"], starts[1].payload["worker_id"]]
    assert (await check(harness, "bob"))["tier"] == "free"


async def test_an_upgrade_to_a_lower_tier_stops_the_excess_at_once(
        harness: Harness, service: EntitlementService) -> None:
    await harness.send(UpgradeEntitlement(tier="pro", days=30), user_id="eve", stream="user-eve")
    for _ in range(4):
        await decide(harness, start_command("eve"))
    await harness.send(UpgradeEntitlement(tier="basic", days=30), user_id="eve",
                       stream="user-eve")
    stops = harness.of(StopRunner)
    assert len(stops) == 1 and stops[0].reason == "stopped: tier changed to basic (3 workers)"


async def test_a_rejected_start_is_recorded_without_its_parameters(
        harness: Harness, service: EntitlementService) -> None:
    """The log is never pruned: a user at their limit retrying a start with 8 KiB of
    parameters must cost it a small record each time, not the parameters again."""
    def with_parameters() -> Envelope:
        command = start_command("frank")
        start = command.message()
        config = start.config.model_copy(update={"parameters": {"blob": "x" * 8000}})
        return Envelope.wrap(start.model_copy(update={"config": config}), stream=command.stream,
                             user_id="frank", correlation_id=command.correlation_id)

    accepted, rejected = with_parameters(), with_parameters()
    assert (await decide(harness, accepted)).type == "JobAccepted"
    assert (await decide(harness, rejected)).type == "JobRejected"  # the free tier's one
    await harness.settle()
    requested = {e.correlation_id: e for e in harness.seen if e.type == "JobRequested"}
    kept = requested[accepted.correlation_id].message().config.parameters
    assert kept == {"blob": "x" * 8000}  # an accepted start keeps them: its worker needs them
    record = requested[rejected.correlation_id]
    assert record.message().config.parameters == {}
    assert len(record.to_json()) < 1500
