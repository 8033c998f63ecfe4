"""The control channel between a worker-host and each worker process it spawns.

JSON lines over a Unix socketpair, fd `RUNNER_CONTROL_FD` in the worker (a container worker
connects to the socket at `RUNNER_CONTROL_SOCKET` instead); stdout and stderr are for logs only.

- host → worker, first: `Credentials` (the seed's `API_KEY` and `API_SECRET`), written as soon as
  the process exists, never through an environment or the fork-server.
- worker → host: `Hello` once ready (credentials checked, positions read), a `Beat` every
  heartbeat interval, a `Report` per trading fact; or, instead of `Hello`, `CannotStart` (its
  reason, no secret) and an exit (`EXIT_CREDENTIALS_REJECTED` when the exchange rejected its keys).
- host → worker: `Stop` (flatten first when asked), after which the worker reports the flatten
  and exits 0; SIGTERM is Stop(flatten=False); at EOF it exits `EXIT_HOST_GONE`, positions
  untouched.
- Prices: the worker sends `Subscribe` (its instruments); its host relays its feed's `Price` lines.
- Lease: `RUNNER_LEASE_UNTIL` at spawn, then a `Lease` line answering the Hello and at each renewal
  (`time.monotonic()` instants: host and worker share the clock); a worker whose lease runs out
  exits `EXIT_LEASE_LAPSED`, positions untouched.
- Bounds: a worker's lines are untrusted: `decode` refuses a line over `MAX_LINE` bytes, a string
  over `MAX_STRING` characters, more than `MAX_ITEMS` items or `MAX_DEPTH` levels, and
  `LineBudget` bounds the lines a second; the host kills a worker that breaks them
  (`ProtocolViolation`) and reports it crashed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from events.values import PositionMark

EXIT_HOST_GONE = 3
EXIT_LEASE_LAPSED = 4
EXIT_CREDENTIALS_REJECTED = 5

MAX_LINE = 64 * 1024  # bytes, the newline included
MAX_STRING = 4096  # characters of any string in a line
MAX_ITEMS = 1000  # items of any list or object in a line
MAX_DEPTH = 8
MAX_SUBSCRIPTIONS = 100  # (source, instrument) pairs a worker may ask prices of
MAX_LINES_PER_SECOND = 100.0  # sustained, per worker
LINE_BURST = 1000.0  # lines at once (a flatten of many instruments reports three per fill)

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
# A container worker's channel instead: the path of its host's listening socket, mounted into
# the container with its directory (services/worker_host/container_spawner.py); and its log.
ENV_CONTROL_SOCKET = "RUNNER_CONTROL_SOCKET"
ENV_WORKER_LOG = "RUNNER_WORKER_LOG"
ENV_HEARTBEAT_INTERVAL = "RUNNER_HEARTBEAT_INTERVAL"
ENV_STATE_FILE = "RUNNER_WORKER_STATE"  # paper account state, relative to its directory (its cwd)
ENV_PAPER_SEED = "RUNNER_PAPER_SEED"
ENV_LEASE_UNTIL = "RUNNER_LEASE_UNTIL"  # time.monotonic() instant; unset: no lease (no host)
ENV_BROKER_URLS = "RUNNER_BROKER_URLS"  # JSON {exchange or broker id: API base URL}
ENV_WORKER_MODE = "RUNNER_WORKER_MODE"  # "trade" (default) or "flatten": close all, then exit
ENV_FLATTEN_TIMEOUT = "RUNNER_FLATTEN_TIMEOUT"  # seconds a flatten may take before it gives up


class _Line(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Hello(_Line):
    type: Literal["hello"] = "hello"
    pid: int


class CannotStart(_Line):
    """The worker will not say hello: why (readable by the user, no secret in it), and whether
    a restart could help."""

    type: Literal["cannot_start"] = "cannot_start"
    reason: str
    permanent: bool = False


class Beat(_Line):
    type: Literal["heartbeat"] = "heartbeat"
    at: datetime
    positions: tuple[PositionMark, ...] = ()


class Report(_Line):
    """A trading event; `payload` is the event's fields (job_id and worker_id included)."""

    type: Literal["event"] = "event"
    event: Literal[
        "OrderFilled",
        "PositionChanged",
        "TradeClosed",
        "OrderRejected",
        "RiskLimitHit",
        "PositionsFlattened",
        "FlattenFailed",
    ]
    payload: dict[str, Any]


