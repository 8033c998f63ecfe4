"""Projections over hand-written histories: worker lifecycle, positions, stats, queue figures,
entitlements."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

import immutables
import pytest

from events import (
    CrashReason,
    EntitlementDowngraded,
    EntitlementExpired,
    EntitlementUpgraded,
    Envelope,
    HeartbeatMissed,
    HostOnline,
    JobAccepted,
    JobDispatched,
    JobQueued,
    JobRejected,
    JobRequested,
    JobStatus,
    Message,
    OrderFilled,
    PositionChanged,
    PositionsFlattened,
    RejectReason,
    RestartsExhausted,
    StartRunner,
    StopRequested,
    StrategyConfig,
    TradeClosed,
    WorkerCrashed,
    WorkerHeartbeat,
    WorkerRestarted,
    WorkerRestartScheduled,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerStopped,
)
from projections import (
    EMPTY,
    ENDED_KEPT_HOURS,
    EntitlementView,
    PositionView,
    Projections,
    QueueStats,
    TradingStats,
    WorkerView,
    apply,
    fold,
    queue_stats,
)

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
CONFIG = StrategyConfig(name="Scalper", type="scalping")


def at(second: int) -> datetime:
    return T0 + timedelta(seconds=second)


def history(*steps: Message | tuple[str, Message]) -> list[Envelope]:
    """Envelopes one second apart (the i-th at `at(i)`); a bare message belongs to alice."""
    envelopes = []
    for i, step in enumerate(steps):
        user, message = step if isinstance(step, tuple) else ("alice", step)
        job_id = getattr(message, "job_id", None)
        envelopes.append(
            Envelope.wrap(
                message,
                stream=f"job-{job_id}" if job_id else f"user-{user}",
                user_id=user,
                correlation_id=job_id,
                occurred_at=at(i),
                event_id=UUID(int=i + 1),
            )
        )
    return envelopes


def ids(n: int) -> dict[str, str]:
    return {"job_id": f"job-{n}", "worker_id": f"w-{n}"}


def requested(n: int, *, flatten_on_stop: bool = True) -> JobRequested:
    return JobRequested(
        **ids(n),
        strategy_id="s-1",
        broker_id="paper",
        credentials_sealed="sealed",
        config=CONFIG,
        flatten_on_stop=flatten_on_stop,
    )


def queued(n: int) -> list[Message]:
    return [
        requested(n),
        JobAccepted(**ids(n), tier="pro", max_workers=10, in_use=0),
        JobQueued(**ids(n)),
    ]


def running(n: int, *, pid: int = 100, host: str = "h-1") -> list[Message]:
    return [*queued(n), dispatched(n, host), WorkerSpawned(**ids(n), host_id=host, pid=pid)]


def dispatched(n: int, host: str = "h-1", *, attempt: int = 0) -> JobDispatched:
    return JobDispatched(
        **ids(n),
        host_id=host,
        attempt=attempt,
        strategy_id="s-1",
        broker_id="paper",
        credentials_sealed="sealed",
        config=CONFIG,
    )


def crashed(n: int, *, attempt: int = 0, exit_code: int = 1) -> WorkerCrashed:
    return WorkerCrashed(
        **ids(n), host_id="h-1", attempt=attempt, reason=CrashReason.EXITED, exit_code=exit_code
    )


def restarted(n: int, attempt: int, *, pid: int, host: str = "h-2") -> list[Message]:
    return [
        WorkerRestartScheduled(**ids(n), attempt=attempt, delay=0.5, due_at=T0),
        dispatched(n, host, attempt=attempt),
        WorkerRestarted(**ids(n), host_id=host, pid=pid, attempt=attempt),
    ]


def position(
    n: int, instrument: str, amount: float, *, side: str = "long", price: float = 100.0
) -> PositionChanged:
    return PositionChanged(
        **ids(n), instrument=instrument, side=side, amount=amount, entry_price=price
    )


def trade(n: int, pnl: float) -> TradeClosed:
    return TradeClosed(
        **ids(n),
        instrument="BTC",
        side="long",
        amount=1.0,
        entry_price=100.0,
        exit_price=100.0 + pnl,
        realized_pnl=pnl,
    )


def worker(*steps: Message | tuple[str, Message], worker_id: str = "w-1") -> WorkerView:
    return fold(history(*steps)).workers[worker_id]


# --- worker lifecycle -------------------------------------------------------------------------


def test_requested_job_is_a_queued_worker_of_its_user() -> None:
    view = worker(("bob", requested(1, flatten_on_stop=False)))
    assert (view.worker_id, view.job_id, view.user_id) == ("w-1", "job-1", "bob")
    assert (view.strategy_id, view.broker_id, view.flatten_on_stop) == ("s-1", "paper", False)
    assert view.status is JobStatus.QUEUED
    assert view.created_at == at(0)
    assert (view.pid, view.host_id, view.started_at, view.restart_count) == (None, None, None, 0)


def test_dispatched_job_is_still_queued_on_its_host() -> None:
    view = worker(*queued(1), dispatched(1, "h-7"))
    assert (view.status, view.host_id, view.pid) == (JobStatus.QUEUED, "h-7", None)


def test_spawned_worker_is_running_with_pid_host_and_start_time() -> None:
    view = worker(*running(1, pid=4242, host="h-3"))
    assert (view.status, view.pid, view.host_id) == (JobStatus.RUNNING, 4242, "h-3")
    assert view.started_at == at(4)
    assert (view.restart_count, view.reason) == (0, None)


def test_a_queued_event_recorded_after_the_spawn_leaves_the_worker_running() -> None:
    """A publish retried after a nack can put a job's JobQueued after its WorkerSpawned."""
    view = worker(requested(1), dispatched(1, "h-3"), WorkerSpawned(**ids(1), host_id="h-3", pid=7),
                  JobAccepted(**ids(1), tier="pro", max_workers=10, in_use=0), JobQueued(**ids(1)))
    assert (view.status, view.pid) == (JobStatus.RUNNING, 7)


