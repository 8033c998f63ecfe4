"""A long SQLite log is folded in partitions, each in a process of its own
(`replay_partitioned`): the result is the one-process fold's, exactly; a log whose streams do not
keep the projections' keys apart, or a partition process that fails, is folded in one process;
a cancelled replay leaves no partition process behind."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench.replay import history
from events import (
    CrashReason,
    EntitlementUpgraded,
    Envelope,
    JobRequested,
    StrategyConfig,
    WorkerCrashed,
)
from projections import ENDED_KEPT_HOURS
from services.monitor import replay as replay_module
from services.monitor.log import EventLog
from services.monitor.replay import Folded, replay, usable_cores
from tests.integration.broker_helpers import eventually


@pytest.fixture
async def event_log(tmp_path: Path) -> AsyncIterator[EventLog]:
    log = EventLog.at(f"sqlite:///{tmp_path / 'monitor.db'}")
    await log.open()
    yield log
    await log.close()


@pytest.fixture
def partitioned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Partitions from the first event on; the lengths of the logs folded in partitions."""
    folded_in_partitions: list[int] = []
    real = replay_module.replay_partitioned

    async def counting(path: str, until: int) -> tuple[Folded, int]:
        result = await real(path, until)
        folded_in_partitions.append(until)
        return result

    monkeypatch.setattr(replay_module, "PARTITION_FROM", 1)
    monkeypatch.setattr(replay_module, "replay_partitioned", counting)
    return folded_in_partitions


async def in_one_process(event_log: EventLog, monkeypatch: pytest.MonkeyPatch,
                         **bounds: int) -> Folded:
    with monkeypatch.context() as patch:
        patch.setattr(replay_module, "PARTITIONS", 1)
        return await replay(event_log, **bounds)


@pytest.mark.parametrize(("partitions", "step"), [
    (2, timedelta(milliseconds=1)),
    (3, timedelta(milliseconds=1)),
    (2, timedelta(minutes=1)),  # two weeks: ended workers are forgotten on the way
])
async def test_a_log_folded_in_partitions_is_the_log_folded_in_one_process(
    event_log: EventLog, partitioned: list[int], monkeypatch: pytest.MonkeyPatch,
    partitions: int, step: timedelta,
) -> None:
    monkeypatch.setattr(replay_module, "PARTITIONS", partitions)
    envelopes = history(20_000, step=step)
    if step > timedelta(seconds=1):  # a start two days on, in one partition: the others'
        late = requested("w-late", "job-late")  # own clocks are behind the log's
        envelopes.append(late.model_copy(
            update={"occurred_at": envelopes[-1].occurred_at + timedelta(days=2)}))
    stray = WorkerCrashed(job_id="job-stray", worker_id="w-stray", host_id="h-1",
                          reason=CrashReason.EXITED, exit_code=1)  # its request never comes
    envelopes.append(Envelope.wrap(stray, stream="job-stray", user_id="u-1",
                                   occurred_at=envelopes[-1].occurred_at))
    await event_log.append(envelopes)
    plan = EntitlementUpgraded(tier="basic", max_workers=3,
                               expires_at=datetime(2030, 1, 1, tzinfo=UTC))
    await event_log.append([Envelope.wrap(plan, stream="", user_id="u-1")])  # an empty stream
    total = len(envelopes) + 1

    for bounds in ({}, {"until_position": 12_345}):
        folded = await replay(event_log, **bounds)
        assert folded == await in_one_process(event_log, monkeypatch, **bounds)
        assert folded.state.events_applied == bounds.get("until_position", total)
    assert partitioned == [total, 12_345]
    everything = await replay(event_log)
    assert len(everything.state.workers) > 100 and everything.state.positions
    if step > timedelta(seconds=1):
        assert everything.state.clock == envelopes[-1].occurred_at
        long_ago = everything.state.clock - timedelta(hours=ENDED_KEPT_HOURS + 1)
        stopped_long_ago = {e.payload["worker_id"] for e in envelopes
                            if e.type == "WorkerStopped" and e.occurred_at < long_ago}
        assert stopped_long_ago and not stopped_long_ago & set(everything.state.workers)
    assert everything.hosts and everything.state.entitlements["u-1"].tier == "basic"
    assert list(everything.state.early) == ["job-stray"]  # held, in whichever partition


