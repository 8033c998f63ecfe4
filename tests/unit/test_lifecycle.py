"""The scheduler's job lifecycle, given a history of messages, when one more comes, then the job,
the events and the timers: every branch of `lifecycle.decide`, and the queue's and circuit's
rules (`policy`)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from events import (
    CircuitClosed,
    CircuitOpened,
    CrashReason,
    FlattenFailed,
    HostLost,
    JobAccepted,
    JobDispatched,
    JobQueued,
    JobRejected,
    JobRequested,
    Message,
    QueuePaused,
    QueueResumed,
    RestartsExhausted,
    StopRequested,
    StopRunner,
    StrategyConfig,
    WorkerCrashed,
    WorkerRestarted,
    WorkerRestartScheduled,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerStopped,
)
from services.decision import CancelTimer, SetTimer
from services.scheduler.lifecycle import (
    Decision,
    Dispatch,
    Input,
    Job,
    RestartDue,
    State,
    decide,
)
from services.scheduler.policy import (
    Circuit,
    HostLoad,
    QueueFacts,
    admit,
    assign,
    circuit_cooled,
    strategy_failed,
)
from services.settings import Settings

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
SETTINGS = Settings(max_restarts=3, restart_backoff=1.0, restart_backoff_max=60.0,
                    healthy_reset_after=300.0, host_lease=15.0)
IDS = {"job_id": "j-1", "worker_id": "w-1"}
CONFIG = StrategyConfig(name="hold", type="hold", parameters={"amount": 2})


def requested() -> Job:
    return replace(Job.requested(JobRequested(**IDS, strategy_id="s-1", broker_id="paper",
                                              credentials_sealed="sealed", config=CONFIG),
                                 "alice"), seq=1)


def given(*history: Input) -> Job:
    """The job after `history`, each message a second after the one before."""
    job = requested()
    for n, message in enumerate(history):
        job = decide(job, message, NOW - timedelta(seconds=len(history) - n), SETTINGS).job
    return job


def when(job: Job, message: Input, **facts: object) -> Decision:
    return decide(job, message, NOW, SETTINGS, **facts)  # type: ignore[arg-type]


ACCEPTED = JobAccepted(**IDS, tier="free", max_workers=1, in_use=1)
PLACED = Dispatch("h-1", "run-1")


def spawned(attempt: int = 0, host: str = "h-1") -> WorkerSpawned:
    return WorkerSpawned(**IDS, host_id=host, pid=42, attempt=attempt)


def crashed(attempt: int = 0, reason: CrashReason = CrashReason.EXITED) -> WorkerCrashed:
    return WorkerCrashed(**IDS, host_id="h-1", attempt=attempt, reason=reason, exit_code=1)


def stop(flatten: bool = False) -> StopRunner:
    return StopRunner(worker_id="w-1", flatten=flatten, reason="stopped by user")


RUNNING = (ACCEPTED, PLACED, spawned())


def events(decision: Decision) -> list[type[Message]]:
    return [type(event) for event in decision.events]


# ---------------------------------------------------------------- the start path


def test_accepted_queues_a_requested_job_once() -> None:
    decision = when(given(), ACCEPTED)
    assert decision.job.state == State.QUEUED and events(decision) == [JobQueued]
    assert when(decision.job, ACCEPTED) == Decision(decision.job)  # a duplicate


def test_rejected_ends_a_requested_job_and_nothing_else() -> None:
    decision = when(given(), JobRejected(job_id="j-1", reason="worker_limit", detail="full"))
    assert (decision.job.state, decision.job.ended_at, decision.events) == (
        State.REJECTED, NOW, ())
    queued = given(ACCEPTED)
    assert when(queued, JobRejected(job_id="j-1", reason="worker_limit", detail="x")).job \
        == queued


def test_a_queued_job_is_dispatched_with_all_its_host_needs() -> None:
    decision = when(given(ACCEPTED), PLACED)
    assert (decision.job.state, decision.job.host_id) == (State.DISPATCHED, "h-1")
    (dispatched,) = decision.events
    assert dispatched == JobDispatched(**IDS, host_id="h-1", attempt=0, strategy_id="s-1",
                                       broker_id="paper", credentials_sealed="sealed",
                                       config=CONFIG, host_incarnation="run-1")
    assert when(decision.job, PLACED).job == decision.job  # placed once


def test_the_current_attempt_spawned_runs_from_when_the_host_saw_it_start() -> None:
    at = NOW - timedelta(seconds=3)
    decision = when(given(ACCEPTED, PLACED), spawned(), occurred_at=at)
    assert (decision.job.state, decision.job.host_id, decision.job.started_at) == (
        State.RUNNING, "h-1", at)
    assert decision.events == ()


@pytest.mark.parametrize("late", [spawned(attempt=3, host="h-9"),
                                  WorkerRestarted(**IDS, host_id="h-9", pid=7, attempt=1)])
def test_a_spawn_of_another_attempt_changes_nothing(late: Message) -> None:
    job = given(ACCEPTED, PLACED)
    assert when(job, late) == Decision(job)


def test_a_late_spawn_never_revives_a_stopped_job() -> None:
    job = given(ACCEPTED, stop())
    assert job.state == State.STOPPED
    assert when(job, spawned()) == Decision(job)


# ---------------------------------------------------------------- crashes and restarts


def test_a_crash_schedules_the_next_attempt_after_the_backoff_from_the_crash() -> None:
    at = NOW - timedelta(seconds=0.4)
    decision = when(given(*RUNNING), crashed(), occurred_at=at)
    assert (decision.job.state, decision.job.streak, decision.job.host_id) == (
        State.CRASHED, 1, None)
    (scheduled,) = decision.events
    assert scheduled == WorkerRestartScheduled(**IDS, attempt=1, delay=1.0,
                                               due_at=at + timedelta(seconds=1))
    assert decision.timers == (SetTimer("restart:j-1", "restart", at + timedelta(seconds=1),
                                        {"job_id": "j-1"}),)
    assert decision.strategy_failed


def test_the_backoff_doubles_in_a_streak_and_the_restart_runs_as_the_next_attempt() -> None:
    job = given(*RUNNING, crashed(), RestartDue("j-1"))
    assert (job.state, job.attempt) == (State.QUEUED, 1)
    job = given(*RUNNING, crashed(), RestartDue("j-1"), PLACED, spawned(1))
    decision = when(job, crashed(1))
    assert decision.events[0].delay == 2.0 and decision.job.streak == 2  # type: ignore[attr-defined]


def test_restarts_run_out_and_the_job_fails() -> None:
    history: list[Input] = list(RUNNING)
    for attempt in range(3):
        history += [crashed(attempt), RestartDue("j-1"), PLACED, spawned(attempt + 1)]
    decision = when(given(*history), crashed(3))
    assert (decision.job.state, decision.job.ended_at) == (State.FAILED, NOW)
    assert decision.events == (RestartsExhausted(**IDS, attempts=3,
                                                 detail="gave up after 3 restart attempts"),)


def test_a_worker_that_ran_long_enough_starts_a_new_streak() -> None:
    job = replace(given(*RUNNING, crashed(), RestartDue("j-1"), PLACED, spawned(1)),
                  started_at=NOW - timedelta(seconds=SETTINGS.healthy_reset_after))
    decision = when(job, crashed(1))
    assert decision.job.streak == 1 and decision.events[0].delay == 1.0  # type: ignore[attr-defined]


def test_a_user_no_longer_entitled_is_not_restarted() -> None:
    decision = when(given(*RUNNING), crashed(), entitled=False)
    assert decision.job.state == State.FAILED and events(decision) == [RestartsExhausted]


def test_a_spawn_that_failed_is_a_crash_of_the_strategy() -> None:
    decision = when(given(ACCEPTED, PLACED),
                    WorkerSpawnFailed(**IDS, host_id="h-1", attempt=0, error="no hello"))
    assert decision.job.state == State.CRASHED and decision.strategy_failed


@pytest.mark.parametrize("history", [(), (ACCEPTED,), (*RUNNING, crashed())])
def test_a_crash_of_a_job_not_on_a_host_changes_nothing(history: tuple[Input, ...]) -> None:
    job = given(*history)
    assert when(job, crashed()) == Decision(job)


def test_a_crash_of_an_earlier_attempt_changes_nothing() -> None:
    job = given(*RUNNING, crashed(), RestartDue("j-1"), PLACED, spawned(1))
    assert when(job, crashed(0)) == Decision(job)


def test_a_worker_that_dies_while_stopping_is_stopped() -> None:
    decision = when(given(*RUNNING, stop()), crashed())
    assert decision.job.state == State.STOPPED and events(decision) == [WorkerStopped]
    assert not decision.strategy_failed


def test_a_restart_due_for_a_job_no_longer_crashed_changes_nothing() -> None:
    job = given(*RUNNING, crashed(), stop())
    assert when(job, RestartDue("j-1")) == Decision(job)


# ---------------------------------------------------------------- stops


@pytest.mark.parametrize("history", [(ACCEPTED, PLACED), RUNNING])
def test_a_stop_of_a_job_on_a_host_asks_its_host(history: tuple[Input, ...]) -> None:
    decision = when(given(*history), stop(flatten=True))
    assert decision.job.state == State.STOPPING
    assert decision.events == (StopRequested(**IDS, host_id="h-1", flatten=True,
                                             reason="stopped by user"),)
    assert when(decision.job, stop()) == Decision(decision.job)  # asked once


@pytest.mark.parametrize("history", [(), (ACCEPTED,)])
def test_a_stop_before_the_job_runs_ends_it_here(history: tuple[Input, ...]) -> None:
    decision = when(given(*history), stop(flatten=True))
    assert (decision.job.state, decision.job.ended_at) == (State.STOPPED, NOW)
    assert events(decision) == [StopRequested, WorkerStopped]
    assert decision.events[0].host_id is None  # type: ignore[attr-defined]
    assert decision.timers == (CancelTimer("restart:j-1"),)


def test_a_stop_of_an_ended_job_or_by_another_user_changes_nothing() -> None:
    ended = given(ACCEPTED, stop())
    assert when(ended, stop()) == Decision(ended)
    running = given(*RUNNING)
    assert when(running, stop(), sender="mallory") == Decision(running)
    assert when(running, stop(), sender="alice").job.state == State.STOPPING


@pytest.mark.parametrize("history", [RUNNING, (*RUNNING, stop()), (ACCEPTED, PLACED),
                                     (*RUNNING, crashed()), (ACCEPTED,)])
def test_the_worker_stopped_ends_a_live_job_and_cancels_its_restart(
        history: tuple[Input, ...]) -> None:
    decision = when(given(*history), WorkerStopped(**IDS, reason="stopped"))
    assert decision.job.state == State.STOPPED
    assert decision.timers == (CancelTimer("restart:j-1"),)


def test_the_worker_stopped_of_an_ended_job_changes_nothing() -> None:
    job = given(ACCEPTED, stop())
    assert when(job, WorkerStopped(**IDS, reason="late")) == Decision(job)


# ---------------------------------------------------------------- hosts


def test_a_lost_host_crashes_its_job_and_restarts_it_once_the_host_has_surely_fenced() -> None:
    decision = when(given(*RUNNING), HostLost(host_id="h-1", silent_for=31.0))
    assert events(decision) == [WorkerCrashed, WorkerRestartScheduled]
    assert decision.events[0].reason == CrashReason.HOST_LOST  # type: ignore[attr-defined]
    assert decision.events[1].delay == SETTINGS.host_fenced_within  # type: ignore[attr-defined]
    assert decision.job.state == State.CRASHED and not decision.strategy_failed
    # its crash comes back to the scheduler: nothing more happens
    assert when(decision.job, crashed(reason=CrashReason.HOST_LOST)) == Decision(decision.job)


def test_a_host_shut_down_cleanly_restarts_its_jobs_after_the_backoff_only() -> None:
    decision = when(given(*RUNNING), HostLost(host_id="h-1", silent_for=0.0))
    assert decision.events[1].delay == SETTINGS.restart_backoff  # type: ignore[attr-defined]


def test_a_lost_host_crashes_a_stopping_job_which_then_ends_stopped() -> None:
    decision = when(given(*RUNNING, stop()), HostLost(host_id="h-1", silent_for=31.0))
    assert events(decision) == [WorkerCrashed] and decision.job.state == State.STOPPING
    assert when(decision.job, crashed(reason=CrashReason.HOST_LOST)).job.state == State.STOPPED


def test_another_host_lost_changes_nothing() -> None:
    job = given(*RUNNING)
    assert when(job, HostLost(host_id="h-2", silent_for=31.0)) == Decision(job)


# ---------------------------------------------------------------- the queue and the circuit


@pytest.mark.parametrize(("facts", "budget", "pause", "emitted"), [
    (QueueFacts(queued=5, in_flight=0, active=0, paused=False), 2, None, []),
    (QueueFacts(queued=5, in_flight=1, active=3, paused=False), 1, None, []),
    (QueueFacts(queued=0, in_flight=0, active=0, paused=False), 0, None, []),
    (QueueFacts(queued=2, in_flight=0, active=10, paused=False), 0, True, [QueuePaused]),
    (QueueFacts(queued=2, in_flight=0, active=10, paused=True), 0, None, []),
    (QueueFacts(queued=2, in_flight=0, active=9, paused=True), 1, False, [QueueResumed]),
])
def test_admission_to_the_hosts(facts: QueueFacts, budget: int, pause: bool | None,
                                emitted: list[type[Message]]) -> None:
    admission = admit(facts, concurrency=2, ceiling=10)
    assert (admission.budget, admission.pause) == (budget, pause)
    assert [type(e) for e in admission.events] == emitted


def test_jobs_go_to_the_host_with_most_room_in_turn_until_all_are_full() -> None:
    hosts = [HostLoad("a", 2, 1), HostLoad("b", 3, 1), HostLoad("c", 1, 1)]
    assert assign(5, hosts) == ["b", "a", "b"]


def test_a_strategy_failing_repeatedly_opens_its_circuit_until_the_cool_down() -> None:
    circuit = Circuit("alice", "s-1")
    rules = {"window": 600.0, "threshold": 3, "cooldown": 300.0}
    for n in range(2):
        circuit, opened, timers = strategy_failed(circuit, NOW + timedelta(seconds=n), **rules)
        assert (opened, timers) == ((), ())
    circuit, opened, timers = strategy_failed(circuit, NOW + timedelta(seconds=2), **rules)
    until = NOW + timedelta(seconds=302)
    assert opened == (CircuitOpened(strategy_id="s-1", failures=3, retry_at=until),)
    assert timers == (SetTimer("circuit:alice|s-1", "circuit", until,
                               {"user_id": "alice", "strategy_id": "s-1"}),)
    assert circuit_cooled(circuit, NOW) == (circuit, ())  # not yet
    closed, events_ = circuit_cooled(circuit, until)
    assert closed.open_until is None and events_ == (CircuitClosed(strategy_id="s-1"),)


def test_a_permanent_spawn_failure_fails_the_job_at_once_with_its_reason() -> None:
    refused = WorkerSpawnFailed(**IDS, host_id="h-1", attempt=0, permanent=True,
                                error="exchange rejected the API key")
    decision = when(given(ACCEPTED, PLACED), refused)
    assert (decision.job.state, decision.job.ended_at) == (State.FAILED, NOW)
    assert decision.events == (RestartsExhausted(**IDS, attempts=0,
                                                 detail="exchange rejected the API key"),)
    assert not decision.strategy_failed and decision.timers == ()


# ---------------------------------------------------------------- flatten-only runs


@pytest.mark.parametrize("history", [(*RUNNING, crashed()),
                                     (*RUNNING, crashed(), RestartDue("j-1"), PLACED,
                                      WorkerSpawnFailed(**IDS, host_id="h-1", attempt=1,
                                                        error="no", permanent=True))])
def test_a_stop_with_flatten_of_a_job_not_running_queues_a_flatten_only_run(
        history: tuple[Input, ...]) -> None:
    """Crashed awaiting its restart, or failed for good: its positions are still open on the
    account, so a short run under its credentials closes them."""
    job = given(*history)
    decision = when(job, stop(flatten=True))
    assert (decision.job.state, decision.job.flatten_only) == (State.QUEUED, True)
    assert decision.job.attempt == job.attempt + 1 and decision.job.ended_at is None
    assert events(decision) == [StopRequested]
    assert decision.timers == (CancelTimer("restart:j-1"),)
    dispatched = when(decision.job, PLACED).events[0]
    assert dispatched.mode == "flatten"  # type: ignore[attr-defined]


def test_a_flatten_only_run_ends_stopped_when_its_worker_stops() -> None:
    job = given(*RUNNING, crashed(), stop(flatten=True), PLACED, spawned(1))
    assert job.state == State.RUNNING
    decision = when(job, WorkerStopped(**IDS, reason="stopped"))
    assert decision.job.state == State.STOPPED


def test_a_flatten_only_run_that_fails_is_not_restarted_and_says_so() -> None:
    job = given(*RUNNING, crashed(), stop(flatten=True), PLACED)
    decision = when(job, WorkerSpawnFailed(**IDS, host_id="h-1", attempt=1, error="exchange down"))
    assert decision.job.state == State.STOPPED
    assert events(decision) == [FlattenFailed, WorkerStopped]
    assert "exchange down" in decision.events[0].error  # type: ignore[attr-defined]
    assert not decision.strategy_failed


def test_a_stop_without_flatten_of_a_failed_job_changes_nothing() -> None:
    history: list[Input] = list(RUNNING)
    for attempt in range(4):
        history += [crashed(attempt), RestartDue("j-1"), PLACED, spawned(attempt + 1)]
    job = given(*history)
    assert job.state == State.FAILED
    assert when(job, stop()) == Decision(job)
