"""`Unseen`: the workers a gateway has answered a start for, until a status has waited for them
or `keep` seconds have passed."""

from __future__ import annotations

from services.gateway.waiters import Unseen


def test_a_status_waits_for_its_own_users_workers_once_and_old_ones_are_forgotten() -> None:
    now = [0.0]
    unseen = Unseen(keep=0.2, clock=lambda: now[0])
    unseen.add("w1", "alice")
    unseen.add("w2", "bob")
    assert unseen.of("alice") == ["w1"]
    assert unseen.of(None) == ["w1", "w2"]  # the admin's status shows everyone's
    unseen.seen(["w1"])
    assert "w1" not in unseen and unseen.of("alice") == []
    now[0] += 0.25
    unseen.add("w3", "alice")
    assert unseen.of(None) == ["w3"]  # w2 outlived `keep`
