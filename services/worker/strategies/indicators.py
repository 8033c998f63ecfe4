"""Pure market-data maths for strategies: timeframes, candles from ticks, Wilder's RSI."""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Sequence
from itertools import pairwise

_TIMEFRAME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_timeframe(timeframe: str) -> float:
    """`"1s"`, `"5s"`, `"1m"`, `"4h"`, `"1d"` -> seconds."""
    match = _TIMEFRAME.match(timeframe)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"timeframe must look like 1s, 5s, 1m, 1h or 1d, got {timeframe!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class Candles:
    """Closing prices of fixed-width time buckets, built from (time, price) ticks: a candle
    closes when a later bucket's first tick arrives, at the last price seen in its bucket
    (buckets without ticks make none). Only the last `keep` closes are kept."""

    def __init__(self, width: float, keep: int = 500) -> None:
        if width <= 0:
            raise ValueError("candle width must be positive")
        self.width = width
        self.closes: deque[float] = deque(maxlen=keep)
        self._bucket: int | None = None
        self._last = 0.0

    def add(self, at: float, price: float) -> bool:
        """Record a tick; True when it closed a candle."""
        bucket = math.floor(at / self.width)
        closed = self._bucket is not None and bucket > self._bucket
        if closed:
            self.closes.append(self._last)
        if self._bucket is None or bucket >= self._bucket:
            self._bucket = bucket
            self._last = price
        return closed


def rsi(closes: Sequence[float], period: int = 14) -> float | None:
    """Wilder's relative strength index of the last close, or None with fewer than
    `period + 1` closes. The first averages are plain means over the first `period` changes,
    later ones Wilder-smoothed: avg = (avg * (period - 1) + change) / period."""
    if period < 1:
        raise ValueError("RSI period must be at least 1")
    if len(closes) < period + 1:
        return None
    changes = [later - earlier for earlier, later in pairwise(closes)]
    gain = sum(max(change, 0.0) for change in changes[:period]) / period
    loss = sum(max(-change, 0.0) for change in changes[:period]) / period
    for change in changes[period:]:
        gain = (gain * (period - 1) + max(change, 0.0)) / period
        loss = (loss * (period - 1) + max(-change, 0.0)) / period
    if loss == 0:
        return 100.0 if gain > 0 else 50.0
    return 100.0 - 100.0 / (1.0 + gain / loss)
