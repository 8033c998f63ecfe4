"""Fold recorded envelopes into the projections and host membership: live and in replay alike.

The monitor folds each committed batch with `Folded.fold`, and a restart or `runner replay` folds
the log with the same method, so a replay reproduces the live state exactly. A replay decodes
only what someone reads: envelopes of other types are only counted (`projections.counted`), and
the log does not even send them (`EventLog.pages(types=...)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import gc
import json
import logging
import operator
import os
import pickle
import signal
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from traceback import format_exc
from typing import TYPE_CHECKING, Any

import immutables

from events import REGISTRY, Envelope
from events.envelope import LoggedEnvelope
from projections import (
    EMPTY,
    EntitlementView,
    PositionView,
    Projections,
    TradingStats,
    WorkerView,
    apply,
    counted,
    fold,
    folds,
    forget_ended,
    kept_from,
)
from services.monitor.liveness import (
    HOST_TYPES,
    NO_HOSTS,
    SILENCE_TYPES,
    Hosts,
    HostView,
    apply_host,
    silenced,
)

if TYPE_CHECKING:
    from services.monitor.log import EventLog

log = logging.getLogger(__name__)


@dataclass
class Folded:
    """The state after the log up to `position`: the projections, host membership and the
    workers the log reports silent (`liveness.silenced`)."""

    state: Projections = EMPTY
    hosts: Hosts = NO_HOSTS
    position: int = 0
    silenced: set[str] = field(default_factory=set)
    _failed_types: set[str] = field(default_factory=set, repr=False)

    def fold(self, envelopes: Sequence[Envelope | LoggedEnvelope], position: int,
             skipped: int = 0) -> bool:
        """Fold recorded `envelopes`, in log order, and `skipped` more envelopes of types only
        counted, the last of all at `position`; returns whether any worker may have been
        forgotten. A projection that raises skips only that envelope (the batch is folded again
        one by one): the log stays the truth, and a fixed projection rebuilds from it."""
        clock = self.state.clock
        try:
            state = fold(envelopes, self.state)
        except Exception:
            state = self._fold_one_by_one(envelopes, position)
        self.state = counted(state, skipped) if skipped else state
        for envelope in envelopes:
            if envelope.type in HOST_TYPES:
                self.hosts = apply_host(self.hosts, envelope)
            elif envelope.type in SILENCE_TYPES:
                silenced(self.silenced, envelope)
        forgot = kept_from(state.clock) > kept_from(clock)
        if forgot:
            self.silenced.intersection_update(state.workers.keys())
        self.position = position
        return forgot

    def _fold_one_by_one(self, envelopes: Sequence[Envelope | LoggedEnvelope],
                         position: int) -> Projections:
        state = self.state
        for envelope in envelopes:
            try:
                state = apply(state, envelope)
            except Exception:
                if envelope.type not in self._failed_types:
                    self._failed_types.add(envelope.type)
                    log.exception("projection failed on %s in the batch up to position %d "
                                  "(skipped; logged once per type)", envelope.type, position)
        return state

    @staticmethod
    def reads(type_name: str) -> bool:
        """Whether `fold` looks into envelopes of this type (else counting them is the same)."""
        return folds(type_name) or type_name in HOST_TYPES or type_name in SILENCE_TYPES


# The types `Folded.fold` reads; a replay reads no other row (unless its `each` asks for it).
READ = frozenset(name for name in REGISTRY if Folded.reads(name))


async def replay(event_log: EventLog, *, until_position: int | None = None,
                 until_time: datetime | None = None,
                 each: Callable[[int, Envelope], None] | None = None,
                 each_types: Collection[str] | None = None,
                 start: Folded | None = None) -> Folded:
    """Fold the log from the start, or onto `start` from its position on (a snapshot),
    optionally only up to a position or a moment; `each` is called with every envelope (or those
    of `each_types`), in log order, after its page is folded. A long SQLite log folded from the
    start with no `each` is folded in partitions (`replay_partitioned`)."""
    path = event_log.sqlite_file
    if (start is None and each is None and until_time is None and path is not None
            and PARTITIONS > 1):
        head = (await event_log.head()).position
        until = head if until_position is None else min(until_position, head)
        if until >= PARTITION_FROM:
            try:
                folded, read_rows = await replay_partitioned(path, until)
            except PartitionFailed as exc:
                log.warning("%s; folding the log in one process", exc)
            else:  # the rows of types not folded were not even read
                return replace(folded, state=counted(
                    folded.state, await event_log.count(until) - read_rows))
    folded = start or Folded()
    # the types `each` sees (None: every type); the log sends no body for any other type
    wanted = frozenset() if each is None else None if each_types is None else frozenset(each_types)
    with _no_cycle_collection():
        async for page in event_log.pages(folded.position, until_position, until_time,
                                          types=None if wanted is None else READ | wanted):
            envelopes: list[Envelope | LoggedEnvelope] = []
            seen: list[tuple[int, Envelope]] = []
            for position, type_name, body in page.rows:
                if wanted is None or type_name in wanted:
                    envelope = Envelope.from_json(body)
                    seen.append((position, envelope))
                    envelopes.append(envelope)
                else:  # only folded: the light decode gives the same state
                    envelopes.append(LoggedEnvelope.from_json(body))
            folded.fold(envelopes, page.last, skipped=page.skipped)
            if each is not None:
                for position, envelope in seen:
                    each(position, envelope)
    return folded


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may run on (its affinity), fewer under a cgroup's CPU quota (a
    container's `--cpus`, rounded up): `os.cpu_count()` counts the host's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with contextlib.suppress(OSError, ValueError):
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            return max(1, min(cores or 1, -(-int(quota) // int(period))))
    return cores or 1


# Folding in partitions: a stream (a job's, a user's, a host's) is folded whole, in order, by
# one process, and the projections are keyed by what a stream is about (worker and job, user,
# host), so the partitions' states are disjoint and their union is the state. The merge checks
# that they are disjoint, and a log that breaks it is folded in one process instead.
PARTITIONS = min(usable_cores(), 4)
# events; below this a fork gains little over folding in one process
PARTITION_FROM = 50_000
MMAP_BYTES = 1 << 40  # a partition maps the log file (up to SQLite's cap) instead of reading pages


class PartitionFailed(RuntimeError):
    """A partitioned fold could not be used (a process failed, or the states overlap)."""


async def replay_partitioned(path: str, until: int) -> tuple[Folded, int]:
    """The SQLite log at `path` up to position `until` folded in `PARTITIONS` processes (this
    one and forked children), only its rows of the types folded read (and counted), and how
    many rows that was."""
    children = [_fork_partition(path, until, part) for part in range(1, PARTITIONS)]
    try:  # forked before this process starts a thread of its own for its partition
        parts = [await asyncio.to_thread(fold_partition, path, until, 0, PARTITIONS)]
        for child in children:
            out = await asyncio.to_thread(child.result)
            with _no_cycle_collection():  # unpickling a state builds many objects
                parts.append(pickle.loads(out))
    finally:  # none outlives the replay, whatever ended it
        for child in children:
            child.close()
    folded = _disjoint_union([p for p, _ in parts], until)
    if folded is None:
        raise PartitionFailed("the log's streams do not partition its projections' keys")
    return folded, sum(n for _, n in parts)


@dataclass
class _Child:
    """A forked partition: its process and the pipe its pickled result comes through."""

    pid: int
    pipe: int
    reaped: bool = False

    def result(self) -> bytes:
        """The child's output, once it has exited; raises `PartitionFailed` if it failed."""
        with os.fdopen(os.dup(self.pipe), "rb") as pipe:  # `close` may close ours meanwhile
            out = pipe.read()
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        if (code := os.waitstatus_to_exitcode(status)) != 0:
            raise PartitionFailed(f"a partition's process exited with {code}")
        return out

    def close(self) -> None:
        os.close(self.pipe)
        if not self.reaped:  # (a thread still reading its result may reap it first)
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            self.reaped = True


