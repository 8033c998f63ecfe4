"""Subscription tier changes (stream `user-<user_id>`)."""

from __future__ import annotations

from datetime import datetime

from events.base import Event
from events.values import Tier


class _EntitlementEvent(Event):
    category = "entitlement"


class EntitlementUpgraded(_EntitlementEvent):
    tier: Tier
    max_workers: int
    expires_at: datetime


class EntitlementExpired(_EntitlementEvent):
    tier: Tier
    expired_at: datetime


class EntitlementDowngraded(_EntitlementEvent):
    from_tier: Tier
    to_tier: Tier
    max_workers: int
    reason: str
