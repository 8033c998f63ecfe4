"""A service inbox on the real broker (`Service.handle`): the deliveries that have arrived are
handled in one transaction (group commit); a handler that keeps failing is retried, then
dead-lettered to `dlq.<service>` with its reason, alone, while the rest of its batch commits once;
a message delivered twice has one effect; the ledger that ensures it forgets old ids."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func
from sqlmodel import select

from events import Envelope, JobQueued, StopRunner
from services.bus import Bus
from services.service import Service
from services.settings import Settings
from services.store import Processed, UnitOfWork
from services.topology import SCHEDULER_INBOX
from tests.integration.broker_helpers import eventually, the_only_dead_letter

pytestmark = pytest.mark.broker


class Probe(Service):
    """Stands in for the scheduler on its inbox: records each StopRunner it commits."""

    name = "scheduler"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.committed: list[str] = []
        self.transactions = 0
        self.store.on_commit.append(self._count)

    def _count(self, uow: UnitOfWork) -> None:
        self.transactions += 1

    async def setup(self) -> None:
        self.handle(SCHEDULER_INBOX, {StopRunner: self.on_stop})

    async def on_stop(self, uow: UnitOfWork, env: Envelope, cmd: StopRunner) -> None:
        if cmd.worker_id == "bad":
            raise ValueError("this one always fails")
        uow.after_commit.append(lambda: self.committed.append(cmd.worker_id))


def stop(worker_id: str) -> Envelope:
    return Envelope.wrap(
        StopRunner(worker_id=worker_id, flatten=False, reason="test"), stream=f"job-{worker_id}"
    )


async def test_a_batch_commits_together_and_a_failing_message_is_dead_lettered_alone(
    settings: Settings,
) -> None:
    publisher = Bus(settings, "test")
    await publisher.start()
    await publisher.declare(SCHEDULER_INBOX)
    first = [stop(f"w{i}") for i in range(40)]
    await publisher.publish_many([*first, first[3]])  # w3 delivered twice
    probe = Probe(settings)
    await probe.start()
    bad = stop("bad")
    try:
        await eventually(lambda: len(probe.committed) >= 40, 20, "the first 40")
        # group commit: far fewer transactions than messages; the second w3 is a no-op
        assert probe.transactions <= 10, probe.transactions
        good = [stop(f"w{i}") for i in range(40, 80)]
        await publisher.publish_many([*good[:20], bad, *good[20:]])
        await eventually(lambda: len(probe.committed) >= 80, 20, "the next 40")
        dead = await the_only_dead_letter(settings.amqp_url, "dlq.scheduler")
        await asyncio.sleep(0.3)
    finally:
        await probe.stop()
        await publisher.close()
    assert sorted(probe.committed) == sorted(f"w{i}" for i in range(80))  # each once
    assert dead.message_id == str(bad.event_id)
    reason = str(dead.headers["x-poison-reason"])
    assert reason.startswith(f"handler failed {settings.handler_attempts} times")
    assert "this one always fails" in reason


async def test_then_runs_after_a_batch_unless_all_its_messages_skip_it(settings: Settings) -> None:
    """`then` (the scheduler's placement round) runs at the end of a batch's transaction, but
    not for a batch of only `then_skip` types (a JobRequested alone can place nothing)."""
    from services.bus import Delivery

    rounds: list[int] = []

    async def then(uow: UnitOfWork) -> None:
        rounds.append(len(uow.emitted))

    async def handler(uow: UnitOfWork, env: Envelope, message: object) -> None:
        uow.emit(message, stream=env.stream)  # type: ignore[arg-type]

    probe = Probe(settings)
    await probe.store.open()
    handlers = {StopRunner: handler, JobQueued: handler}
    try:
        def delivery(envelope: Envelope) -> Delivery:
            return Delivery(envelope, envelope.message())

        queued = Envelope.wrap(JobQueued(job_id="j", worker_id="w"), stream="job-j")
        for batch in ([stop("a")], [stop("b"), stop("c")], [stop("d"), queued], [stop("a")]):
            await probe._handle_together("inbox", handlers, [delivery(e) for e in batch], then,
                                         then_skip={StopRunner})
    finally:
        await probe.store.close()
    # the mixed batch ran it once, after both of its handlers; a duplicate is no new work
    assert rounds == [2]


async def test_a_running_service_forgets_processed_ids_after_the_retention(
    settings: Settings,
) -> None:
    """The ledger is pruned while the service runs: ids older than `ledger_retention` go, every
    `ledger_prune_every` seconds, and the messages they stood for stay handled once."""
    settings = settings.model_copy(update={"ledger_retention": 1.0, "ledger_prune_every": 0.2})
    publisher = Bus(settings, "test")
    await publisher.start()
    await publisher.declare(SCHEDULER_INBOX)
    probe = Probe(settings)
    await probe.start()

    async def ledger_size() -> int:
        async with probe.store.reading() as session:
            return (await session.exec(select(func.count()).select_from(Processed))).one()

    try:
        await publisher.publish_many([stop(f"w{i}") for i in range(10)])
        await eventually(lambda: len(probe.committed) == 10, 20, "the ten stops")
        assert await ledger_size() == 10
        deadline = asyncio.get_running_loop().time() + 10
        while await ledger_size() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert await ledger_size() == 0
    finally:
        await probe.stop()
        await publisher.close()
    assert sorted(probe.committed) == sorted(f"w{i}" for i in range(10))
