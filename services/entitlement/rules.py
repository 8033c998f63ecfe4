"""Pure entitlement rules: limits per tier, the start decision, upgrades and expiry, who goes on
a downgrade."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from events import (
    EntitlementDowngraded,
    EntitlementExpired,
    EntitlementUpgraded,
    JobAccepted,
    JobRejected,
    RejectReason,
    StopRunner,
)

TIER_LIMITS: dict[str, int] = {"free": 1, "basic": 3, "pro": 10, "enterprise": 50}
FREE = "free"


@dataclass(frozen=True)
class Plan:
    tier: str = FREE
    expires_at: datetime | None = None

    def effective_tier(self, now: datetime) -> str:
        """The tier in force at `now`: an expired upgrade is free (never locked out)."""
        if self.expires_at is not None and self.expires_at <= now:
            return FREE
        return self.tier

    def expired(self, now: datetime) -> bool:
        return self.tier != FREE and self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True)
class Accept:
    tier: str
    max_workers: int
    in_use: int  # including the accepted job


@dataclass(frozen=True)
class Reject:
    reason: RejectReason
    detail: str


def decide(plan: Plan, in_use: int, now: datetime) -> Accept | Reject:
    """May this user start one more worker? `in_use` counts every job holding a slot."""
    tier = plan.effective_tier(now)
    limit = TIER_LIMITS[tier]
    if in_use < limit:
        return Accept(tier=tier, max_workers=limit, in_use=in_use + 1)
    if plan.expired(now):
        return Reject(
            RejectReason.ENTITLEMENT_EXPIRED,
            f"{plan.tier} entitlement expired at {plan.expires_at:%Y-%m-%d %H:%M:%S}Z; "
            f"worker limit reached: {in_use} of {limit} ({tier})",
        )
    return Reject(RejectReason.WORKER_LIMIT, f"worker limit reached: {in_use} of {limit} ({tier})")


def excess(jobs_oldest_first: Sequence[str], limit: int) -> list[str]:
    """Jobs above `limit`, newest first: the ones to stop after a downgrade."""
    return list(reversed(jobs_oldest_first[limit:]))


def judge_start(plan: Plan, in_use: int, circuit_until: datetime | None, now: datetime, *,
                job_id: str, worker_id: str, strategy_id: str) -> JobAccepted | JobRejected:
    """The start's verdict: refused while its strategy's circuit is open, else by the limit."""
    if circuit_until is not None and circuit_until > now:
        return JobRejected(job_id=job_id, reason=RejectReason.CIRCUIT_OPEN,
                           detail=f"strategy {strategy_id} keeps failing; circuit open, "
                                  f"retry after {circuit_until:%Y-%m-%d %H:%M:%S}Z",
                           retry_at=circuit_until)
    decision = decide(plan, in_use, now)
    if isinstance(decision, Accept):
        return JobAccepted(job_id=job_id, worker_id=worker_id, tier=decision.tier,
                           max_workers=decision.max_workers, in_use=decision.in_use)
    return JobRejected(job_id=job_id, reason=decision.reason, detail=decision.detail)


def upgrade(tier: str, days: float, now: datetime) -> tuple[Plan, EntitlementUpgraded]:
    """The user on `tier` for `days` from now."""
    plan = Plan(tier, now + timedelta(days=days))
    return plan, EntitlementUpgraded(tier=tier, max_workers=TIER_LIMITS[tier],
                                     expires_at=plan.expires_at)


def expire(plan: Plan, now: datetime) -> tuple[EntitlementExpired, EntitlementDowngraded] | None:
    """At its expiry an upgrade ends and the user is downgraded to free; None when the plan was
    extended or downgraded since the timer was set."""
    if not plan.expired(now):
        return None
    reason = f"{plan.tier} entitlement expired; free allows {TIER_LIMITS[FREE]} worker"
    return (EntitlementExpired(tier=plan.tier, expired_at=plan.expires_at),
            EntitlementDowngraded(from_tier=plan.tier, to_tier=FREE,
                                  max_workers=TIER_LIMITS[FREE], reason=reason))


@dataclass(frozen=True)
class Slot:
    """A job holding one of its user's worker slots."""

    job_id: str
    worker_id: str
    flatten_on_stop: bool = True


def stop_excess(slots_oldest_first: Sequence[Slot], limit: int,
                reason: str) -> list[tuple[str, StopRunner]]:
    """The stops (with the job each is about) that bring a user down to `limit` workers,
    newest first, each with its own flatten setting."""
    by_job = {slot.job_id: slot for slot in slots_oldest_first}
    return [(job_id, StopRunner(worker_id=by_job[job_id].worker_id,
                                flatten=by_job[job_id].flatten_on_stop,
                                reason=f"stopped: {reason}"))
            for job_id in excess([s.job_id for s in slots_oldest_first], limit)]