def test_crash_then_restart_counts_one_restart() -> None:
    view = worker(*running(1, pid=100), crashed(1), *restarted(1, 1, pid=200))
    assert (view.status, view.pid, view.host_id) == (JobStatus.RUNNING, 200, "h-2")
    assert view.restart_count == 1
    assert view.started_at == at(8)
    assert "exited with code 1" in view.reason


def test_two_crashes_two_restarts_count_two_restarts() -> None:
    view = worker(
        *running(1),
        crashed(1),
        *restarted(1, 1, pid=200),
        crashed(1, attempt=1),
        *restarted(1, 2, pid=300),
    )
    assert (view.status, view.pid, view.restart_count) == (JobStatus.RUNNING, 300, 2)


def test_crashed_worker_awaiting_restart_stays_crashed() -> None:
    view = worker(
        *running(1), crashed(1), WorkerRestartScheduled(**ids(1), attempt=1, delay=2.0, due_at=T0)
    )
    assert (view.status, view.pid) == (JobStatus.CRASHED, None)
    assert view.reason == "exited with code 1 (restart 1 scheduled in 2s)"


@pytest.mark.parametrize(
    ("crash", "reason"),
    [
        pytest.param(crashed(1, exit_code=3), "exited with code 3", id="exit-code"),
        pytest.param(
            WorkerCrashed(**ids(1), host_id="h-1", reason=CrashReason.EXITED),
            "exited",
            id="exit-without-code",
        ),
        pytest.param(
            WorkerCrashed(**ids(1), host_id="h-1", reason=CrashReason.HEARTBEAT_TIMEOUT),
            "heartbeat timeout",
            id="heartbeat",
        ),
        pytest.param(
            WorkerCrashed(
                **ids(1), host_id=None, reason=CrashReason.HOST_LOST, detail="h-1 silent for 9s"
            ),
            "host lost: h-1 silent for 9s",
            id="host-lost-with-detail",
        ),
    ],
)
def test_crash_reason_is_human_readable(crash: WorkerCrashed, reason: str) -> None:
    view = worker(*running(1), crash)
    assert (view.status, view.pid, view.reason) == (JobStatus.CRASHED, None, reason)


