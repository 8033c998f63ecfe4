"""The recorder on real SQLite: one transaction per batch, a refused envelope fails alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from events import Envelope, JobQueued
from services.bus import Delivery
from services.monitor.log import EventLog
from services.monitor.recorder import Recorded, Recorder


def queued(job: str) -> Delivery:
    message = JobQueued(job_id=job, worker_id=f"w-{job}")
    return Delivery(Envelope.wrap(message, stream=f"job-{job}"), message)


class CountingLog(EventLog):
    """The real log, counting transactions and refusing the job called 'bad'."""

    transactions = 0

    async def append(self, envelopes: Sequence[Envelope]) -> Recorded:
        self.transactions += 1
        if any(e.payload["job_id"] == "bad" for e in envelopes):
            raise ValueError("refused")
        return await super().append(envelopes)


@pytest.fixture
async def recording(tmp_path: Path):
    event_log = CountingLog.at(f"sqlite:///{tmp_path / 'monitor.db'}")
    await event_log.open()
    folded: Recorded = []
    yield event_log, Recorder(event_log, folded.extend), folded
    await event_log.close()


async def test_a_batch_is_one_transaction_and_folded_in_order(recording) -> None:
    event_log, recorder, folded = recording
    batch = [queued(str(n)) for n in range(1000)]
    assert await recorder.record(batch) == {}
    assert event_log.transactions == 1
    assert await event_log.count() == 1000
    assert [p for p, _ in folded] == list(range(1, 1001))
    assert [e for _, e in folded] == [d.envelope for d in batch]


async def test_record_returns_only_after_the_batch_is_committed(recording) -> None:
    event_log, recorder, _ = recording
    delivery = queued("1")
    await recorder.record([delivery])
    assert [e async for _, e in event_log.read()] == [delivery.envelope]


async def test_a_redelivered_batch_is_recorded_once(recording) -> None:
    event_log, recorder, folded = recording
    batch = [queued(str(n)) for n in range(10)]
    await recorder.record(batch[:6])
    assert await recorder.record(batch) == {}  # a crash before the ack: all of it comes again
    assert await event_log.count() == 10
    assert [p for p, _ in folded] == list(range(1, 11))


async def test_a_refused_envelope_fails_alone_and_the_rest_of_its_batch_is_recorded(
        recording) -> None:
    event_log, recorder, folded = recording
    refused = await recorder.record([queued("a"), queued("bad"), queued("b")])
    assert list(refused) == [1]
    assert "not recorded" in refused[1]
    assert [e.payload["job_id"] for _, e in folded] == ["a", "b"]
    assert await event_log.count() == 2


async def test_two_writers_keep_one_chain_and_each_folds_the_whole_log(recording) -> None:
    """Two monitors that both believe they are active, appending to one log in turn: the chain
    stays linear and intact, and each hands on the whole log in order, the other's rows too."""
    event_log, first, first_folded = recording
    second_folded: Recorded = []
    second = Recorder(event_log, second_folded.extend)
    batches = [[queued(f"{n}-{i}") for i in range(3)] for n in range(6)]
    for n, batch in enumerate(batches):
        await (first if n % 2 == 0 else second).record(batch)
    await first.record([batches[0][0]])  # a redelivery: nothing new, nothing missed
    await second.record([queued("last")])

    whole = [(p, str(e.event_id)) async for p, e in event_log.read()]
    assert [p for p, _ in whole] == list(range(1, 20))
    assert await event_log.verify() is None
    assert [(p, str(e.event_id)) for p, e in second_folded] == whole
    assert [(p, str(e.event_id)) for p, e in first_folded] == whole[:15]  # up to its last batch
