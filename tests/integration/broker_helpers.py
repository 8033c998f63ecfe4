"""Helpers for tests on the real broker: wait for a condition; take the one dead letter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest


async def eventually(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def the_only_dead_letter(amqp_url: str, dlq: str) -> aio_pika.abc.AbstractIncomingMessage:
    """Waits (up to 10 s) for a message on `dlq` and takes it; fails if there is none, or more."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(dlq)
        dead = None
        for _ in range(100):
            dead = await queue.get(no_ack=True, fail=False)
            if dead is not None:
                break
            await asyncio.sleep(0.1)
        assert dead is not None, f"nothing was dead-lettered to {dlq}"
        assert await queue.get(no_ack=True, fail=False) is None, f"more than one in {dlq}"
    return dead