def test_late_crash_of_an_earlier_incarnation_is_ignored() -> None:
    # The scheduler declared the host lost and restarted the worker elsewhere; the cut-off host
    # reports the old process's end afterwards.
    view = worker(*running(1), crashed(1), *restarted(1, 1, pid=200), crashed(1, attempt=0))
    assert (view.status, view.pid, view.restart_count) == (JobStatus.RUNNING, 200, 1)


def test_late_spawn_failure_of_an_earlier_attempt_is_ignored() -> None:
    late = WorkerSpawnFailed(**ids(1), host_id="h-1", attempt=0, error="timeout")
    view = worker(*running(1), crashed(1), *restarted(1, 1, pid=200), late)
    assert (view.status, view.pid) == (JobStatus.RUNNING, 200)


def test_late_start_of_an_earlier_attempt_is_ignored() -> None:
    # A host restarted while its dispatch was queued starts the moved attempt 1 (and fences it
    # at once) after attempt 2 already runs elsewhere.
    view = worker(
        *running(1), crashed(1), *restarted(1, 1, pid=200), crashed(1, attempt=1),
        *restarted(1, 2, pid=300, host="h-3"),
        WorkerRestarted(**ids(1), host_id="h-2", pid=250, attempt=1), crashed(1, attempt=1),
    )
    assert (view.status, view.pid, view.host_id, view.restart_count) == (
        JobStatus.RUNNING, 300, "h-3", 2)


def test_crash_report_after_the_worker_stopped_changes_nothing() -> None:
    view = worker(*running(1), WorkerStopped(**ids(1), reason="stopped by user"), crashed(1))
    assert (view.status, view.reason) == (JobStatus.STOPPED, "stopped by user")


def test_missed_heartbeat_alone_keeps_the_worker_running() -> None:
    view = worker(*running(1, pid=7), HeartbeatMissed(**ids(1), host_id="h-1", silent_for=30.0))
    assert (view.status, view.pid, view.reason) == (JobStatus.RUNNING, 7, "no heartbeat for 30s")


def test_missed_heartbeat_then_crash_is_a_heartbeat_timeout() -> None:
    view = worker(
        *running(1),
        HeartbeatMissed(**ids(1), host_id="h-1", silent_for=30.0),
        WorkerCrashed(**ids(1), host_id="h-1", reason=CrashReason.HEARTBEAT_TIMEOUT),
    )
    assert (view.status, view.reason) == (JobStatus.CRASHED, "heartbeat timeout")


def test_spawn_failure_is_a_crash_with_the_error() -> None:
    view = worker(
        *queued(1),
        dispatched(1, "h-1"),
        WorkerSpawnFailed(**ids(1), host_id="h-1", error="no such strategy"),
    )
    assert (view.status, view.pid, view.reason) == (
        JobStatus.CRASHED,
        None,
        "spawn failed: no such strategy",
    )


def test_permanent_spawn_failure_shows_its_reason_as_it_is() -> None:
    view = worker(
        *queued(1),
        dispatched(1, "h-1"),
        WorkerSpawnFailed(**ids(1), host_id="h-1", error="exchange rejected the API key",
                          permanent=True),
    )
    assert (view.status, view.reason) == (JobStatus.CRASHED, "exchange rejected the API key")


def test_restarts_exhausted_fails_the_job() -> None:
    steps = [*running(1), crashed(1)]
    for attempt in (1, 2, 3):
        steps += [*restarted(1, attempt, pid=100 + attempt), crashed(1, attempt=attempt)]
    steps.append(RestartsExhausted(**ids(1), attempts=3))
    view = worker(*steps)
    assert (view.status, view.pid, view.restart_count) == (JobStatus.FAILED, None, 3)
    assert view.ended_at == at(len(steps) - 1)
    assert view.reason == "restarts exhausted after 3 attempts"


