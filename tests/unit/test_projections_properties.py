"""Properties of the fold over generated, valid histories: chunked folding equals one fold, a fold
of the log read back from JSON equals the live fold, and the result matches each job's script."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from unittest import mock
from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import (
    CrashReason,
    EntitlementDowngraded,
    EntitlementExpired,
    EntitlementUpgraded,
    Envelope,
    Fill,
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
    WorkerRestarted,
    WorkerRestartScheduled,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerStopped,
)
from events.envelope import LoggedEnvelope
from projections import EMPTY, Projections, QueueStats, fold, kept_from, queue_stats
from projections import state as state_module

USERS = ("alice", "bob", "carol")
HOSTS = ("h-1", "h-2")
INSTRUMENTS = ("BTC-PERPETUAL", "ETH-PERPETUAL", "SOL-PERPETUAL")
TIERS = {"free": 1, "basic": 3, "pro": 10, "enterprise": 50}
MAX_RESTARTS = 3
CONFIG = StrategyConfig(name="Scalper", type="scalping", parameters={"window": 20})
PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

amounts = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
prices = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)
pnls = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@dataclass
class Outcome:
    """What one job's script must leave in the projections (`status` None: rejected)."""

    user_id: str
    status: JobStatus | None
    restart_count: int = 0
    open_instruments: set[str] = field(default_factory=set)
    trades: int = 0


@dataclass
class History:
    envelopes: list[Envelope]
    outcomes: dict[str, Outcome]  # by worker id
    tiers: dict[str, tuple[str, int]]  # user -> (tier, max workers) at the end
    rejected: int


def trading(
    draw: st.DrawFn, ids: dict[str, str], held: dict[str, str], outcome: Outcome
) -> list[Message]:
    """A few fills opening, moving or closing positions; keeps `held` (instrument: side) current."""
    messages: list[Message] = []
    for _ in range(draw(st.integers(0, 3))):
        instrument = draw(st.sampled_from(INSTRUMENTS))
        amount, price = draw(amounts), draw(prices)
        order = {
            "order_id": f"o-{len(messages)}",
            "instrument": instrument,
            "amount": amount,
            "price": price,
        }
        if instrument in held and draw(st.booleans()):
            side = held.pop(instrument)
            messages += [
                OrderFilled(**ids, **order, side="sell" if side == "long" else "buy"),
                PositionChanged(
                    **ids, instrument=instrument, side=side, amount=0.0, entry_price=price
                ),
                TradeClosed(
                    **ids,
                    instrument=instrument,
                    side=side,
                    amount=amount,
                    entry_price=price,
                    exit_price=draw(prices),
                    realized_pnl=draw(pnls),
                ),
            ]
            outcome.trades += 1
        else:
            side = held.setdefault(instrument, draw(st.sampled_from(("long", "short"))))
            messages += [
                OrderFilled(**ids, **order, side="buy" if side == "long" else "sell"),
                PositionChanged(
                    **ids, instrument=instrument, side=side, amount=amount, entry_price=price
                ),
            ]
    return messages


def stop(
    draw: st.DrawFn, ids: dict[str, str], host: str | None, held: dict[str, str], outcome: Outcome
) -> list[Message]:
    """StopRequested, maybe a flatten (some per-position closes may be missing), WorkerStopped."""
    flatten = draw(st.booleans())
    messages: list[Message] = [
        StopRequested(**ids, host_id=host, flatten=flatten, reason="stopped by user")
    ]
    if flatten and held:
        fills = []
        for instrument, side in sorted(held.items()):
            price = draw(prices)
            fills.append(
                Fill(
                    order_id=f"flat-{instrument}",
                    instrument=instrument,
                    side="sell",
                    amount=1.0,
                    price=price,
                )
            )
            if draw(st.booleans()):
                messages.append(
                    PositionChanged(
                        **ids, instrument=instrument, side=side, amount=0.0, entry_price=price
                    )
                )
        messages.append(
            PositionsFlattened(**ids, count=len(held), fills=tuple(fills), realized_pnl=draw(pnls))
        )
        held.clear()
    messages.append(WorkerStopped(**ids, reason="stopped by user", exit_code=0))
    outcome.status = JobStatus.STOPPED
    return messages


