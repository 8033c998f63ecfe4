"""Which database failures a grouped commit waits out (`services.store.transient`): SQLite's own
errors sorted by their code, as sqlite3 raises OperationalError for a bad statement too."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from services.store import transient


def raised(statement: str, connection: sqlite3.Connection) -> sqlite3.Error:
    with pytest.raises(sqlite3.Error) as caught:
        connection.execute(statement)
    return caught.value


def test_a_busy_database_is_transient_and_a_bad_statement_is_not(tmp_path: Path) -> None:
    path = tmp_path / "db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    holder.execute("INSERT INTO t VALUES (1)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    busy = raised("BEGIN IMMEDIATE", other)
    missing = raised("SELECT * FROM nowhere", other)
    holder.execute("ROLLBACK")
    duplicate = raised("INSERT INTO t VALUES (1)", other)

    assert transient(OperationalError("BEGIN IMMEDIATE", {}, busy))
    assert not transient(OperationalError("SELECT", {}, missing))
    assert not transient(IntegrityError("INSERT", {}, duplicate))
    assert not transient(ValueError("a bug in the work"))


def test_a_lost_connection_is_transient_on_any_backend() -> None:
    lost = DBAPIError("SELECT 1", {}, ConnectionResetError(), connection_invalidated=True)
    assert transient(lost)
    assert transient(OperationalError("SELECT 1", {}, RuntimeError("server closed")))
    assert not transient(DBAPIError("SELECT 1", {}, RuntimeError("syntax")))
