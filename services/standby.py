"""One active replica of a stateful service at a time; the others stand by and take over.

The lease is a session-level advisory lock in the service's own PostgreSQL database, lost with
its session when the holder dies (or, its machine gone, within the `KEEPALIVE` probes); a
standby tries to take it every `lease_poll` seconds. A brief overlap is harmless because the
transactions themselves guard it (the ledger, single active consumers, timers under a row lock);
other backends (SQLite) have no lease: run one replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from typing import Any, Protocol

from sqlalchemy.engine import make_url

# seconds of silence before the server probes a lease holder's socket, between probes, probes
KEEPALIVE = {"tcp_keepalives_idle": "2", "tcp_keepalives_interval": "1",
             "tcp_keepalives_count": "3"}
CALL_TIMEOUT = 3.0  # seconds a lease call may take before the connection is deemed broken


class Lease(Protocol):
    """The right to be the active replica of one service."""

    async def acquire(self) -> bool:
        """Try once to take it; whether this replica holds it now. Raises when the database
        cannot be reached."""
        ...

    async def held(self) -> bool:
        """Whether this replica still holds it (its connection answers)."""
        ...

    async def release(self) -> None: ...


def lock_key(service: str) -> int:
    """The advisory lock a service's replicas contend for (in the service's own database)."""
    digest = hashlib.sha256(f"runner-active:{service}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def holder_name(service: str) -> str:
    """How the holder's session is named (`application_name`): which machine and process."""
    return f"runner {service} pid {os.getpid()} on {socket.gethostname()}"[:63]


class PostgresLease:
    """A session advisory lock on a connection of its own (asyncpg, no pool)."""

    def __init__(self, url: str, service: str) -> None:
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        self.key = lock_key(service)
        self._settings = KEEPALIVE | {"application_name": holder_name(service)}
        self._conn: Any = None

    async def acquire(self) -> bool:
        import asyncpg

        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, timeout=CALL_TIMEOUT,
                                               server_settings=self._settings)
        try:
            got = await asyncio.wait_for(
                self._conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key), CALL_TIMEOUT)
        except BaseException:
            self._drop()
            raise
        return bool(got)

    async def held(self) -> bool:
        conn = self._conn
        if conn is None or conn.is_closed():
            return False
        try:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), CALL_TIMEOUT)
        except Exception:
            self._drop()
            return False
        return True

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), CALL_TIMEOUT)
        except Exception:
            conn.terminate()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()


def lease_for(url: str, service: str) -> Lease | None:
    """The lease of `service` whose store is at `url`: on PostgreSQL; None elsewhere."""
    if make_url(url).get_backend_name() == "postgresql":
        return PostgresLease(url, service)
    return None