def requested(worker: str, stream: str) -> Envelope:
    request = JobRequested(job_id=f"job-of-{stream}", worker_id=worker, strategy_id="s",
                           broker_id="paper", credentials_sealed="sealed",
                           config=StrategyConfig(name="x", type="hold", parameters={}))
    return Envelope.wrap(request, stream=stream, user_id="u-1")


async def test_a_worker_on_two_streams_is_folded_in_one_process(
    event_log: EventLog, partitioned: list[int], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(replay_module, "PARTITIONS", 2)
    # the streams end in 'a' and 'b': two partitions, and each would show the worker
    await event_log.append([requested("w-1", "job-a"), requested("w-1", "job-b")])

    with caplog.at_level(logging.WARNING):
        folded = await replay(event_log)
    assert folded == await in_one_process(event_log, monkeypatch)
    assert folded.state.workers["w-1"].job_id == "job-of-job-a"
    assert "do not partition its projections' keys" in caplog.text
    assert partitioned == []


async def test_a_partition_process_that_fails_leaves_the_fold_to_one_process(
    event_log: EventLog, partitioned: list[int], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(replay_module, "PARTITIONS", 2)
    await event_log.append(history(2_000))
    folding = replay_module.fold_partition

    def failing_in_a_child(path: str, until: int, part: int, parts: int) -> tuple[Folded, int]:
        if part > 0:  # only the forked children fold the other partitions
            raise OSError("disk read error")
        return folding(path, until, part, parts)

    monkeypatch.setattr(replay_module, "fold_partition", failing_in_a_child)

    with caplog.at_level(logging.WARNING):
        folded = await replay(event_log)
    assert folded == await in_one_process(event_log, monkeypatch)
    assert "a partition's process exited with 1" in caplog.text
    assert "folding partition 1 of the log failed" in capfd.readouterr().err  # and why


async def test_a_cancelled_replay_leaves_no_partition_process_behind(
    event_log: EventLog, partitioned: list[int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replay_module, "PARTITIONS", 2)
    await event_log.append(history(2_000))
    folding, forking = replay_module.fold_partition, replay_module._fork_partition
    forked: list[int] = []

    def slow_in_a_child(path: str, until: int, part: int, parts: int) -> tuple[Folded, int]:
        if part > 0:
            time.sleep(60)  # still folding when the replay is cancelled
        return folding(path, until, part, parts)

    def fork_partition(path: str, until: int, part: int) -> replay_module._Child:
        child = forking(path, until, part)
        forked.append(child.pid)
        return child

    monkeypatch.setattr(replay_module, "fold_partition", slow_in_a_child)
    monkeypatch.setattr(replay_module, "_fork_partition", fork_partition)
    replaying = asyncio.create_task(replay(event_log))
    await eventually(lambda: len(forked) == 1, 10, "the child forked")
    replaying.cancel()
    cancelled = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await replaying
    assert time.monotonic() - cancelled < 10  # the child was killed, not waited for
    assert len(forked) == 1
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left a zombie
        os.kill(forked[0], 0)


def test_usable_cores_follow_affinity_and_a_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert usable_cores(cpu_max) == affinity  # no cgroup file
    for text, cores in (("max 100000\n", affinity), ("100000 100000\n", 1),
                        ("150000 100000\n", min(affinity, 2)), ("5000 100000\n", 1),
                        ("garbage\n", affinity)):
        cpu_max.write_text(text)
        assert usable_cores(cpu_max) == cores, text
