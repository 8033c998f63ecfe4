"""Per-caller rate limits: a token bucket per caller, kept in this gateway's memory (each
gateway limits on its own: N gateways behind a balancer allow up to N times the rate)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Bucket:
    """`tokens` left as of `at` (monotonic seconds)."""

    tokens: float
    at: float


class RateLimiter:
    """`rate` requests a second on average, bursts of up to `burst`; a rate of 0 is no limit.
    Pure but for its table of buckets: the time is passed in."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, max(burst, 1)
        self._buckets: dict[str, Bucket] = {}

    def take(self, key: str, now: float) -> float:
        """Spends one request of `key`'s budget: 0.0 if it may go ahead, else the seconds
        until it may (nothing spent)."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= 10_000:
                self._forget_full(now)
            bucket = self._buckets[key] = Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Drops the buckets refilled by now: a full bucket is the same as none."""
        refill = self.burst / self.rate
        self._buckets = {key: bucket for key, bucket in self._buckets.items()
                         if now - bucket.at < refill}


def retry_after(seconds: float) -> str:
    """A `Retry-After` header's value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