def test_stop_marks_the_request_then_stops_the_worker() -> None:
    steps = [
        *running(1),
        StopRequested(**ids(1), host_id="h-1", flatten=False, reason="stopped by user"),
    ]
    assert worker(*steps).stop_requested
    assert worker(*steps).status is JobStatus.RUNNING

    view = worker(*steps, WorkerStopped(**ids(1), reason="stopped by user", exit_code=0))
    assert (view.status, view.pid, view.stop_requested) == (JobStatus.STOPPED, None, True)
    assert (view.ended_at, view.reason) == (at(6), "stopped by user")


def timed(start: datetime, *steps: Message) -> list[Envelope]:
    """Alice's envelopes one second apart from `start` (`history` begins at `T0`)."""
    shifted = history(*steps)
    return [e.model_copy(update={"occurred_at": start + (e.occurred_at - T0)}) for e in shifted]


def test_an_ended_worker_is_kept_for_a_week_then_forgotten_with_its_positions_and_stats(
) -> None:
    """Forgotten once a start or an end in the log is `ENDED_KEPT_HOURS` (rounded to the hour)
    after its end; a worker running since before is kept; a late event about it changes
    nothing."""
    ended = T0 + timedelta(hours=1)
    state = fold([
        *timed(T0, *running(1), position(1, "BTC", 1.0), trade(1, 5.0)),
        *timed(ended, WorkerStopped(**ids(1), reason="stopped by user", exit_code=0),
               *running(2)),
    ])
    assert state.workers["w-1"].ended_at == ended and state.positions["w-1"]

    week = timedelta(hours=ENDED_KEPT_HOURS)
    state = fold(timed(ended + week - timedelta(minutes=1), requested(3)), state)
    assert {"w-1", "w-2", "w-3"} <= set(state.workers)

    state = fold(timed(ended + week + timedelta(hours=1), requested(4)), state)
    assert set(state.workers) == {"w-2", "w-3", "w-4"}
    assert "w-1" not in state.positions and "w-1" not in state.stats
    assert "job-1" not in state.worker_by_job and state.ended_by_hour == immutables.Map()

    late = timed(ended + 2 * week, trade(1, 1.0), WorkerStopped(**ids(1), reason="again"))
    after = fold(late, state)
    assert replace(after, early=state.early) == replace(
        state, events_applied=state.events_applied + 2)


def test_a_worker_ended_twice_keeps_its_first_end() -> None:
    """Failed, then stopped (a stop of a failed job): its status and reason change, not when it
    ended, so its retention counts from the first end."""
    steps = [*running(1), RestartsExhausted(**ids(1), attempts=3),
             WorkerStopped(**ids(1), reason="stopped by user", exit_code=None)]
    view = worker(*steps)
    assert (view.status, view.reason, view.ended_at) == (JobStatus.STOPPED, "stopped by user",
                                                         at(len(steps) - 2))


def test_queued_job_can_be_stopped_before_it_runs() -> None:
    view = worker(
        *queued(1),
        StopRequested(**ids(1), host_id=None, flatten=False, reason="stopped by user"),
        WorkerStopped(**ids(1), reason="stopped before start"),
    )
    assert (view.status, view.started_at, view.reason) == (
        JobStatus.STOPPED,
        None,
        "stopped before start",
    )


@pytest.mark.parametrize(
    "late",
    [
        JobAccepted(**ids(1), tier="pro", max_workers=10, in_use=0),
        JobQueued(**ids(1)),
        dispatched(1, "h-9"),
    ],
    ids=lambda m: m.type_name(),
)
def test_late_scheduler_event_does_not_revive_a_stopped_worker(late: Message) -> None:
    view = worker(*running(1), WorkerStopped(**ids(1), reason="stopped by user"), late)
    assert (view.status, view.host_id) == (JobStatus.STOPPED, "h-1")


