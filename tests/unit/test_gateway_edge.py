"""The gateway's edge as pure parts: JSON bounded in depth, size and numbers; a token bucket per
caller; the admin token's length and its file re-read on rotation; a strategy's parameters
checked against its own model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.gateway.edge import BodyRefused, check_json
from services.gateway.rate_limit import RateLimiter, retry_after
from services.gateway.strategy_schemas import parameter_problems
from services.gateway.users import AdminToken, hash_token
from services.secrets import AdminTokenError, admin_token, write_admin_token
from services.settings import Settings

LIMITS = {"max_depth": 32, "max_items": 2000}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("body, says", [
    (nested(33), "nested deeper than 32"),
    (nested(200), "nested deeper than 32"),
    (nested(260), "nested deeper than 32"),
    (nested(5000), "nested deeper than 32"),
    (b'{"a": ' * 1500 + b"1" + b"}" * 1500, "nested deeper than 32"),
    (b'{"amount": NaN}', "NaN and Infinity"),
    (b'{"amount": -Infinity}', "NaN and Infinity"),
    (b'{"amount": 1e999}', "NaN and Infinity"),
    (json.dumps({f"k{n}": 0 for n in range(2001)}).encode(), "more than 2000 keys"),
    (json.dumps([[0] * 1000, [0] * 1000]).encode(), "more than 2000 keys"),
    (b'{"a": 1', "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_a_body_past_the_limits_is_refused_with_what_is_wrong(body: bytes, says: str) -> None:
    with pytest.raises(BodyRefused, match=says) as refused:
        check_json(body, **LIMITS)
    assert refused.value.status == 422


@pytest.mark.parametrize("body", [
    nested(32), json.dumps({f"k{n}": [n] for n in range(999)}).encode(), b'{"x": 1e308}',
    b'"NaN"', b"[]",
])
def test_a_body_within_the_limits_passes(body: bytes) -> None:
    check_json(body, **LIMITS)


def test_a_token_bucket_allows_its_burst_then_its_rate_and_each_key_has_its_own() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.take("alice", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("alice", 0.0) == pytest.approx(0.5)  # one token at 2 a second
    assert limiter.take("bob", 0.0) == 0.0  # another caller is unaffected
    assert limiter.take("alice", 0.5) == 0.0  # refilled one
    assert limiter.take("alice", 0.5) == pytest.approx(0.5)
    assert [limiter.take("alice", 100.0) for _ in range(4)][-1] > 0  # refills to the burst only
    assert RateLimiter(rate=0, burst=1).take("alice", 0.0) == 0.0  # 0: no limit
    assert (retry_after(0.01), retry_after(1.2)) == ("1", "2")


def test_the_bucket_table_forgets_full_buckets_when_large() -> None:
    limiter = RateLimiter(rate=10.0, burst=5)
    for n in range(10_000):
        limiter.take(f"user-{n}", 0.0)
    limiter.take("late", 10.0)  # all the others have refilled by now
    assert len(limiter._buckets) == 1


def test_a_short_admin_token_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(AdminTokenError, match=r"RUNNER_ADMIN_TOKEN: the admin token must be at "
                                              r"least 32 characters \(it has 5\); make one"):
        admin_token(Settings(data_dir=tmp_path, admin_token="short"))
    (tmp_path / "admin.token").write_text("hand-written\n")
    with pytest.raises(AdminTokenError, match=r"admin\.token: the admin token must be at least"):
        admin_token(Settings(data_dir=tmp_path))
    assert admin_token(Settings(data_dir=tmp_path, admin_token="x" * 32)) == ("x" * 32, False)


def test_the_admin_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    first, created = admin_token(Settings(data_dir=tmp_path))
    assert created and len(first) >= 32 and path.stat().st_mode & 0o777 == 0o600
    token = AdminToken(first, path)
    other_reader = AdminToken(first, path)  # another gateway reading the same file
    assert token.matches(hash_token(first))
    second = token.rotate()
    assert token.matches(hash_token(second)) and not token.matches(hash_token(first))
    assert other_reader.matches(hash_token(second)) and not other_reader.matches(hash_token(first))
    third = write_admin_token(path)  # `runner admin rotate-token`
    assert token.matches(hash_token(third)) and not token.matches(hash_token(second))
    path.write_text("short\n")  # a broken file: nobody is admin until it is fixed
    assert not token.matches(hash_token(third)) and not token.matches(hash_token("short"))
    with pytest.raises(AdminTokenError, match="set by RUNNER_ADMIN_TOKEN"):
        AdminToken("y" * 32).rotate()


@pytest.mark.parametrize("parameters, says", [
    ({"amount": "lots"}, "config.parameters.amount: Input should be a valid number"),
    ({"amount": -1}, "config.parameters.amount: Input should be greater than 0"),
    ({"side": 5}, "config.parameters.side: Input should be 'long' or 'short'"),
    ({"amount": [[1]]}, "config.parameters.amount: Input should be a valid number"),
])
def test_parameters_are_checked_against_the_strategys_own_model(
        parameters: dict[str, object], says: str) -> None:
    problems = parameter_problems("hold", parameters)
    assert problems and problems[0].startswith(says)
    assert "lots" not in " ".join(problems)  # never the value itself


def test_a_strategys_own_rule_across_parameters_is_named() -> None:
    assert parameter_problems("scalping", {"oversold": 80, "overbought": 20}) == [
        "config.parameters: Value error, oversold must be below overbought"]


def test_parameters_the_strategy_takes_pass() -> None:
    assert parameter_problems("hold", {"amount": 2, "side": "short", "paperSeed": 1}) == []
    assert parameter_problems("no-such", {})[0].startswith("config.type: strategy 'no-such'")


def test_the_gateway_prints_where_the_admin_token_is_never_the_token(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.gateway.service import GatewayService

    GatewayService(Settings(data_dir=tmp_path))
    printed = capsys.readouterr().out
    token_file = tmp_path / "admin.token"
    assert f"saved in {token_file}" in printed and token_file.read_text().strip() not in printed
    with pytest.raises(AdminTokenError, match="at least 32 characters"):
        GatewayService(Settings(data_dir=tmp_path, admin_token="x" * 31))
