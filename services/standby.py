"""One active replica of a stateful service at a time; the others stand by and take over.

The active replica holds a lease: a session-level advisory lock in the service's own PostgreSQL
database, on a connection of its own. Only the holder runs the service (consumes its queues, fires
its timers, relays its outbox, watches heartbeats); a standby tries to take the lease every
`lease_poll` seconds, then starts as a service starts after a crash. A holder that dies loses
its session and so its lock: at once when its process dies (the server sees the socket close),
within the TCP keepalive set on the session (`KEEPALIVE`, about 5 s) when its machine vanishes.
A holder whose lease connection breaks tries to take the lease again for `lease_grace` seconds,
and exits if it cannot (a standby may be active by then).

The lease keeps replicas from working at the same time; what makes a brief overlap harmless is
in the transactions themselves: the processed-message ledger, the single active consumer of each
inbox, timers taken under a row lock, the event log appended under its own advisory lock with the
head read in the same transaction.

Other backends (SQLite: a file on one machine) have no lease: run one replica.
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
