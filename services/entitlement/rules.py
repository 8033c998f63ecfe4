"""Pure entitlement rules: limits per tier, the start decision, who goes on a downgrade."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from events import RejectReason

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
