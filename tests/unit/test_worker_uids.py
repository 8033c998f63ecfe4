"""The worker-host's uid pool and isolation settings: one uid per live worker, reused as late as
possible; ranges and ports parsed from settings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.settings import Settings
from services.worker.confinement import Limits
from services.worker_host.isolation import (
    Isolation,
    PoolExhausted,
    UidPool,
    allowed_tcp_ports,
    parse_uids,
)


def test_each_take_gives_a_uid_no_live_worker_holds() -> None:
    pool = UidPool(range(60000, 60003))
    taken = [pool.take() for _ in range(3)]
    assert sorted(taken) == [60000, 60001, 60002]
    assert pool.held == frozenset(taken) and pool.free == 0


def test_an_exhausted_pool_refuses_and_names_the_range() -> None:
    pool = UidPool(range(60000, 60002))
    pool.take(), pool.take()
    with pytest.raises(PoolExhausted, match="all 2 of 60000-60001 are in use"):
        pool.take()


def test_a_uid_given_back_is_reused_last() -> None:
    pool = UidPool(range(60000, 60003))
    first = pool.take()
    pool.give_back(first)
    assert [pool.take() for _ in range(3)] == [60001, 60002, first]


def test_only_a_held_uid_can_be_given_back() -> None:
    pool = UidPool(range(60000, 60002))
    with pytest.raises(ValueError, match="not held"):
        pool.give_back(60000)
    uid = pool.take()
    pool.give_back(uid)
    with pytest.raises(ValueError, match="not held"):
        pool.give_back(uid)


def test_a_quarantined_uid_is_never_handed_out_again() -> None:
    pool = UidPool(range(60000, 60003))
    held = pool.take()
    pool.quarantine(held)  # its processes could not be ended
    pool.quarantine(60002)  # free, but something of an earlier run runs under it
    assert [pool.take()] == [60001]
    with pytest.raises(PoolExhausted):
        pool.take()


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=200))
def test_no_sequence_of_takes_and_returns_gives_one_uid_to_two_live_workers(
    steps: list[tuple[bool, int]],
) -> None:
    pool = UidPool(range(60000, 60005))
    live: list[int] = []
    for take, pick in steps:
        if take:
            try:
                uid = pool.take()
            except PoolExhausted:
                assert len(live) == 5
                continue
            assert uid not in live
            live.append(uid)
        elif live:
            pool.give_back(live.pop(pick % len(live)))
        assert pool.held == frozenset(live) and pool.free == 5 - len(live)


@pytest.mark.parametrize(
    ("text", "uids"),
    [("60000-60999", range(60000, 61000)), (" 61000 ", range(61000, 61001)), ("", None)],
)
def test_uid_ranges(text: str, uids: range | None) -> None:
    assert parse_uids(text) == uids


@pytest.mark.parametrize("text", ["0-10", "60999-60000", "sixty", "60000-", "-5"])
def test_bad_uid_ranges_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a uid range"):
        parse_uids(text)


def test_allowed_ports_add_those_of_the_broker_url_overrides() -> None:
    urls = '{"deribit": "http://127.0.0.1:9000", "binance": "https://example.test"}'
    assert allowed_tcp_ports("443, 8443", urls) == (443, 8443, 9000)
    assert allowed_tcp_ports("", None) == ()


def test_the_hosts_policy_comes_from_its_settings() -> None:
    isolation = Isolation.from_settings(Settings(
        worker_uids="61000-61009", worker_address_space_mb=1024, worker_open_files=64,
        worker_processes=0, worker_sandbox=False, worker_tcp_ports="443"))
    assert isolation.uids == range(61000, 61010)
    assert isolation.limits == Limits(address_space=1 << 30, open_files=64, processes=None)
    assert (isolation.sandbox, isolation.tcp_ports, isolation.announce) == (False, (443,), True)


async def test_workers_under_the_hosts_uid_are_said_once_as_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    isolation = Isolation.from_settings(Settings(worker_uids=""))
    with caplog.at_level("INFO", logger="services.worker_host.isolation"):
        await isolation.start()
    await isolation.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["workers are NOT isolated from the host and each other: "
                        "RUNNER_WORKER_UIDS is empty: workers run under the host's uid "
                        "(docs/SECURITY.md)"]
    assert not isolation.switches_ids
    assert isolation.describe().startswith("under the host's uid; limits: address_space")
