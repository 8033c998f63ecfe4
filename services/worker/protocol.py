"""The control channel between a worker-host and each worker process it spawns.

JSON lines over a Unix socketpair whose worker end is fd `RUNNER_CONTROL_FD` in the worker.
The worker's stdout/stderr are for logs only (they go to a file), never for this protocol.

host -> worker, first: `Credentials`, the user's broker credentials (the seed's `API_KEY` and
`API_SECRET`), written by the host the moment the worker's process exists, and read by the worker
before it opens its broker. They never travel in an environment (readable in /proc, inherited
by every child) nor through the fork-server, and so never sit in the memory later workers are
forked from.
worker -> host: `Hello` once ready, a `Beat` every heartbeat interval, a `Report` for every
trading fact (OrderFilled, PositionChanged, TradeClosed, PositionsFlattened, FlattenFailed).
host -> worker: `Stop` (graceful; flatten first when asked). After a Stop the worker reports the
flatten outcome (when asked) and exits 0. On EOF of the channel (its host is gone) the worker
exits with `EXIT_HOST_GONE` without touching positions. SIGTERM = Stop(flatten=False).

The host's lease reaches its workers: `RUNNER_LEASE_UNTIL` at spawn, then a `Lease` line each
time the host renews its own. Both are `time.monotonic()` instants (host and worker share the
machine, hence the clock). A worker whose lease runs out exits with `EXIT_LEASE_LAPSED` without
touching positions: a stalled or cut-off host cannot leave it running past the moment the system
may restart it elsewhere.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from events.values import PositionMark

EXIT_HOST_GONE = 3
EXIT_LEASE_LAPSED = 4

# Environment of a worker process: the seed's per-worker variables (its API_KEY and API_SECRET
# come as the `Credentials` line instead) ...
ENV_USER_ID = "USER_ID"
ENV_STRATEGY_ID = "STRATEGY_ID"
ENV_BROKER_ID = "BROKER_ID"
ENV_CONFIG = "CONFIG"  # the StrategyConfig as camelCase JSON, as in the seed
# ... and the runtime's own.
ENV_WORKER_ID = "RUNNER_WORKER_ID"
ENV_JOB_ID = "RUNNER_JOB_ID"
ENV_CONTROL_FD = "RUNNER_CONTROL_FD"
ENV_HEARTBEAT_INTERVAL = "RUNNER_HEARTBEAT_INTERVAL"
ENV_STATE_FILE = "RUNNER_WORKER_STATE"  # paper account state, relative to its directory (its cwd)
ENV_PAPER_SEED = "RUNNER_PAPER_SEED"
ENV_LEASE_UNTIL = "RUNNER_LEASE_UNTIL"  # time.monotonic() instant; unset: no lease (no host)


class _Line(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Hello(_Line):
    type: Literal["hello"] = "hello"
    pid: int


class Beat(_Line):
    type: Literal["heartbeat"] = "heartbeat"
    at: datetime
    positions: tuple[PositionMark, ...] = ()


class Report(_Line):
    """A trading event; `payload` is the event's fields (job_id and worker_id included)."""

    type: Literal["event"] = "event"
    event: Literal[
        "OrderFilled", "PositionChanged", "TradeClosed", "PositionsFlattened", "FlattenFailed"
    ]
    payload: dict[str, Any]


class Credentials(_Line):
    """The seed's API_KEY and API_SECRET, for this worker's broker account only."""

    type: Literal["credentials"] = "credentials"
    api_key: str = Field(default="", repr=False)
    api_secret: str = Field(default="", repr=False)


class Stop(_Line):
    type: Literal["stop"] = "stop"
    flatten: bool = False


class Lease(_Line):
    """The host holds its lease until `until` (a `time.monotonic()` instant)."""

    type: Literal["lease"] = "lease"
    until: float


Line = Annotated[Hello | Beat | Report | Credentials | Stop | Lease, Field(discriminator="type")]
LINE = TypeAdapter(Line)


def encode(line: _Line) -> bytes:
    return line.model_dump_json().encode() + b"\n"


def decode(raw: bytes | str) -> Hello | Beat | Report | Credentials | Stop | Lease:
    return LINE.validate_json(raw)
