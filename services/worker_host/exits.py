"""How a worker's end is reported: one pure classifier for supervision and for recovery."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import StrEnum

from events import CrashReason, WorkerCrashed, WorkerStopped
from services.worker.protocol import EXIT_LEASE_LAPSED


class Ending(StrEnum):
    """Why the host ended a worker; a worker ended for none of these ended on its own."""

    STOP = "stop"  # a requested stop
    HEARTBEAT = "heartbeat"  # killed after HeartbeatMissed
    FENCED = "fenced"  # the host's lease lapsed, or it was declared lost
    DRAIN = "drain"  # the host shut down
    PROTOCOL = "protocol"  # killed for breaking the control protocol
    HOST_RESTARTED = "host restarted"  # found by a host starting again (recovery)


@dataclass(frozen=True)
class Ended:
    """A worker whose process is gone, as the host knew it."""

    job_id: str
    worker_id: str
    attempt: int
    stopping: bool = False  # a stop was requested
    stop_reason: str | None = None


def how(code: int | None) -> str:
    if code is None:  # an orphan of a lost fork-server, or found by recovery: nobody reaped it
        return "exited (code unknown)"
    if code >= 0:
        return f"exited with code {code}"
    return f"killed by {signal.Signals(-code).name}"


def exit_event(worker: Ended, *, host_id: str, ending: Ending | None, code: int | None,
               heartbeat_timeout: float, violation: str = "",
               cause: str = "") -> WorkerStopped | WorkerCrashed:
    """WorkerStopped after a requested stop; WorkerCrashed otherwise, with its reason
    (`violation`: what it did, when it was killed for breaking the protocol; `cause`: what
    ended it, when its runner knows, e.g. "out of memory")."""
    ids = {"job_id": worker.job_id, "worker_id": worker.worker_id}
    if worker.stopping:
        if ending == Ending.HOST_RESTARTED:
            return WorkerStopped(**ids, reason=f"{worker.stop_reason} (host restarted)")
        return WorkerStopped(**ids, reason=worker.stop_reason or "stopped", exit_code=code)
    if code == EXIT_LEASE_LAPSED:  # it fenced itself: the host's lease ran out
        ending = Ending.FENCED
    match ending:
        case Ending.HEARTBEAT:
            reason, detail = (CrashReason.HEARTBEAT_TIMEOUT,
                              f"no heartbeat for {heartbeat_timeout:g}s; killed")
        case Ending.FENCED:
            reason, detail = CrashReason.HOST_LOST, f"fenced on host {host_id}; {how(code)}"
        case Ending.DRAIN:
            reason, detail = CrashReason.HOST_LOST, f"host {host_id} shut down; {how(code)}"
        case Ending.HOST_RESTARTED:
            reason, detail = CrashReason.EXITED, f"worker-host {host_id} restarted"
        case Ending.PROTOCOL:
            reason = CrashReason.EXITED
            detail = f"broke the control protocol ({violation}); {how(code)}"
        case _:
            reason = CrashReason.EXITED
            detail = "" if code is not None and code >= 0 and not cause else how(code)
            if cause:
                detail = f"{detail}: {cause}"
    return WorkerCrashed(**ids, host_id=host_id, attempt=worker.attempt, reason=reason,
                         exit_code=code, detail=detail)