def job_script(draw: st.DrawFn, n: int, user: str) -> tuple[list[Message], Outcome]:
    """One job through legal lifecycle transitions; the history may end at any resting point."""
    ids = {"job_id": f"job-{n}", "worker_id": f"w-{n}"}
    outcome = Outcome(user, JobStatus.QUEUED)
    spec = {
        "strategy_id": draw(st.sampled_from(("s-1", "s-2"))),
        "broker_id": "paper",
        "credentials_sealed": "sealed",
        "config": CONFIG,
    }
    messages: list[Message] = [JobRequested(**ids, **spec, flatten_on_stop=draw(st.booleans()))]
    start = draw(
        st.sampled_from(("rejected", "waiting", "stopped while queued", "run", "run", "run"))
    )
    if start == "rejected":
        reason = draw(st.sampled_from(list(RejectReason)))
        outcome.status = None
        return [
            *messages,
            JobRejected(job_id=ids["job_id"], reason=reason, detail=reason.value),
        ], outcome
    messages += [JobAccepted(**ids, tier="pro", max_workers=10, in_use=0), JobQueued(**ids)]
    if start == "waiting":
        return messages, outcome
    held: dict[str, str] = {}
    if start == "stopped while queued":
        return messages + stop(draw, ids, None, held, outcome), outcome

    attempt = 0
    while True:
        host = draw(st.sampled_from(HOSTS))
        messages.append(JobDispatched(**ids, **spec, host_id=host, attempt=attempt))
        if draw(st.integers(0, 4)) == 0:
            messages.append(
                WorkerSpawnFailed(**ids, host_id=host, attempt=attempt, error="exec failed")
            )
        else:
            pid = draw(st.integers(2, 2**22))
            if attempt == 0:
                messages.append(WorkerSpawned(**ids, host_id=host, pid=pid))
            else:
                messages.append(WorkerRestarted(**ids, host_id=host, pid=pid, attempt=attempt))
                if draw(st.integers(0, 3)) == 0:  # the previous host, cut off, reports late
                    late = {
                        "host_id": "h-cut-off",
                        "attempt": attempt - 1,
                        "reason": CrashReason.HOST_LOST,
                    }
                    messages.append(WorkerCrashed(**ids, **late, detail="fenced"))
            outcome.restart_count = attempt
            messages += trading(draw, ids, held, outcome)
            end = draw(st.sampled_from(("keeps running", "stop", "crash", "crash")))
            if end == "keeps running":
                outcome.status = JobStatus.RUNNING
                break
            if end == "stop":
                messages += stop(draw, ids, host, held, outcome)
                break
            reason = draw(
                st.sampled_from(
                    (CrashReason.EXITED, CrashReason.HEARTBEAT_TIMEOUT, CrashReason.HOST_LOST)
                )
            )
            if reason is CrashReason.HEARTBEAT_TIMEOUT:
                messages.append(HeartbeatMissed(**ids, host_id=host, silent_for=30.0))
            exit_code = draw(st.integers(1, 255)) if reason is CrashReason.EXITED else None
            messages.append(
                WorkerCrashed(
                    **ids, host_id=host, attempt=attempt, reason=reason, exit_code=exit_code
                )
            )
        outcome.status = JobStatus.CRASHED
        if attempt == MAX_RESTARTS:
            messages.append(RestartsExhausted(**ids, attempts=MAX_RESTARTS))
            outcome.status = JobStatus.FAILED
            break
        if draw(st.integers(0, 5)) == 0:
            break  # the history ends while the restart is still pending
        attempt += 1
        messages.append(
            WorkerRestartScheduled(
                **ids, attempt=attempt, delay=0.5 * attempt, due_at=datetime(2030, 1, 1, tzinfo=UTC)
            )
        )
    outcome.open_instruments = set(held)
    return messages, outcome


def entitlement_script(draw: st.DrawFn) -> tuple[list[Message], tuple[str, int] | None]:
    messages: list[Message] = []
    current: tuple[str, int] | None = None
    for _ in range(draw(st.integers(0, 2))):
        tier = draw(st.sampled_from(("basic", "pro", "enterprise")))
        expires_at = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(days=draw(st.integers(1, 365)))
        messages.append(
            EntitlementUpgraded(tier=tier, max_workers=TIERS[tier], expires_at=expires_at)
        )
        current = (tier, TIERS[tier])
        if draw(st.booleans()):
            messages += [
                EntitlementExpired(tier=tier, expired_at=expires_at),
                EntitlementDowngraded(
                    from_tier=tier, to_tier="free", max_workers=1, reason="expired"
                ),
            ]
            current = ("free", 1)
    return messages, current