def _fork_partition(path: str, until: int, part: int) -> _Child:
    """Fold partition `part` in a forked child (its code already imported), which writes its
    pickled (Folded, rows read) to a pipe. The child reads the log through a connection of its
    own, touches nothing it inherited (the event loop, other connections) and ends with
    `os._exit`, running no cleanup of the parent's."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(read_end)
            result = pickle.dumps(fold_partition(path, until, part, PARTITIONS),
                                  protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(write_end, "wb") as out:
                out.write(result)
            code = 0
        except BaseException:  # written straight to the fd: a lock (logging's, a console's)
            # held by another of the parent's threads at the fork stays held in this child
            os.write(2, f"folding partition {part} of the log failed:\n{format_exc()}".encode())
        finally:  # the fold's objects need no freeing one by one, nor the parent's anything
            os._exit(code)
    os.close(write_end)
    return _Child(pid, read_end)


def partition_pages(path: str, until: int, part: int, parts: int, types: Collection[str],
                    batch: int = 5000) -> Iterator[list[tuple[int, str]]]:
    """One of `parts` disjoint partitions of a SQLite log up to position `until`, its rows of
    `types` only, as pages of (position, envelope JSON) in order. A partition is a range of
    stream names (`_stream_bounds`), so a stream (a job, a user, a host) lies in one partition
    whole, in order."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        conn.execute(f"PRAGMA mmap_size={MMAP_BYTES}")  # pages read in place, not copied
        low, high = [None, *_stream_bounds(conn, until, parts), None][part : part + 2]
        where, args = "position <= ?", [until]
        # the stream's range first: a comparison or two, which leave the type's lookup half
        # the rows
        if low is not None:
            where, args = f"{where} AND +stream >= ?", [*args, low]
        if high is not None:
            where, args = f"{where} AND +stream < ?", [*args, high]
        cursor = conn.execute(
            f"SELECT position, envelope FROM event_log WHERE {where}"
            f" AND +type IN ({','.join('?' * len(types))}) ORDER BY position", [*args, *types])
        while rows := cursor.fetchmany(batch):
            yield rows


