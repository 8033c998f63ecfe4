"""Log lines as JSON carry the job the code logging them is handling (a context variable, so
concurrent handlers keep theirs apart)."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from services import logs


async def test_json_lines_carry_the_correlation_of_their_own_task() -> None:
    stream = io.StringIO()
    logs.configure("scheduler", format="json", level="DEBUG")
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)  # type: ignore[attr-defined]
    log = logging.getLogger("test.handler")

    async def handle(job: str | None) -> None:
        logs.correlation.set(job)
        await asyncio.sleep(0)  # the other handler runs in between
        log.info("handling %s", job)

    await asyncio.gather(handle("job-1"), handle("job-2"), handle(None))
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.exception("failed")
    logs.configure()  # back to text for the other tests
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["message"], r["correlation_id"]) for r in lines[:3]] == [
        ("handling job-1", "job-1"), ("handling job-2", "job-2"), ("handling None", None)]
    assert {r["service"] for r in lines} == {"scheduler"} and lines[0]["level"] == "INFO"
    assert "ZeroDivisionError" in lines[3]["exception"]


def test_the_level_is_a_setting() -> None:
    logs.configure("gateway", level="WARNING")
    try:
        assert logging.getLogger().level == logging.WARNING
    finally:
        logs.configure()
