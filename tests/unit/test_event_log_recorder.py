"""The recorder's batching on real SQLite: one transaction per batch, acks only after commit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from events import Envelope, JobQueued
from services.monitor.log import EventLog
from services.monitor.recorder import NotRecorded, Recorded, Recorder


def queued(job: str) -> Envelope:
    message = JobQueued(job_id=job, worker_id=f"w-{job}")
    return Envelope.wrap(message, stream=f"job-{job}")


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
    event_log = CountingLog.at(f"sqlite+aiosqlite:///{tmp_path / 'monitor.db'}")
    await event_log.open()
    folded: Recorded = []
    recorder = Recorder(event_log, folded.extend, batch_size=1000, linger=0.005)
    writer = asyncio.create_task(recorder.run())
    yield event_log, recorder, folded
    writer.cancel()
    await event_log.close()


async def test_concurrent_deliveries_share_one_transaction_per_batch(recording) -> None:
    event_log, recorder, folded = recording
    envelopes = [queued(str(n)) for n in range(2500)]
    await asyncio.gather(*(recorder.record(e, e.message()) for e in envelopes))
    assert event_log.transactions <= 4
    assert await event_log.count() == 2500
    assert [p for p, _ in folded] == list(range(1, 2501))
    assert [e for _, e in folded] == envelopes


async def test_handler_returns_only_after_its_envelope_is_committed(recording) -> None:
    event_log, recorder, _ = recording
    envelope = queued("1")
    await recorder.record(envelope, envelope.message())
    assert [e async for _, e in event_log.read()] == [envelope]


async def test_a_refused_envelope_fails_alone_and_the_rest_of_its_batch_is_recorded(
        recording) -> None:
    event_log, recorder, folded = recording
    envelopes = [queued("a"), queued("bad"), queued("b")]
    results = await asyncio.gather(*(recorder.record(e, e.message()) for e in envelopes),
                                   return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], NotRecorded)
    assert [e.payload["job_id"] for _, e in folded] == ["a", "b"]
    assert await event_log.count() == 2