class Credentials(_Line):
    """The seed's API_KEY and API_SECRET, for this worker's broker account only."""

    type: Literal["credentials"] = "credentials"
    api_key: str = Field(default="", repr=False)
    api_secret: str = Field(default="", repr=False)


class Subscribe(_Line):
    """The market prices this worker trades on, from its host's feed: (source, instrument)
    pairs, the source an exchange id (`-testnet` for its sandbox)."""

    type: Literal["subscribe"] = "subscribe"
    keys: tuple[tuple[str, str], ...] = Field(max_length=MAX_SUBSCRIPTIONS)


class Price(_Line):
    """A price from the host's feed: best bid and ask, mark, and the feed's `time.time()`."""

    type: Literal["price"] = "price"
    source: str
    instrument: str
    bid: float
    ask: float
    mark: float
    at: float


class Stop(_Line):
    type: Literal["stop"] = "stop"
    flatten: bool = False


class Lease(_Line):
    """The host holds its lease until `until` (a `time.monotonic()` instant)."""

    type: Literal["lease"] = "lease"
    until: float


Line = Annotated[Hello | CannotStart | Beat | Report | Subscribe | Credentials | Price | Stop
                 | Lease, Field(discriminator="type")]
LINE = TypeAdapter(Line)


class ProtocolViolation(ValueError):
    """A line that breaks the protocol; says what is wrong with it, never what it holds."""


def encode(line: _Line) -> bytes:
    return line.model_dump_json().encode() + b"\n"


def decode(raw: bytes | str) -> (Hello | CannotStart | Beat | Report | Subscribe | Credentials
                                  | Price | Stop | Lease):
    """The line `raw` is; ProtocolViolation for anything out of bounds or not a valid line."""
    if len(raw) > MAX_LINE:
        raise ProtocolViolation(f"a line of {len(raw)} bytes (at most {MAX_LINE})")
    try:
        value = json.loads(raw, parse_constant=_not_a_number)
    except ProtocolViolation:
        raise
    except (ValueError, RecursionError):
        raise ProtocolViolation("a line that is not JSON") from None
    _check(value, MAX_DEPTH)
    try:
        return LINE.validate_python(value)
    except ValidationError as exc:
        where = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'line'}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)[:3]
        )
        raise ProtocolViolation(f"not a valid line ({where})") from None


def _not_a_number(constant: str) -> float:
    raise ProtocolViolation(f"a number that is not finite ({constant})")


def _check(value: Any, depth: int) -> None:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolViolation("a number that is not finite")
    elif isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ProtocolViolation(f"a string of {len(value)} characters (at most {MAX_STRING})")
    elif isinstance(value, list | dict):
        if depth == 0:
            raise ProtocolViolation(f"nested deeper than {MAX_DEPTH}")
        if len(value) > MAX_ITEMS:
            raise ProtocolViolation(f"{len(value)} items in one place (at most {MAX_ITEMS})")
        for item in value.items() if isinstance(value, dict) else value:
            if isinstance(item, tuple):  # an object's key and value
                _check(item[0], depth - 1)
                item = item[1]
            _check(item, depth - 1)


@dataclass
class LineBudget:
    """How many lines a worker may still send: `burst` at once, refilled at `rate` a second (a
    token bucket). `take(now)` spends one; False when none is left. `now`: a monotonic clock."""

    rate: float = MAX_LINES_PER_SECOND
    burst: float = LINE_BURST
    tokens: float = field(init=False)
    last: float | None = None

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1 - 1e-9:  # float dust from the refill must not cost a whole line
            return False
        self.tokens -= 1
        return True
