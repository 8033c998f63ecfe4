"""Closing every open position at market when a stop asks for it."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from events.jobs import FlattenFailed, PositionsFlattened
from events.values import Fill, Position
from services.worker.brokers.base import Broker, BrokerFact, ClosedTrade, closing_side

T = TypeVar("T")


async def _attempt(call: Awaitable[T], what: str, errors: list[str]) -> T | None:
    """Await `call`; a failure of any kind is recorded in `errors` (a flatten that cannot
    complete must be reported, whatever the adapter raised) and gives None."""
    try:
        return await call
    except Exception as exc:
        errors.append(f"{what}: {exc}")
        return None


async def flatten(
    broker: Broker, *, job_id: str, worker_id: str
) -> PositionsFlattened | FlattenFailed:
    """Cancel resting orders (they could reopen a position), then close each open position with
    a reduce-only market order, one attempt each.

    Every position flat and no order left: PositionsFlattened (count = positions closed, their
    fills, the realized P&L of those closes). Anything else: FlattenFailed naming the errors and
    the positions still open; nothing is swallowed.
    """
    closed: list[ClosedTrade] = []
    report = broker.sink

    def recording(fact: BrokerFact) -> None:
        if isinstance(fact, ClosedTrade):
            closed.append(fact)
        report(fact)

    broker.sink = recording
    errors: list[str] = []
    try:
        await _attempt(broker.cancel_all(), "cancelling open orders", errors)
        opened = await _attempt(broker.positions(), "reading positions", errors)
        if opened is None:
            return FlattenFailed(job_id=job_id, worker_id=worker_id, error="; ".join(errors))
        fills: list[Fill] = []
        for position in opened:
            order = broker.market_order(
                position.instrument, closing_side(position), position.amount, reduce_only=True
            )
            fill = await _attempt(order, f"closing {position.instrument}", errors)
            if fill is not None:
                fills.append(fill)
        remaining: list[Position] | None = await _attempt(
            broker.positions(), "reading positions after closing", errors
        )
    finally:
        broker.sink = report
    if remaining is None:
        # Unknown for sure: assume each order that did not fill left its position open.
        flattened = {fill.instrument for fill in fills}
        remaining = [position for position in opened if position.instrument not in flattened]
    if errors or remaining:
        return FlattenFailed(
            job_id=job_id,
            worker_id=worker_id,
            error="; ".join(errors) or "positions still open after closing them at market",
            remaining=tuple(remaining),
        )
    return PositionsFlattened(
        job_id=job_id,
        worker_id=worker_id,
        count=len(opened),
        fills=tuple(fills),
        realized_pnl=sum(trade.realized_pnl for trade in closed),
    )
