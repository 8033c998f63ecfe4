"""Monitor snapshots: a restart from the latest usable snapshot plus the log's tail gives exactly
the state a full replay gives; a snapshot of another build's fold or of another log is not used."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from sqlalchemy import select, text, update

from bench.replay import history
from events import (
    Envelope,
    HeartbeatMissed,
    HostLost,
    JobRequested,
    StrategyConfig,
    WorkerStopped,
)
from services.monitor import snapshot
from services.monitor.log import EventLog
from services.monitor.replay import Folded, replay
from services.monitor.snapshot import Snapshots, decode, encode
from tests.unit.test_projections_properties import PROPERTY_SETTINGS, History, histories


def folded_at_once(envelopes: list[Envelope]) -> Folded:
    folded = Folded()
    folded.fold(envelopes, len(envelopes))
    return folded


def same(a: Folded, b: Folded) -> bool:
    return (a.state, a.hosts, a.position, a.silenced) == (b.state, b.hosts, b.position,
                                                          b.silenced)


def with_silences(envelopes: list[Envelope]) -> list[Envelope]:
    """`envelopes` with a worker reported silent (and not started since) and a host lost."""
    running = next(e for e in reversed(envelopes) if e.type == "WorkerSpawned").payload
    return [*envelopes,
            Envelope.wrap(HeartbeatMissed(job_id=running["job_id"], worker_id=running["worker_id"],
                                          host_id=running["host_id"], silent_for=31.0),
                          stream=f"job-{running['job_id']}"),
            Envelope.wrap(HostLost(host_id="h-2", silent_for=31.0), stream="host-h-2")]


@PROPERTY_SETTINGS
@given(history=histories())
def test_a_snapshot_decodes_to_the_state_it_was_made_of(history: History) -> None:
    folded = folded_at_once(history.envelopes)
    assert same(decode(encode(folded)), folded)


def test_a_busy_log_with_silences_survives_the_round_trip() -> None:
    folded = folded_at_once(with_silences(history(3000)))
    assert folded.silenced and any(h.lost for h in folded.hosts.values())
    assert same(decode(encode(folded)), folded)


def test_a_silenced_worker_that_ended_leaves_the_silenced_with_its_view() -> None:
    """A worker reported silent, then stopped, is forgotten a week on, by the state and by the
    silenced set alike, wherever the log is cut into batches."""
    running = [e for e in history(200) if e.type != "HostOnline"]
    silent = next(e for e in reversed(running) if e.type == "WorkerSpawned").payload
    ids = {"job_id": silent["job_id"], "worker_id": silent["worker_id"]}
    stream, last = f"job-{ids['job_id']}", running[-1].occurred_at
    ended = [
        Envelope.wrap(HeartbeatMissed(**ids, host_id=silent["host_id"], silent_for=31.0),
                      stream=stream, occurred_at=last),
        Envelope.wrap(WorkerStopped(**ids, reason="stopped by user"), stream=stream,
                      occurred_at=last),
    ]
    week_on = Envelope.wrap(JobRequested(job_id="j-next", worker_id="w-next", strategy_id="s",
                                         broker_id="paper", credentials_sealed="sealed",
                                         config=StrategyConfig(name="x", type="hold")),
                            stream="job-j-next", occurred_at=last + timedelta(days=8))
    envelopes = [*running, *ended]
    assert folded_at_once(envelopes).silenced == {ids["worker_id"]}

    everything = [*envelopes, week_on]
    at_once = folded_at_once(everything)
    assert at_once.silenced == set() and ids["worker_id"] not in at_once.state.workers
    for cut in (len(running), len(envelopes)):
        folded = Folded()
        folded.fold(everything[:cut], cut)
        folded.fold(everything[cut:], len(everything))
        assert same(folded, at_once)


@pytest.fixture
async def logged(tmp_path: Path):
    event_log = EventLog.at(f"sqlite:///{tmp_path / 'monitor.db'}")
    await event_log.open()
    store = Snapshots(event_log.engine, event_log)
    await store.open()
    yield event_log, store
    await event_log.close()


async def test_the_snapshot_and_the_tail_fold_to_the_full_replay(logged) -> None:  # type: ignore[no-untyped-def]
    event_log, snapshots = logged
    envelopes = with_silences(history(2000))
    await event_log.append(envelopes[:1200])
    for at in (400, 800, 1200):  # the latest two are kept
        await snapshots.save(await replay(event_log, until_position=at))
    await event_log.append(envelopes[1200:])

    start = await snapshots.latest()
    assert start is not None and start.position == 1200
    resumed = await replay(event_log, start=start)
    assert same(resumed, await replay(event_log))
    assert same(resumed, folded_at_once(envelopes))
    async with event_log.engine.connect() as conn:
        kept = (await conn.execute(select(snapshot.snapshots.c.position))).scalars()
        assert sorted(kept) == [800, 1200]


async def test_a_snapshot_of_another_fold_or_another_log_is_not_used(
        logged, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    event_log, snapshots = logged
    envelopes = history(600)
    await event_log.append(envelopes[:300])
    await snapshots.save(await replay(event_log))
    monkeypatch.setattr(snapshot, "CODE", "another build")
    assert await snapshots.latest() is None
    monkeypatch.undo()
    assert (await snapshots.latest()).position == 300  # type: ignore[union-attr]

    # a snapshot that does not decode is passed over, for the one before it
    await event_log.append(envelopes[300:400])
    await snapshots.save(await replay(event_log))
    async with event_log.engine.begin() as conn:
        await conn.execute(update(snapshot.snapshots)
                           .where(snapshot.snapshots.c.position == 400).values(body=b"garbage"))
    assert (await snapshots.latest()).position == 300  # type: ignore[union-attr]

    # the log is replaced by another one (restored from elsewhere) that has a row 300 too
    async with event_log.engine.begin() as conn:
        await conn.execute(text("DELETE FROM event_log"))
    await event_log.append(envelopes[400:])
    assert await snapshots.latest() is None
