"""A service's background tasks: let go once they end, a failure logged once (asyncio must not
log it again as never retrieved)."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from pathlib import Path

import pytest

from services.service import Service
from services.settings import Settings


async def test_ended_tasks_are_let_go_and_a_failure_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = Service(Settings(data_dir=tmp_path))

    async def returns() -> int:
        return 1

    async def fails() -> None:
        raise RuntimeError("boom")

    tasks = [service.background(coro, name)
             for coro, name in ((returns(), "returns"), (fails(), "fails"))]
    await asyncio.wait(tasks)  # their own done callbacks ran first
    ended = [weakref.ref(task) for task in tasks]
    del tasks
    gc.collect()  # a task asyncio found unretrieved would be logged here
    assert [task() for task in ended] == [None, None]
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged == ["background task fails failed"]