def test_repeated_request_for_a_known_worker_changes_nothing() -> None:
    state = fold(history(*running(1), requested(1)))
    assert state.workers["w-1"].status is JobStatus.RUNNING


def test_rejected_job_leaves_no_worker_and_is_counted() -> None:
    state = fold(
        history(
            requested(1),
            requested(2),
            JobRejected(
                job_id="job-1", reason=RejectReason.WORKER_LIMIT, detail="free tier allows 1 worker"
            ),
        )
    )
    assert set(state.workers) == {"w-2"}
    assert state.rejected_jobs == 1
    assert queue_stats(state) == QueueStats(queued_jobs=1, total_workers=1)


def test_events_of_a_job_never_requested_show_nothing_and_are_forgotten_after_a_week() -> None:
    strays = history(
        crashed(9),
        WorkerSpawned(**ids(9), host_id="h-1", pid=1),
        WorkerRestarted(**ids(9), host_id="h-1", pid=1, attempt=1),
        RestartsExhausted(**ids(9), attempts=3),
        WorkerStopped(**ids(9), reason="x"),
        StopRequested(**ids(9), host_id=None, flatten=True, reason="x"),
        dispatched(9, "h-1"),
        position(9, "BTC", 1.0),
        trade(9, 5.0),
        PositionsFlattened(**ids(9), count=1),
    )
    state = fold(strays)
    assert replace(state, early=EMPTY.early) == Projections(events_applied=len(strays))
    assert len(state.early["job-9"]) == len(strays)

    a_week_on = T0 + timedelta(hours=ENDED_KEPT_HOURS + 1)
    state = fold(timed(a_week_on, requested(1)), state)
    assert state.early == EMPTY.early and set(state.workers) == {"w-1"}


# A job's events are recorded in the order their publishes were confirmed: a publish nacked
# during a queue leader's election is recorded when retried, after the events it caused.


def test_a_spawn_recorded_before_its_request_is_folded_after_it() -> None:
    view = worker(WorkerSpawned(**ids(1), host_id="h-3", pid=7), requested(1),
                  dispatched(1, "h-3"), JobAccepted(**ids(1), tier="pro", max_workers=10,
                                                    in_use=0))
    assert (view.status, view.pid, view.host_id) == (JobStatus.RUNNING, 7, "h-3")
    assert view.created_at == at(1) and view.started_at == at(0)


def test_a_dispatch_recorded_after_its_spawn_or_crash_changes_nothing() -> None:
    spawned = WorkerSpawned(**ids(1), host_id="h-3", pid=7)
    view = worker(requested(1), spawned, dispatched(1, "h-3"))
    assert (view.status, view.pid) == (JobStatus.RUNNING, 7)
    view = worker(requested(1), spawned, crashed(1), dispatched(1, "h-3"))
    assert view.status is JobStatus.CRASHED
    scheduled, dispatch, restart = restarted(1, 1, pid=8)
    view = worker(*running(1), crashed(1), scheduled, restart, dispatch)
    assert (view.status, view.pid, view.restart_count) == (JobStatus.RUNNING, 8, 1)


def test_a_rejection_recorded_before_its_request_leaves_no_worker_and_is_counted() -> None:
    state = fold(history(
        JobRejected(job_id="job-9", reason=RejectReason.INVALID_REQUEST, detail="bad config"),
        requested(9)))
    assert (state.rejected_jobs, len(state.workers), len(state.early)) == (1, 0, 0)


def test_every_envelope_counts_including_commands_telemetry_and_unknown_types() -> None:
    envelopes = history(
        StartRunner(
            **ids(1),
            strategy_id="s-1",
            broker_id="paper",
            credentials_sealed="sealed",
            config=CONFIG,
        ),
        requested(1),
        OrderFilled(
            **ids(1), order_id="o-1", instrument="BTC", side="buy", amount=1.0, price=100.0
        ),
        HostOnline(host_id="h-1", capacity=4, hostname="box", pid=1),
        WorkerHeartbeat(**ids(1), host_id="h-1", pid=1, at=T0),
    )
    envelopes.append(
        Envelope(type="FromANewerBuild", version=1, stream="x", payload={"anything": True})
    )
    state = fold(envelopes)
    assert state.events_applied == 6
    assert set(state.workers) == {"w-1"}


