"""The message catalogue: every type round-trips through the log format, stays frozen and strict,
and old logged versions load through their upcasters."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import ClassVar
from uuid import UUID

import pytest
from pydantic import ValidationError

import events
from events import (
    REGISTRY,
    CircuitClosed,
    CircuitOpened,
    CrashReason,
    EntitlementDowngraded,
    EntitlementExpired,
    EntitlementUpgraded,
    Envelope,
    Event,
    Fill,
    FlattenFailed,
    HeartbeatMissed,
    HostHeartbeat,
    HostLost,
    HostOnline,
    JobAccepted,
    JobDispatched,
    JobQueued,
    JobRejected,
    JobRequested,
    Message,
    OrderFilled,
    OrderRejected,
    Position,
    PositionChanged,
    PositionMark,
    PositionsFlattened,
    QueuePaused,
    QueueResumed,
    RejectReason,
    RestartsExhausted,
    RiskLimitHit,
    RiskManagement,
    StartRunner,
    StopRequested,
    StopRunner,
    StrategyConfig,
    TradeClosed,
    UnknownMessageType,
    UpgradeEntitlement,
    WorkerCrashed,
    WorkerHeartbeat,
    WorkerHeartbeats,
    WorkerRestarted,
    WorkerRestartScheduled,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerStopped,
)
from events.base import UPCASTERS, upcaster

AT = datetime(2025, 3, 14, 9, 26, 53, 589793, tzinfo=UTC)
LATER = datetime(2025, 4, 14, 9, 26, 53, tzinfo=UTC)
CONFIG = StrategyConfig(
    name="Scalper",
    type="scalping",
    parameters={"window": 20, "threshold": 0.25, "symbols": ["BTC", "ETH"]},
    risk_management=RiskManagement(
        max_position_size=10.0, stop_loss_percent=1.5, take_profit_percent=4.0
    ),
    instruments=("BTC-PERPETUAL", "ETH-PERPETUAL"),
)
FILL = Fill(
    order_id="o-1", instrument="BTC-PERPETUAL", side="sell", amount=0.5, price=64123.5, fee=0.12
)
JOB = {"job_id": "job-1"}
WORKER = {"job_id": "job-1", "worker_id": "w-1"}

# One valid, non-default-heavy example of every catalogue type.
EXAMPLES: dict[str, Message] = {
    m.type_name(): m
    for m in (
        StartRunner(
            job_id="job-1",
            worker_id="w-1",
            strategy_id="s-1",
            broker_id="paper",
            credentials_sealed="gAAAAA-sealed",
            config=CONFIG,
            flatten_on_stop=False,
        ),
        StopRunner(worker_id="w-1", flatten=True, reason="end of day"),
        UpgradeEntitlement(tier="pro", days=30.5),
        JobRequested(
            **JOB,
            worker_id="w-1",
            strategy_id="s-1",
            broker_id="paper",
            credentials_sealed="gAAAAA-sealed",
            config=CONFIG,
        ),
        JobAccepted(**JOB, worker_id="w-1", tier="basic", max_workers=3, in_use=2),
        JobRejected(
            **JOB, reason=RejectReason.CIRCUIT_OPEN, detail="strategy failing", retry_at=LATER
        ),
        JobQueued(**JOB, worker_id="w-1"),
        JobDispatched(
            **JOB,
            worker_id="w-1",
            host_id="h-1",
            attempt=2,
            strategy_id="s-1",
            broker_id="paper",
            credentials_sealed="gAAAAA-sealed",
            config=CONFIG,
        ),
        WorkerSpawned(**WORKER, host_id="h-1", pid=4242, attempt=1),
        WorkerSpawnFailed(**WORKER, host_id="h-1", error="exchange rejected the API key",
                          permanent=True),
        HeartbeatMissed(**WORKER, host_id="h-1", silent_for=31.5),
        WorkerCrashed(
            **WORKER,
            host_id=None,
            attempt=2,
            reason=CrashReason.EXITED,
            exit_code=137,
            detail="killed",
        ),
        WorkerRestartScheduled(**WORKER, attempt=2, delay=1.5, due_at=LATER),
        WorkerRestarted(**WORKER, host_id="h-2", pid=4343, attempt=2),
        RestartsExhausted(**WORKER, attempts=3, detail="keeps exiting"),
        StopRequested(**WORKER, host_id="h-1", flatten=True, reason="stopped by user"),
        PositionsFlattened(**WORKER, count=1, fills=(FILL,), realized_pnl=-12.75),
        FlattenFailed(
            **WORKER,
            error="exchange down",
            remaining=(
                Position(instrument="ETH-PERPETUAL", side="short", amount=2.0, entry_price=3100.0),
            ),
        ),
        WorkerStopped(**WORKER, reason="stopped by user", exit_code=0),
        OrderFilled(
            **WORKER,
            order_id="o-1",
            instrument="BTC-PERPETUAL",
            side="buy",
            amount=0.5,
            price=64000.0,
        ),
        PositionChanged(
            **WORKER, instrument="BTC-PERPETUAL", side="long", amount=0.5, entry_price=64000.0
        ),
        TradeClosed(
            **WORKER,
            instrument="BTC-PERPETUAL",
            side="long",
            amount=0.5,
            entry_price=64000.0,
            exit_price=64123.5,
            realized_pnl=61.75,
        ),
        OrderRejected(
            **WORKER,
            instrument="BTC-PERPETUAL",
            side="buy",
            amount=1000.0,
            order_type="limit",
            reason="deribit: not_enough_funds",
        ),
        RiskLimitHit(
            **WORKER,
            rule="stop_loss",
            action="closed",
            instrument="BTC-PERPETUAL",
            limit=49000.0,
            value=48950.0,
            detail="mark 48950 at or below the stop 49000 (2% under entry 50000)",
        ),
        EntitlementUpgraded(tier="enterprise", max_workers=50, expires_at=LATER),
        EntitlementExpired(tier="enterprise", expired_at=LATER),
        EntitlementDowngraded(
            from_tier="enterprise", to_tier="free", max_workers=1, reason="expired"
        ),
        HostOnline(host_id="h-1", capacity=8, hostname="box-1", pid=100),
        HostLost(host_id="h-1", silent_for=12.0),
        QueuePaused(reason="system ceiling", running=1000, ceiling=1000),
        QueueResumed(running=990, ceiling=1000),
        CircuitOpened(strategy_id="s-1", failures=5, retry_at=LATER),
        CircuitClosed(strategy_id="s-1"),
        WorkerHeartbeat(
            **WORKER,
            host_id="h-1",
            pid=4242,
            at=AT,
            positions=(
                PositionMark(
                    instrument="BTC-PERPETUAL",
                    side="long",
                    amount=0.5,
                    entry_price=64000.0,
                    mark_price=64100.0,
                    unrealized_pnl=50.0,
                ),
            ),
        ),
        WorkerHeartbeats(
            host_id="h-1",
            beats=(WorkerHeartbeat(**WORKER, host_id="h-1", pid=4242, at=AT),),
        ),
        HostHeartbeat(host_id="h-1", capacity=8, workers=("w-1", "w-2"), at=AT),
    )
}


def catalogue_types() -> dict[str, type[Message]]:
    """The build's catalogue, without throwaway types that other tests define."""
    return {name: model for name, model in REGISTRY.items() if "test" not in model.__module__}


