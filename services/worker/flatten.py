"""Closing every open position at market when a stop asks for it (or a flatten-only run)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from events.jobs import FlattenFailed, PositionsFlattened
from events.values import Fill, Position
from services.worker.brokers.base import Broker, BrokerFact, ClosedTrade, closing_side

T = TypeVar("T")

FLATTEN_ROUNDS = 3  # close-and-read rounds before giving up on what is still open
DEFAULT_FLATTEN_TIMEOUT = 15.0  # seconds (the host kills a worker 2 × its stop grace after Stop)


async def _attempt(call: Awaitable[T], what: str, errors: list[str]) -> T | None:
    """Await `call`; a failure of any kind is recorded in `errors` (a flatten that cannot
    complete must be reported, whatever the adapter raised) and gives None."""
    try:
        return await call
    except Exception as exc:
        error = f"{what}: {exc}"
        if error not in errors:
            errors.append(error)
        return None


async def flatten(
    broker: Broker,
    *,
    job_id: str,
    worker_id: str,
    rounds: int = FLATTEN_ROUNDS,
    timeout: float | None = None,
) -> PositionsFlattened | FlattenFailed:
    """Cancel resting orders (they could reopen a position), then close each open position with
    a reduce-only market order and read the positions again until the account shows none, in at
    most `rounds` rounds within `timeout` seconds. PositionsFlattened when all are flat, else
    FlattenFailed naming the errors and the positions still open as last known."""
    closed: list[ClosedTrade] = []
    fills: list[Fill] = []
    errors: list[str] = []
    report = broker.sink

    def recording(fact: BrokerFact) -> None:
        if isinstance(fact, ClosedTrade):
            closed.append(fact)
        report(fact)

    opened: list[Position] | None = None
    current: list[Position] | None = None
    broker.sink = recording
    try:
        async with asyncio.timeout(timeout):
            await _attempt(broker.cancel_all(), "cancelling open orders", errors)
            current = opened = await _attempt(broker.positions(), "reading positions", errors)
            for _ in range(rounds):
                if not current:
                    break
                for position in current:
                    order = broker.market_order(position.instrument, closing_side(position),
                                                position.amount, reduce_only=True)
                    fill = await _attempt(order, f"closing {position.instrument}", errors)
                    if fill is not None:
                        fills.append(fill)
                read = await _attempt(broker.positions(), "reading positions after closing",
                                      errors)
                if read is None:  # unknown for sure: assume each close that did not fill failed
                    filled = {fill.instrument for fill in fills}
                    current = [p for p in current if p.instrument not in filled]
                    break
                current = read
    except TimeoutError:
        errors.append(f"gave up after {timeout:g}s")
    finally:
        broker.sink = report
    if opened is None:  # never read: what the account last showed is what is still open
        return FlattenFailed(job_id=job_id, worker_id=worker_id, error="; ".join(errors),
                             remaining=tuple(broker.known_positions()))
    if current:
        return FlattenFailed(
            job_id=job_id,
            worker_id=worker_id,
            error="; ".join(errors) or "positions still open after closing them at market",
            remaining=tuple(current),
        )
    return PositionsFlattened(
        job_id=job_id,
        worker_id=worker_id,
        count=len(opened),
        fills=tuple(fills),
        realized_pnl=sum(trade.realized_pnl for trade in closed),
    )
