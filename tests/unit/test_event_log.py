"""The event log on real SQLite: idempotent appends, contiguous positions, the hash chain."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events import Envelope, HostOnline, JobQueued, JobRequested, StrategyConfig, WorkerHeartbeat
from services.monitor.log import (
    GENESIS,
    EventLog,
    EventLogMissing,
    Head,
    _loads,
    canonical_json,
    chain_hash,
    withheld,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def queued(n: int, *, at: datetime | None = None) -> Envelope:
    return Envelope.wrap(JobQueued(job_id=f"job-{n}", worker_id=f"w-{n}"), stream=f"job-job-{n}",
                         user_id="alice", correlation_id=f"job-{n}",
                         occurred_at=at or T0 + timedelta(seconds=n))


@pytest.fixture
async def event_log(tmp_path: Path):
    log = EventLog.at(f"sqlite:///{tmp_path / 'monitor.db'}")
    await log.open()
    yield log
    await log.close()


async def test_same_event_id_twice_is_recorded_once(event_log: EventLog) -> None:
    envelope = queued(1)
    first = await event_log.append([envelope, envelope])
    again = await event_log.append([envelope])
    assert [p for p, _ in first] == [1]
    assert again == []
    assert await event_log.count() == 1


async def test_positions_are_contiguous_across_batches_with_duplicates(event_log: EventLog) -> None:
    batch = [queued(n) for n in range(5)]
    await event_log.append(batch[:3])
    recorded = await event_log.append([batch[1], *batch[3:], batch[2]])
    assert [p for p, _ in recorded] == [4, 5]
    assert [e.event_id for _, e in recorded] == [batch[3].event_id, batch[4].event_id]
    assert [p async for p, _ in event_log.read()] == [1, 2, 3, 4, 5]


async def test_count_up_to_a_position(event_log: EventLog) -> None:
    await event_log.append([queued(n) for n in range(5)])
    assert [await event_log.count(n) for n in (0, 1, 3, 5, 9)] == [0, 1, 3, 5, 5]
    assert await event_log.count() == 5


async def test_telemetry_is_never_recorded(event_log: EventLog) -> None:
    beat = WorkerHeartbeat(job_id="j", worker_id="w", host_id="h", pid=1, at=T0)
    assert await event_log.append([Envelope.wrap(beat, stream="telemetry")]) == []
    assert await event_log.count() == 0


async def test_each_row_hashes_the_previous_one(event_log: EventLog) -> None:
    await event_log.append([queued(n) for n in range(3)])
    db = sqlite3.connect(event_log.engine.url.database)
    rows = db.execute(
        "SELECT envelope, prev_hash, hash FROM event_log ORDER BY position").fetchall()
    prev = GENESIS
    for body, prev_hash, digest in rows:
        assert prev_hash == prev
        assert digest == chain_hash(prev, body)
        prev = digest
    assert (await event_log.head()).hash == prev
    assert await event_log.verify() is None


JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-2**70, 2**70) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(JSON)
def test_the_canonical_form_is_what_json_dumps_writes(document: object) -> None:
    """The chain's hashes of logs written before the fast path stay the same."""
    text = json.dumps(document)
    assert canonical_json(text) == json.dumps(
        _loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


async def test_the_stored_envelope_reads_back_equal(event_log: EventLog) -> None:
    envelope = Envelope.wrap(HostOnline(host_id="h1", capacity=4, hostname="box", pid=7),
                             stream="host-h1", occurred_at=T0)
    await event_log.append([envelope])
    assert [e async for _, e in event_log.read()] == [envelope]


async def test_verify_names_an_edited_row(event_log: EventLog) -> None:
    await event_log.append([queued(n) for n in range(20)])
    db = sqlite3.connect(event_log.engine.url.database)
    db.execute("UPDATE event_log SET envelope = replace(envelope, 'alice', 'mallory') "
               "WHERE position = 17")
    db.commit()
    db.close()
    broken = await event_log.verify()
    assert broken is not None
    assert broken.position == 17
    assert "hash mismatch" in str(broken)
    assert str(broken).startswith("row 17 (event_id ")


async def test_verify_names_a_deleted_row(event_log: EventLog) -> None:
    await event_log.append([queued(n) for n in range(5)])
    db = sqlite3.connect(event_log.engine.url.database)
    db.execute("DELETE FROM event_log WHERE position = 3")
    db.commit()
    db.close()
    broken = await event_log.verify()
    assert broken is not None and broken.position == 4


async def test_read_until_position_and_time(event_log: EventLog) -> None:
    await event_log.append([queued(n) for n in range(10)])
    assert [p async for p, _ in event_log.read(until_position=4)] == [1, 2, 3, 4]
    assert [p async for p, _ in event_log.read(after_position=8)] == [9, 10]
    until = T0 + timedelta(seconds=5)
    assert [e.occurred_at async for _, e in event_log.read(until_time=until)] == [
        T0 + timedelta(seconds=n) for n in range(6)
    ]
    assert [p async for p, _ in event_log.read(batch=3)] == list(range(1, 11))


async def test_a_reader_does_not_create_a_missing_database(tmp_path: Path) -> None:
    with pytest.raises(EventLogMissing):
        EventLog.at(f"sqlite:///{tmp_path / 'nope.db'}", must_exist=True)
    assert not (tmp_path / "nope.db").exists()


async def test_replay_skipping_unread_types_equals_folding_every_envelope(
        event_log: EventLog) -> None:
    from bench.replay import history
    from projections import fold
    from services.monitor.liveness import NO_HOSTS, apply_host
    from services.monitor.replay import replay

    envelopes = history(3000)
    await event_log.append(envelopes)
    seen: list[str] = []
    folded = await replay(event_log, each=lambda _, e: seen.append(e.type),
                          each_types={"WorkerSpawned", "HostOnline"})
    hosts = NO_HOSTS
    for envelope in envelopes:
        hosts = apply_host(hosts, envelope)
    assert folded.state == fold(envelopes)
    assert folded.state.events_applied == len(envelopes)
    assert folded.hosts == hosts and len(hosts) == 4
    assert folded.position == len(envelopes)
    assert seen == [e.type for e in envelopes if e.type in ("WorkerSpawned", "HostOnline")]
    everything = await replay(event_log, until_position=1234, each=lambda _, e: seen.append(e.type))
    assert everything.state == fold(envelopes[:1234])
    assert len(seen) == 1234 + sum(e.type in ("WorkerSpawned", "HostOnline") for e in envelopes)


async def test_pages_read_only_the_types_asked_for_and_count_the_rest(event_log: EventLog
                                                                      ) -> None:
    hosts = [Envelope.wrap(HostOnline(host_id=f"h-{n}", capacity=1, hostname="box", pid=n),
                           stream="host", occurred_at=T0) for n in range(2)]
    await event_log.append([hosts[0], queued(1), hosts[1], queued(2), queued(3)])
    # the stdlib fast path, and SQLAlchemy's (which a time bound takes)
    for bound in ({}, {"until_time": T0 + timedelta(days=1)}):
        pages = [(page.rows, page.skipped, page.last) async for page
                 in event_log.pages(types={"HostOnline"}, batch=1, **bound)]
        assert [([(p, t) for p, t, _ in rows], skipped, last) for rows, skipped, last in pages] == [
            ([(1, "HostOnline")], 0, 1), ([(3, "HostOnline")], 1, 3), ([], 2, 5)]
        assert Envelope.from_json(pages[1][0][0][2]) == hosts[1]


async def test_pages_end_at_the_head_the_log_had_when_they_started(
        event_log: EventLog, monkeypatch: pytest.MonkeyPatch) -> None:
    await event_log.append([queued(n) for n in range(1, 4)])
    head = event_log.head

    async def head_then_more_recorded() -> Head:
        seen = await head()
        await event_log.append([queued(n) for n in range(4, 6)])
        return seen

    monkeypatch.setattr(event_log, "head", head_then_more_recorded)
    pages = [(page.rows, page.skipped, page.last)
             async for page in event_log.pages(types={"HostOnline"}, batch=1)]
    assert pages == [([], 3, 3)]


def test_a_projection_that_fails_skips_only_its_envelope(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A batch whose fold raises is folded one envelope at a time: the failing envelope is left
    out (not counted either, as before batches), the rest of the batch still counts."""
    from bench.replay import history
    from projections import fold, state
    from services.monitor.replay import Folded

    envelopes = [e for e in history(400) if e.type != "HostOnline"]
    closed = [n for n, e in enumerate(envelopes) if e.type == "TradeClosed"]
    bad = envelopes[closed[3]]
    handler, everything = state._HANDLERS["TradeClosed"], fold(envelopes)

    def fails_on_bad(event, draft, envelope):  # type: ignore[no-untyped-def]
        if envelope is bad:
            raise ValueError("a projection bug")
        handler(event, draft, envelope)

    monkeypatch.setitem(state._HANDLERS, "TradeClosed", fails_on_bad)
    folded = Folded()
    folded.fold(envelopes[:200], 200)
    folded.fold(envelopes[200:], len(envelopes), skipped=5)

    without_bad = [e for e in envelopes if e is not bad]
    assert folded.state == state.counted(fold(without_bad), 5)
    assert folded.position == len(envelopes)
    assert folded.state.stats != everything.stats  # the bad trade would have counted


async def test_the_log_keeps_a_reference_to_sealed_credentials_never_the_blob(
        event_log: EventLog, tmp_path: Path) -> None:
    """A leaked sealing key must open nothing in the log or its backups: the blob is kept in the
    scheduler's store only, the log holds its digest (and still verifies and folds)."""
    blob = "gAAAAABn-a-sealed-credential-blob-nobody-may-keep"
    requested = Envelope.wrap(JobRequested(
        job_id="job-1", worker_id="w-1", strategy_id="s", broker_id="paper",
        credentials_sealed=blob, config=StrategyConfig(name="h", type="hold")),
        stream="job-job-1", user_id="alice")
    [(_, kept)] = await event_log.append([requested])
    assert kept == requested  # what the monitor folds is what came
    with sqlite3.connect(tmp_path / "monitor.db") as db:
        [(stored,)] = db.execute("SELECT envelope FROM event_log").fetchall()
    assert blob not in stored
    assert withheld(requested).payload["credentials_sealed"] == (
        "sha256:" + hashlib.sha256(blob.encode()).hexdigest())
    assert await event_log.verify() is None
    [(_, read)] = [row async for row in event_log.read()]
    assert read.message().credentials_sealed.startswith("sha256:")  # type: ignore[attr-defined]
    assert withheld(read) == read  # a reference is kept as it is