def wrap(message: Message) -> Envelope:
    return Envelope.wrap(
        message,
        stream="job-job-1",
        user_id="alice",
        correlation_id="job-1",
        occurred_at=AT,
        event_id=UUID(int=7),
    )


def test_every_catalogue_type_has_an_example() -> None:
    assert set(EXAMPLES) == set(catalogue_types())


def test_examples_are_of_their_registered_type() -> None:
    for name, example in EXAMPLES.items():
        assert type(example) is REGISTRY[name]


def test_package_exports_every_catalogue_type() -> None:
    for name in catalogue_types():
        assert getattr(events, name) is REGISTRY[name]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_message_round_trips_exactly_through_the_log_format(name: str) -> None:
    message = EXAMPLES[name]
    envelope = wrap(message)

    restored = Envelope.from_json(envelope.to_json())

    assert restored == envelope
    assert restored.type == name
    assert restored.version == type(message).version
    assert restored.kind == type(message).kind
    assert restored.occurred_at == AT
    assert restored.message() == message
    assert type(restored.message()) is type(message)


def test_camel_case_strategy_config_loads_from_the_seed_spelling() -> None:
    seed = {
        "name": "Scalper",
        "type": "scalping",
        "riskManagement": {
            "maxPositionSize": 10.0,
            "stopLossPercent": 1.5,
            "takeProfitPercent": 4.0,
        },
        "instruments": ["BTC-PERPETUAL", "ETH-PERPETUAL"],
        "parameters": {"window": 20, "threshold": 0.25, "symbols": ["BTC", "ETH"]},
    }
    assert StrategyConfig.model_validate(seed) == CONFIG


