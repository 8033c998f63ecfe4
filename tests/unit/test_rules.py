"""The pure decisions: entitlement limits, restart policy, circuit breaker, placement, throttle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from events import RejectReason
from services.entitlement.rules import Accept, Plan, Reject, decide, excess
from services.scheduler.policy import (
    GiveUp,
    HostLoad,
    Restart,
    after_crash,
    dispatch_budget,
    place,
    record_failure,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=1)
EARLIER = NOW - timedelta(seconds=1)


@pytest.mark.parametrize(
    ("plan", "in_use", "expected"),
    [
        (Plan(), 0, Accept("free", 1, 1)),
        (Plan(), 1, Reject(RejectReason.WORKER_LIMIT, "worker limit reached: 1 of 1 (free)")),
        (Plan("basic", LATER), 2, Accept("basic", 3, 3)),
        (
            Plan("basic", LATER),
            3,
            Reject(RejectReason.WORKER_LIMIT, "worker limit reached: 3 of 3 (basic)"),
        ),
        (Plan("pro", LATER), 9, Accept("pro", 10, 10)),
        (Plan("enterprise", LATER), 49, Accept("enterprise", 50, 50)),
        (
            Plan("enterprise", LATER),
            50,
            Reject(RejectReason.WORKER_LIMIT, "worker limit reached: 50 of 50 (enterprise)"),
        ),
        (Plan("pro", EARLIER), 0, Accept("free", 1, 1)),  # expired: free, never locked out
    ],
)
def test_decide_start(plan: Plan, in_use: int, expected: Accept | Reject) -> None:
    assert decide(plan, in_use, NOW) == expected


def test_an_expired_upgrade_over_the_free_limit_says_it_expired() -> None:
    decision = decide(Plan("pro", EARLIER), 1, NOW)
    assert isinstance(decision, Reject) and decision.reason == RejectReason.ENTITLEMENT_EXPIRED
    assert "pro entitlement expired" in decision.detail and "1 of 1 (free)" in decision.detail


@pytest.mark.parametrize(
    ("jobs", "limit", "stopped"),
    [(["a", "b", "c"], 1, ["c", "b"]), (["a", "b"], 3, []), (["a", "b", "c"], 0, ["c", "b", "a"])],
)
def test_downgrade_stops_the_newest_first(jobs: list[str], limit: int, stopped: list[str]) -> None:
    assert excess(jobs, limit) == stopped


POLICY = dict(max_restarts=3, healthy_reset_after=300.0, backoff=1.0, backoff_max=8.0)


@pytest.mark.parametrize(
    ("streak", "ran_for", "entitled", "expected"),
    [
        (0, 1.0, True, Restart(streak=1, delay=1.0)),
        (1, 1.0, True, Restart(streak=2, delay=2.0)),
        (2, 1.0, True, Restart(streak=3, delay=4.0)),
        (3, 1.0, True, GiveUp(3, "gave up after 3 restart attempts")),
        (3, 301.0, True, Restart(streak=1, delay=1.0)),  # healthy for a while: a new streak
        (2, None, True, Restart(streak=3, delay=4.0)),  # never started (spawn failed)
        (
            0,
            1.0,
            False,
            GiveUp(0, "not restarted: the user is not entitled to this worker any more"),
        ),
    ],
)
def test_after_crash(streak: int, ran_for: float | None, entitled: bool, expected: object) -> None:
    assert after_crash(streak=streak, ran_for=ran_for, entitled=entitled, **POLICY) == expected


def test_backoff_is_capped() -> None:
    decision = after_crash(
        streak=5,
        ran_for=0,
        entitled=True,
        max_restarts=10,
        healthy_reset_after=300,
        backoff=1.0,
        backoff_max=8.0,
    )
    assert decision == Restart(streak=6, delay=8.0)


def test_circuit_opens_at_the_threshold_within_the_window() -> None:
    failures, open_until = record_failure([], NOW, window=60, threshold=3, cooldown=30)
    assert open_until is None and failures == [NOW]
    failures, open_until = record_failure(
        failures, NOW + timedelta(seconds=10), window=60, threshold=3, cooldown=30
    )
    assert open_until is None and len(failures) == 2
    failures, open_until = record_failure(
        failures, NOW + timedelta(seconds=20), window=60, threshold=3, cooldown=30
    )
    assert open_until == NOW + timedelta(seconds=50) and failures == []


def test_failures_outside_the_window_do_not_count() -> None:
    old = [NOW - timedelta(seconds=120), NOW - timedelta(seconds=90)]
    failures, open_until = record_failure(old, NOW, window=60, threshold=3, cooldown=30)
    assert open_until is None and failures == [NOW]


@pytest.mark.parametrize(
    ("hosts", "chosen"),
    [
        ([HostLoad("a", 10, 3), HostLoad("b", 10, 1)], "b"),
        ([HostLoad("a", 10, 2), HostLoad("b", 10, 2)], "a"),  # ties: lowest id
        ([HostLoad("a", 2, 2), HostLoad("b", 1, 1)], None),  # all full
        ([], None),
    ],
)
def test_place_on_the_host_with_most_free_capacity(
    hosts: list[HostLoad], chosen: str | None
) -> None:
    assert place(hosts) == chosen


@pytest.mark.parametrize(
    ("active", "in_flight", "concurrency", "ceiling", "budget"),
    [
        (0, 0, 1, 1000, 1),
        (5, 1, 1, 1000, 0),
        (5, 1, 4, 1000, 3),
        (999, 0, 4, 1000, 1),
        (1000, 0, 4, 1000, 0),
    ],
)
def test_dispatch_budget(
    active: int, in_flight: int, concurrency: int, ceiling: int, budget: int
) -> None:
    assert (
        dispatch_budget(
            active=active, in_flight=in_flight, concurrency=concurrency, ceiling=ceiling
        )
        == budget
    )
