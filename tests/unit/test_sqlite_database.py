"""SQLite's brief refusals (a checkpoint, a WAL recovery) are waited out by readers: a replay or
a status read beside a busy writer never fails with "database is locked"."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from services.database import Database

pytestmark = pytest.mark.asyncio


def held_exclusively(path: Path, seconds: float) -> None:
    """Another connection holds the whole database (as a WAL recovery does) for `seconds`."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    holder.execute("COMMIT")
    threading.Timer(seconds, holder.close).start()


async def test_a_read_and_a_write_wait_out_a_database_held_for_a_moment(tmp_path: Path) -> None:
    path = tmp_path / "service.db"
    db = Database(f"sqlite:///{path}")
    async with db.begin() as conn:
        await conn.execute(text("CREATE TABLE t (x INTEGER)"))
    await db.dispose()

    held_exclusively(path, 0.3)
    async with db.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1
    await db.dispose()

    held_exclusively(path, 0.3)
    async with db.begin() as conn:
        await conn.execute(text("INSERT INTO t VALUES (2)"))
    async with db.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 3
    await db.dispose()


async def test_a_read_waits_out_a_refusal_without_blocking_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "service.db"
    db = Database(f"sqlite:///{path}")
    async with db.begin() as conn:
        await conn.execute(text("CREATE TABLE t (x INTEGER)"))
    await db.dispose()
    ticks = 0

    async def ticking() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    held_exclusively(path, 0.3)
    ticker = asyncio.create_task(ticking())
    async with db.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1
    ticker.cancel()
    assert ticks > 0  # the loop ran other tasks while the read waited
    await db.dispose()


async def test_a_connection_spills_a_write_transaction_only_past_16000_pages(
        tmp_path: Path) -> None:
    """The setting holds as given: SQLite reads a number whose low byte is 0 as "off"."""
    database = Database(f"sqlite:///{tmp_path / 'spill.db'}")
    async with database.begin() as conn:
        spill = (await conn.execute(text("PRAGMA cache_spill"))).scalar()
    await database.dispose()
    assert spill == 16000