def noise(draw: st.DrawFn) -> list[Message]:
    """Envelopes the projections must count and otherwise ignore, including strays for no worker."""
    stray = {"job_id": "job-stray", "worker_id": "w-stray"}
    pool = [
        StartRunner(
            **stray,
            strategy_id="s-1",
            broker_id="paper",
            credentials_sealed="sealed",
            config=CONFIG,
        ),
        HostOnline(host_id="h-1", capacity=4, hostname="box-1", pid=1),
        WorkerCrashed(**stray, host_id=None, reason=CrashReason.HOST_LOST),
        PositionChanged(
            **stray, instrument="BTC-PERPETUAL", side="long", amount=1.0, entry_price=1.0
        ),
        TradeClosed(
            **stray,
            instrument="BTC-PERPETUAL",
            side="long",
            amount=1.0,
            entry_price=1.0,
            exit_price=2.0,
            realized_pnl=1.0,
        ),
    ]
    return draw(st.lists(st.sampled_from(pool), max_size=3))


@st.composite
def histories(draw: st.DrawFn, days_apart: bool = False) -> History:
    """Several users' jobs and entitlement changes, interleaved; each job's own order is kept.
    Envelopes up to 10 s apart, or, `days_apart`, some of them up to ten days apart (so that
    ended workers are forgotten)."""
    gaps = st.integers(0, 10**7)
    if days_apart:
        gaps = st.one_of(gaps, st.integers(0, 10 * 86_400 * 10**6))
    scripts: list[list[tuple[str, Message]]] = []
    outcomes: dict[str, Outcome] = {}
    for n in range(draw(st.integers(1, 5))):
        user = draw(st.sampled_from(USERS))
        messages, outcome = job_script(draw, n, user)
        scripts.append([(user, m) for m in messages])
        outcomes[f"w-{n}"] = outcome
    tiers = {}
    for user in USERS:
        messages, tier = entitlement_script(draw)
        scripts.append([(user, m) for m in messages])
        if tier is not None:
            tiers[user] = tier
    scripts.append([("mallory", m) for m in noise(draw)])

    pending = [script for script in scripts if script]
    envelopes: list[Envelope] = []
    occurred_at = draw(
        st.datetimes(
            min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
        )
    )
    while pending:
        i = draw(st.integers(0, len(pending) - 1))
        user, message = pending[i].pop(0)
        if not pending[i]:
            del pending[i]
        occurred_at += timedelta(microseconds=draw(gaps))
        job_id = getattr(message, "job_id", None)
        envelopes.append(
            Envelope.wrap(
                message,
                stream=f"job-{job_id}" if job_id else f"user-{user}",
                user_id=user,
                correlation_id=job_id,
                occurred_at=occurred_at,
                event_id=UUID(int=len(envelopes) + 1),
            )
        )
    rejected = sum(outcome.status is None for outcome in outcomes.values())
    return History(envelopes, outcomes, tiers, rejected)


def fold_in_chunks(envelopes: list[Envelope], cuts: list[int]) -> list[Projections]:
    """The state after each chunk, each chunk folded onto the state the previous one left."""
    states, state, start = [], EMPTY, 0
    for end in [*sorted(cuts), len(envelopes)]:
        state = fold(envelopes[start:end], state)
        states.append(state)
        start = end
    return states


@PROPERTY_SETTINGS
@given(history=st.one_of(histories(), histories(days_apart=True)), data=st.data())
def test_folding_in_chunks_equals_folding_at_once(history: History, data: st.DataObject) -> None:
    envelopes = history.envelopes
    cuts = data.draw(st.lists(st.integers(0, len(envelopes)), max_size=6), label="cuts")

    states = fold_in_chunks(envelopes, cuts)

    assert states[-1] == fold(envelopes)
    for end, state in zip(sorted(cuts), states, strict=False):
        assert state == fold(envelopes[:end])  # replay up to any point in time