def test_wrap_takes_correlation_and_user_from_the_causing_envelope() -> None:
    cause = wrap(EXAMPLES["JobRequested"])
    effect = Envelope.wrap(EXAMPLES["JobAccepted"], stream="job-job-1", causation=cause)
    assert (effect.causation_id, effect.correlation_id, effect.user_id) == (
        cause.event_id,
        "job-1",
        "alice",
    )


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_message_is_frozen(name: str) -> None:
    message = EXAMPLES[name]
    field = next(iter(type(message).model_fields))
    with pytest.raises(ValidationError):
        setattr(message, field, getattr(message, field))


def test_envelope_is_frozen() -> None:
    envelope = wrap(EXAMPLES["JobQueued"])
    with pytest.raises(ValidationError):
        envelope.type = "JobAccepted"  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_unknown_field_is_rejected(name: str) -> None:
    message = EXAMPLES[name]
    with pytest.raises(ValidationError):
        type(message).model_validate({**message.model_dump(), "unexpected": 1})


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_unknown_field_in_a_logged_payload_is_rejected(name: str) -> None:
    envelope = wrap(EXAMPLES[name])
    tampered = envelope.model_copy(update={"payload": {**envelope.payload, "unexpected": 1}})
    with pytest.raises(ValidationError):
        tampered.message()


def test_envelope_rejects_unknown_fields() -> None:
    data = wrap(EXAMPLES["JobQueued"]).model_dump(mode="json")
    with pytest.raises(ValidationError):
        Envelope.model_validate({**data, "unexpected": 1})


def test_unknown_message_type_raises() -> None:
    envelope = Envelope(type="NoSuchMessage", version=1, stream="job-x", payload={})
    with pytest.raises(UnknownMessageType):
        envelope.message()
    with pytest.raises(UnknownMessageType):
        events.model_for("NoSuchMessage")


@pytest.fixture
def scratch_catalogue() -> Iterator[None]:
    """Lets a test define message types and upcasters, then removes them again."""
    registry, upcasters = dict(REGISTRY), dict(UPCASTERS)
    yield
    REGISTRY.clear()
    REGISTRY.update(registry)
    UPCASTERS.clear()
    UPCASTERS.update(upcasters)


@pytest.fixture
def greeting_v3(scratch_catalogue: None) -> type[Event]:
    """A throwaway event at v3: v1 had `name`, v2 split it, v3 added `language`."""

    class CatalogueGreeting(Event):
        version: ClassVar[int] = 3
        first_name: str
        last_name: str
        language: str

    @upcaster("CatalogueGreeting", 1)
    def split_name(payload: dict) -> dict:
        first, _, last = payload.pop("name").partition(" ")
        return {**payload, "first_name": first, "last_name": last}

    @upcaster("CatalogueGreeting", 2)
    def add_language(payload: dict) -> dict:
        return {**payload, "language": "en"}

    return CatalogueGreeting


def test_old_v1_payload_loads_as_the_current_version(greeting_v3: type[Event]) -> None:
    logged = Envelope(
        type="CatalogueGreeting", version=1, stream="user-alice", payload={"name": "Ada Lovelace"}
    )
    restored = Envelope.from_json(logged.to_json())

    assert restored.message() == greeting_v3(first_name="Ada", last_name="Lovelace", language="en")
    assert restored.payload == {"name": "Ada Lovelace"}  # upcasting never edits the logged payload


def test_current_version_needs_no_upcaster(greeting_v3: type[Event]) -> None:
    message = greeting_v3(first_name="Ada", last_name="Lovelace", language="fr")
    envelope = wrap(message)
    assert envelope.version == 3
    assert Envelope.from_json(envelope.to_json()).message() == message


def test_version_newer_than_the_build_raises(greeting_v3: type[Event]) -> None:
    logged = Envelope(type="CatalogueGreeting", version=4, stream="user-alice", payload={})
    with pytest.raises(UnknownMessageType, match="newer"):
        logged.message()


def test_missing_upcaster_step_raises(greeting_v3: type[Event]) -> None:
    del UPCASTERS[("CatalogueGreeting", 2)]
    logged = Envelope(
        type="CatalogueGreeting", version=1, stream="user-alice", payload={"name": "Ada Lovelace"}
    )
    with pytest.raises(UnknownMessageType, match="no upcaster"):
        logged.message()


def test_scratch_types_are_gone_after_the_test() -> None:
    assert "CatalogueGreeting" not in REGISTRY
    assert not any(name == "CatalogueGreeting" for name, _ in UPCASTERS)
