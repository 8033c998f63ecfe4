"""Chaos: a fault drill. Holds like Hold, then crashes or hangs on cue so the host's crash
detection, heartbeat watchdog and restart policy can be exercised end to end."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import NoReturn

from pydantic import Field

from services.worker.strategies.hold import Hold, HoldParameters

log = logging.getLogger(__name__)


class ChaosParameters(HoldParameters):
    crash_after: float | None = Field(default=None, ge=0)
    exit_code: int = Field(default=1, ge=0, le=255)
    hang_after: float | None = Field(default=None, ge=0)
    hog_after: float | None = Field(default=None, ge=0)


class Chaos(Hold):
    """`crashAfter` seconds after start the process exits at once with `exitCode`; `hangAfter`
    seconds after start the event loop blocks for good, so heartbeats stop and even SIGTERM goes
    unanswered (only SIGKILL ends it); `hogAfter` seconds after start it takes memory, touched,
    until a limit ends it."""

    parameters_model = ChaosParameters
    tick_interval = 0.05

    async def start(self) -> None:
        await super().start()
        self._started = time.monotonic()

    async def on_tick(self) -> None:
        elapsed = time.monotonic() - self._started
        if self.parameters.crash_after is not None and elapsed >= self.parameters.crash_after:
            log.error("chaos: crashing with exit code %d as configured", self.parameters.exit_code)
            sys.stderr.flush()
            os._exit(self.parameters.exit_code)
        if self.parameters.hang_after is not None and elapsed >= self.parameters.hang_after:
            log.error("chaos: blocking the event loop as configured")
            sys.stderr.flush()
            block_forever()
        if self.parameters.hog_after is not None and elapsed >= self.parameters.hog_after:
            log.error("chaos: taking memory until a limit stops it, as configured")
            sys.stderr.flush()
            hog_memory()


def hog_memory() -> NoReturn:
    """Take memory in 16 MiB steps, every page written, until something ends the process."""
    held = []
    while True:
        held.append(bytearray(16 * 1024 * 1024))
        for offset in range(0, len(held[-1]), 4096):
            held[-1][offset] = 1


def block_forever() -> NoReturn:
    """Hang the calling thread (here: the event loop) the way a stuck C call would."""
    while True:
        time.sleep(3600)