@PROPERTY_SETTINGS
@given(history=histories(days_apart=True))
def test_ended_workers_are_forgotten_as_the_logs_clock_passes_their_retention(
    history: History,
) -> None:
    """Folding forgets exactly the workers that ended more than `ENDED_KEPT_HOURS` (rounded to
    the hour) before the log's clock, with their positions and stats: the state is the state
    that keeps everything, less those. So forgetting commutes with folding."""
    with mock.patch.object(state_module, "ENDED_KEPT_HOURS", 10**9):
        everything = fold(history.envelopes)
    state = fold(history.envelopes)

    cutoff = kept_from(everything.clock)
    gone = {w for w, view in everything.workers.items()
            if view.ended_at is not None and view.ended_at.timestamp() // 3600 < cutoff}
    assert state.clock == everything.clock
    assert set(state.workers) == set(everything.workers) - gone
    assert all(state.workers[w] == view for w, view in everything.workers.items() if w not in gone)
    assert set(state.positions) == set(everything.positions) - gone
    assert set(state.stats) == set(everything.stats) - gone
    assert set(state.worker_by_job.values()) == set(everything.worker_by_job.values()) - gone


@PROPERTY_SETTINGS
@given(history=st.one_of(histories(), histories(days_apart=True)))
def test_replay_from_the_json_log_equals_the_live_state(history: History) -> None:
    logged = [Envelope.from_json(envelope.to_json()) for envelope in history.envelopes]
    assert fold(logged) == fold(history.envelopes)


@PROPERTY_SETTINGS
@given(history=st.one_of(histories(), histories(days_apart=True)))
def test_the_light_replay_decode_folds_to_the_live_state(history: History) -> None:
    """`runner replay` decodes logged envelopes with `LoggedEnvelope` (no envelope re-validation):
    it must fold to exactly the state the validated envelopes give."""
    logged = [LoggedEnvelope.from_json(envelope.to_json()) for envelope in history.envelopes]
    assert fold(logged) == fold(history.envelopes)  # type: ignore[arg-type]


@PROPERTY_SETTINGS
@given(history=histories(), data=st.data())
def test_a_request_recorded_after_the_events_it_caused_folds_to_the_same_state(
    history: History, data: st.DataObject,
) -> None:
    """A job's request whose publish was retried after a nack is recorded after its job's later
    events: the state is the one its causal order gives."""
    envelopes = list(history.envelopes)
    requests = [i for i, e in enumerate(envelopes) if e.type == JobRequested.type_name()]
    i = data.draw(st.sampled_from(requests), label="request")
    to = data.draw(st.integers(i, len(envelopes) - 1), label="recorded at")
    envelopes.insert(to, envelopes.pop(i))

    assert fold(envelopes) == fold(history.envelopes)


@PROPERTY_SETTINGS
@given(history=histories())
def test_fold_matches_what_each_job_went_through(history: History) -> None:
    state = fold(history.envelopes)

    assert state.events_applied == len(history.envelopes)
    assert state.rejected_jobs == history.rejected
    live = {
        worker_id: outcome
        for worker_id, outcome in history.outcomes.items()
        if outcome.status is not None
    }
    assert set(state.workers) == set(live)
    for worker_id, outcome in live.items():
        view = state.workers[worker_id]
        assert (view.user_id, view.status, view.restart_count) == (
            outcome.user_id,
            outcome.status,
            outcome.restart_count,
        )
        assert (view.pid is not None) == (outcome.status is JobStatus.RUNNING)
        assert set(state.positions.get(worker_id, {})) == outcome.open_instruments
        stats = state.stats.get(worker_id)
        assert (stats.total_trades if stats else 0) == outcome.trades
    assert {
        user: (view.tier, view.max_workers) for user, view in state.entitlements.items()
    } == history.tiers


@PROPERTY_SETTINGS
@given(history=histories())
def test_queue_stats_of_all_users_add_up_to_the_global_figures(history: History) -> None:
    state = fold(history.envelopes)
    per_user = [queue_stats(state, user) for user in USERS]
    total = queue_stats(state)

    assert total == QueueStats(
        queued_jobs=sum(s.queued_jobs for s in per_user),
        running_workers=sum(s.running_workers for s in per_user),
        total_workers=sum(s.total_workers for s in per_user),
        failed_jobs=sum(s.failed_jobs for s in per_user),
    )
    assert total.total_workers == len(history.outcomes) - history.rejected