def _stream_bounds(conn: sqlite3.Connection, until: int, parts: int,
                   sample: int = 1024) -> list[str]:
    """`parts - 1` stream names splitting the log up to `until` into ranges of about as many
    rows, from the streams of up to `sample` rows spread evenly over it (every process folding
    a partition finds the same)."""
    last = conn.execute("SELECT max(position) FROM event_log WHERE position <= ?",
                        [until]).fetchone()[0] or 0
    count = min(sample, last)
    positions = [1 + i * last // count for i in range(count)]
    streams = sorted(stream for stream, in conn.execute(
        "SELECT stream FROM event_log WHERE position IN (SELECT value FROM json_each(?))",
        [json.dumps(positions)])) or [""]
    return [streams[len(streams) * i // parts] for i in range(1, parts)]


def fold_partition(path: str, until: int, part: int, parts: int) -> tuple[Folded, int]:
    """One partition of the log folded (`partition_pages`), and the rows it read."""
    folded, read_rows = Folded(), 0
    with _no_cycle_collection():
        for rows in partition_pages(path, until, part, parts, READ):
            folded.fold([LoggedEnvelope.from_json(body) for _, body in rows], rows[-1][0])
            read_rows += len(rows)
    return folded, read_rows


def _disjoint_union(parts: Sequence[Folded], position: int) -> Folded | None:
    """The partitions' states as one, at `position`; None if any two share a key."""
    def union(maps: Sequence[Any]) -> Any:
        merged = maps[0].mutate()
        for other in maps[1:]:
            merged.update(other)
        result = merged.finish()
        return result if len(result) == sum(map(len, maps)) else None

    states = [p.state for p in parts]
    keyed = {name: union([getattr(s, name) for s in states]) for name in
             ("workers", "positions", "stats", "entitlements", "worker_by_job", "early")}
    hosts = union([p.hosts for p in parts])
    silenced = set().union(*(p.silenced for p in parts))
    if hosts is None or None in keyed.values() or len(silenced) != sum(
            len(p.silenced) for p in parts):
        return None
    ended_by_hour = states[0].ended_by_hour.mutate()  # the hours overlap, the workers do not
    for other in states[1:]:
        for hour, ended in other.ended_by_hour.items():
            ended_by_hour[hour] = ended_by_hour.get(hour, immutables.Map()).update(ended)
    clocks = [s.clock for s in states if s.clock is not None]
    # each partition forgot by its own clock, which may be behind the log's
    state = forget_ended(Projections(
        **keyed, rejected_jobs=sum(s.rejected_jobs for s in states),
        events_applied=sum(s.events_applied for s in states), clock=max(clocks, default=None),
        ended_by_hour=ended_by_hour.finish()))
    silenced.intersection_update(state.workers.keys())  # as the partitions' own forgetting
    return Folded(state, hosts, position, silenced,
                  set().union(*(p._failed_types for p in parts)))


def _rebuilt(cls: type[Any], values: tuple[Any, ...]) -> Any:
    view = object.__new__(cls)
    for name, value in zip(cls.__slots__, values, strict=True):
        object.__setattr__(view, name, value)
    return view


def _pickled_as_values(cls: type[Any]) -> None:
    """Pickle a frozen slots dataclass as its fields' values, rebuilt without `__init__`: a
    partition's state, thousands of views, crosses a pipe whole."""
    values = operator.attrgetter(*cls.__slots__)
    copyreg.pickle(cls, lambda view: (_rebuilt, (cls, values(view))))


for _view in (WorkerView, PositionView, TradingStats, EntitlementView, HostView):
    _pickled_as_values(_view)


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause the cyclic garbage collector: a fold makes no reference cycles (immutable maps and
    frozen dataclasses), and the objects a long replay keeps alive would make each automatic
    pass walk a large heap again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
