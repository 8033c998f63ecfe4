"""Projections (plus the heartbeat overlay) in the seed's JSON shape, for status and replay.

One function for every reader (the monitor's status RPC, `runner replay --json`), so what a
replay prints is exactly what the live status said at that point.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from events.envelope import as_utc
from projections import Projections, TradingStats, WorkerView, queue_stats
from services import metrics
from services.monitor.liveness import Hosts, Liveness, WorkerBeat

if TYPE_CHECKING:
    from services.monitor.replay import Folded

NO_BEATS: Mapping[str, WorkerBeat] = {}


def epoch_ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(as_utc(moment).timestamp() * 1000)


def worker_entry(state: Projections, worker: WorkerView,
                 beat: WorkerBeat | None = None) -> dict[str, Any]:
    """`{worker, positions, stats}` for one worker."""
    marks = beat.marks if beat is not None else {}
    positions = state.positions.get(worker.worker_id) or {}
    stats = state.stats.get(worker.worker_id) or TradingStats()
    return {
        "worker": {
            "workerId": worker.worker_id,
            "jobId": worker.job_id,
            "userId": worker.user_id,
            "strategyId": worker.strategy_id,
            "brokerId": worker.broker_id,
            "status": str(worker.status),
            "pid": worker.pid,
            "hostId": worker.host_id,
            "startedAt": epoch_ms(worker.started_at),
            "restartCount": worker.restart_count,
            "lastHeartbeat": epoch_ms(beat.at) if beat is not None else None,
            "reason": worker.reason,
        },
        "positions": [
            {
                "instrumentName": position.instrument,
                "side": position.side,
                "amount": position.amount,
                "entryPrice": position.entry_price,
                "unrealizedPnL": mark.unrealized_pnl
                if (mark := marks.get(position.instrument)) is not None else 0.0,
            }
            for position in positions.values()
            if position.amount
        ],
        "stats": {
            "totalTrades": stats.total_trades,
            "winningTrades": stats.winning_trades,
            "losingTrades": stats.losing_trades,
            "totalPnL": stats.total_pnl,
            "winRate": round(stats.win_rate, 2),
        },
    }


def status(state: Projections, user_id: str | None = None,
           beats: Mapping[str, WorkerBeat] = NO_BEATS) -> dict[str, Any]:
    """`{workers, queueStats}` for one user (or everyone when `user_id` is None)."""
    return {
        "workers": [worker_entry(state, w, beats.get(w.worker_id))
                    for w in _workers_of(state, user_id)],
        "queueStats": _queue_stats(state, user_id),
    }


def status_json(state: Projections, user_id: str | None, beats: Mapping[str, WorkerBeat],
                encoded: dict[str, bytes], offset: int = 0, limit: int | None = None) -> bytes:
    """`status` as the HTTP API answers it (`{"success": true, ...}`, passed on untouched),
    reusing the entries in `encoded` (worker id → JSON entry, which the caller drops when the
    worker changes) and adding the missing ones; with a `limit`, only that many workers from
    `offset` on, with `page: {offset, limit, total}`."""
    workers = _workers_of(state, user_id)
    shown = workers if limit is None else workers[offset:offset + limit]
    parts = []
    for worker in shown:
        entry = encoded.get(worker.worker_id)
        if entry is None:
            entry = encoded[worker.worker_id] = orjson.dumps(
                worker_entry(state, worker, beats.get(worker.worker_id)))
        parts.append(entry)
    stats = orjson.dumps(_queue_stats(state, user_id))
    page = b"" if limit is None else b',"page":' + orjson.dumps(
        {"offset": offset, "limit": limit, "total": len(workers)})
    return (b'{"success":true,"workers":[' + b",".join(parts) + b'],"queueStats":' + stats
            + page + b"}")


def _workers_of(state: Projections, user_id: str | None) -> list[WorkerView]:
    return sorted(
        (w for w in state.workers.values() if user_id is None or w.user_id == user_id),
        key=lambda w: (w.created_at, w.worker_id),
    )


def _queue_stats(state: Projections, user_id: str | None) -> dict[str, int]:
    stats = queue_stats(state, user_id)
    return {
        "queuedJobs": stats.queued_jobs,
        "runningWorkers": stats.running_workers,
        "totalWorkers": stats.total_workers,
        "failedJobs": stats.failed_jobs,
    }


def hosts(known: Hosts, liveness: Liveness | None = None) -> list[dict[str, Any]]:
    """Known worker-hosts: when they came online, when last heard of, whether lost."""
    entries = []
    for host in sorted(known.values(), key=lambda h: h.host_id):
        seen = liveness.host_seen.get(host.host_id) if liveness is not None else None
        reported = liveness is not None and host.host_id in liveness.reported_hosts
        entries.append({
            "hostId": host.host_id,
            "hostname": host.hostname,
            "capacity": host.capacity,
            "onlineAt": epoch_ms(host.online_at),
            "lastSeen": epoch_ms(max(seen, host.online_at) if seen else host.online_at),
            "lost": host.lost or reported,
            "isolated": host.isolated,
            "isolation": host.isolation,
        })
    return entries


def workers_by_host_and_state(state: Projections) -> list[tuple[tuple[str, str], float]]:
    """How many workers each host has in each status (`-`: not placed on a host)."""
    counts = Counter((w.host_id or "-", str(w.status)) for w in state.workers.values())
    return [(labels, float(n)) for labels, n in sorted(counts.items())]


def watch_metrics(folded: Callable[[], Folded]) -> None:
    """The monitor's gauges, read from its folded state at each scrape."""
    metrics.watch("runner_workers", "Workers known to the monitor, by host and status",
                  ("host", "state"), lambda: workers_by_host_and_state(folded().state))
    metrics.watch("runner_log_position", "The last position recorded in the event log", (),
                  lambda: [((), float(folded().position))])
