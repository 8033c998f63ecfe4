"""SQLite's brief refusals (a checkpoint, a WAL recovery) are waited out by readers: a replay or
a status read beside a busy writer never fails with "database is locked"."""

from __future__ import annotations

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


async def test_a_read_waits_out_refusals_and_a_write_lock_is_tried_again_off_the_loop(
        tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'service.db'}")
    busy_timeout = text("PRAGMA busy_timeout")
    async with db.connect() as conn:
        assert (await conn.execute(busy_timeout)).scalar() > 0
    async with db.begin() as conn:
        assert (await conn.execute(busy_timeout)).scalar() == 0  # `_begin_immediate` retries
    await db.dispose()