def test_apply_leaves_the_previous_state_untouched() -> None:
    envelopes = history(*running(1), position(1, "BTC", 1.0), trade(1, 2.0))
    before = fold(envelopes[:-2])
    snapshot = (
        dict(before.workers),
        dict(before.positions),
        dict(before.stats),
        before.events_applied,
    )

    after = fold(envelopes[-2:], before)

    assert (
        dict(before.workers),
        dict(before.positions),
        dict(before.stats),
        before.events_applied,
    ) == snapshot
    assert after != before


# --- positions and trading stats --------------------------------------------------------------


def test_position_changes_replace_the_position_per_instrument() -> None:
    state = fold(
        history(
            *running(1),
            position(1, "BTC", 1.0, price=100.0),
            position(1, "ETH", 2.0, side="short", price=10.0),
            position(1, "BTC", 1.5, price=101.0),
        )
    )
    assert dict(state.positions["w-1"]) == {
        "BTC": PositionView("BTC", "long", 1.5, 101.0),
        "ETH": PositionView("ETH", "short", 2.0, 10.0),
    }


def test_flat_position_is_removed() -> None:
    state = fold(
        history(
            *running(1), position(1, "BTC", 1.0), position(1, "ETH", 1.0), position(1, "BTC", 0.0)
        )
    )
    assert set(state.positions["w-1"]) == {"ETH"}


def test_last_flat_position_leaves_no_entry_for_the_worker() -> None:
    state = fold(
        history(
            *running(1), position(1, "BTC", 1.0), position(1, "BTC", 0.0), position(1, "ETH", 0.0)
        )
    )
    assert "w-1" not in state.positions


def test_flatten_clears_positions_even_without_closing_changes() -> None:
    state = fold(
        history(
            *running(1),
            position(1, "BTC", 1.0),
            position(1, "ETH", 3.0),
            StopRequested(**ids(1), host_id="h-1", flatten=True, reason="stopped by user"),
            position(1, "BTC", 0.0),  # the ETH close never arrived as its own event
            PositionsFlattened(**ids(1), count=2, realized_pnl=4.0),
            WorkerStopped(**ids(1), reason="stopped by user"),
        )
    )
    assert "w-1" not in state.positions
    assert state.workers["w-1"].status is JobStatus.STOPPED


def test_flatten_only_clears_its_own_worker() -> None:
    state = fold(
        history(
            *running(1),
            *running(2),
            position(1, "BTC", 1.0),
            position(2, "BTC", 2.0),
            PositionsFlattened(**ids(1), count=1),
        )
    )
    assert set(state.positions) == {"w-2"}


def test_two_wins_of_three_trades_is_a_two_thirds_win_rate() -> None:
    stats = fold(history(*running(1), trade(1, 10.0), trade(1, -4.0), trade(1, 2.5))).stats["w-1"]
    assert stats == TradingStats(total_trades=3, winning_trades=2, losing_trades=1, total_pnl=8.5)
    assert round(stats.win_rate, 2) == 66.67


def test_breakeven_trade_counts_but_neither_wins_nor_loses() -> None:
    stats = fold(history(*running(1), trade(1, 0.0))).stats["w-1"]
    assert (stats.total_trades, stats.winning_trades, stats.losing_trades, stats.win_rate) == (
        1,
        0,
        0,
        0.0,
    )


def test_no_trades_no_stats() -> None:
    state = fold(history(*running(1)))
    assert "w-1" not in state.stats
    assert TradingStats().win_rate == 0.0


def test_stats_are_per_worker() -> None:
    state = fold(history(*running(1), *running(2), trade(1, 1.0), trade(2, -1.0), trade(2, -2.0)))
    assert state.stats["w-1"] == TradingStats(1, 1, 0, 1.0)
    assert state.stats["w-2"] == TradingStats(2, 0, 2, -3.0)


# --- queue stats ------------------------------------------------------------------------------


def fleet() -> list[Envelope]:
    """alice: one running, one queued, one failed; bob: one crashed, one stopped; carol rejected."""
    steps: list[Message | tuple[str, Message]] = [*running(1), *queued(2)]
    steps += [*running(3), crashed(3), RestartsExhausted(**ids(3), attempts=3)]
    steps += [("bob", m) for m in [*running(4), crashed(4)]]
    steps += [("bob", m) for m in [*running(5), WorkerStopped(**ids(5), reason="stopped by user")]]
    steps += [
        ("carol", requested(6)),
        (
            "carol",
            JobRejected(job_id="job-6", reason=RejectReason.ENTITLEMENT_EXPIRED, detail="expired"),
        ),
    ]
    return history(*steps)


@pytest.mark.parametrize(
    ("user_id", "expected"),
    [
        (None, QueueStats(queued_jobs=1, running_workers=1, total_workers=5, failed_jobs=1)),
        ("alice", QueueStats(queued_jobs=1, running_workers=1, total_workers=3, failed_jobs=1)),
        ("bob", QueueStats(queued_jobs=0, running_workers=0, total_workers=2, failed_jobs=0)),
        ("carol", QueueStats()),
        ("nobody", QueueStats()),
    ],
)
def test_queue_stats_per_user_and_for_everyone(user_id: str | None, expected: QueueStats) -> None:
    state = fold(fleet())
    assert queue_stats(state, user_id) == expected
    assert state.rejected_jobs == 1


def test_queue_stats_of_nothing_are_zero() -> None:
    assert queue_stats(EMPTY) == QueueStats()


# --- entitlements -----------------------------------------------------------------------------

EXPIRES = datetime(2025, 2, 1, tzinfo=UTC)


def test_upgrade_sets_tier_limit_and_expiry() -> None:
    state = fold(
        history(("alice", EntitlementUpgraded(tier="pro", max_workers=10, expires_at=EXPIRES)))
    )
    assert state.entitlements["alice"] == EntitlementView("alice", "pro", 10, EXPIRES)


def test_expiry_alone_changes_nothing_the_downgrade_does() -> None:
    upgraded = history(
        ("alice", EntitlementUpgraded(tier="pro", max_workers=10, expires_at=EXPIRES)),
        ("alice", EntitlementExpired(tier="pro", expired_at=EXPIRES)),
    )
    assert fold(upgraded).entitlements["alice"] == EntitlementView("alice", "pro", 10, EXPIRES)

    downgraded = fold(
        [
            *upgraded,
            *history(
                (
                    "alice",
                    EntitlementDowngraded(
                        from_tier="pro", to_tier="free", max_workers=1, reason="expired"
                    ),
                )
            ),
        ]
    )
    assert downgraded.entitlements["alice"] == EntitlementView("alice", "free", 1, None)


def test_entitlements_are_per_user() -> None:
    state = fold(
        history(
            ("alice", EntitlementUpgraded(tier="pro", max_workers=10, expires_at=EXPIRES)),
            ("bob", EntitlementUpgraded(tier="basic", max_workers=3, expires_at=EXPIRES)),
            (
                "alice",
                EntitlementUpgraded(
                    tier="enterprise", max_workers=50, expires_at=EXPIRES + timedelta(days=30)
                ),
            ),
        )
    )
    assert {user: (view.tier, view.max_workers) for user, view in state.entitlements.items()} == {
        "alice": ("enterprise", 50),
        "bob": ("basic", 3),
    }


def test_entitlement_event_without_a_user_is_ignored() -> None:
    envelope = Envelope.wrap(
        EntitlementUpgraded(tier="pro", max_workers=10, expires_at=EXPIRES), stream="user-?"
    )
    state = apply(EMPTY, envelope)
    assert (len(state.entitlements), state.events_applied) == (0, 1)
