"""The event log as this gateway streams it (`GET /events`): one reader following the monitor's
log, handing each new entry to the streams that want it.

A stream reads the entries after its start (recent ones from memory, older pages from the
monitor) up to where the reader stands, then subscribes in the same step, so every position
comes once, in order, with no gap between history and live. A subscriber that falls
`max_pending` entries behind is dropped (bounded memory, no delay to the others), its stream
ending with where to resume.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from services import metrics
from services.bus import BusUnavailable

log = logging.getLogger(__name__)

# (after, limit, wait seconds) -> log rows `{"position", "envelope"}` in order
Fetch = Callable[[int, int, float], Awaitable[list[dict[str, Any]]]]
Head = Callable[[], Awaitable[int]]

NO_LONG_POLL = 0.5  # seconds between polls of a monitor that answers at once when idle
# sealed, but nothing a viewer needs: the value is withheld, the key kept (messages need it)
WITHHELD_FIELDS = ("credentials_sealed",)
WITHHELD = "(withheld)"


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One recorded envelope as streamed: what filters look at, and its SSE frame."""

    position: int
    type: str
    user_id: str | None
    worker_id: str | None
    job_id: str | None
    frame: bytes  # `id:`, `event:`, `data:` lines, encoded once for every subscriber

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> LogEntry:
        position, envelope = int(row["position"]), row["envelope"]
        payload = envelope.get("payload") or {}
        if any(name in payload for name in WITHHELD_FIELDS):
            envelope = envelope | {"payload": {k: WITHHELD if k in WITHHELD_FIELDS else v
                                               for k, v in payload.items()}}
        kind = str(envelope.get("type", ""))
        frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (
            position, kind.encode(), orjson.dumps(envelope))
        return cls(position, kind, envelope.get("user_id"), payload.get("worker_id"),
                   payload.get("job_id") or envelope.get("correlation_id"), frame)


@dataclass(frozen=True)
class EventFilter:
    """Which entries a stream shows: one user's (None: everyone's), of some types, of one worker
    or job."""

    user_id: str | None = None
    types: frozenset[str] = frozenset()
    worker_id: str | None = None
    job_id: str | None = None

    def wants(self, entry: LogEntry) -> bool:
        return ((self.user_id is None or entry.user_id == self.user_id)
                and (not self.types or entry.type in self.types)
                and (self.worker_id is None or entry.worker_id == self.worker_id)
                and (self.job_id is None or entry.job_id == self.job_id))


class Dropped(Exception):
    """The stream was cut: it fell too far behind, or the gateway is stopping (its client
    resumes from its last id)."""


@dataclass(eq=False)
class Subscriber:
    """A live stream's pending entries (bounded); `after`: the position it has seen up to."""

    filter: EventFilter
    after: int
    max_pending: int
    loop: asyncio.AbstractEventLoop  # its stream's (asked once: asking costs a system call)
    pending: deque[LogEntry] = field(default_factory=deque)
    dropped: str | None = None  # why it was cut
    quiet: bool = False  # nothing taken since the last keep-alive tick
    _waiter: asyncio.Future[None] | None = None  # set while `take` waits

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def offer(self, entry: LogEntry) -> bool:
        """Queue `entry` if wanted; False when that overflows the bound (the caller drops it)."""
        if entry.position <= self.after or not self.filter.wants(entry):
            return True
        if len(self.pending) >= self.max_pending:
            return False
        self.pending.append(entry)
        self._wake()
        return True

    def drop(self, reason: str) -> None:
        """Cut: forget what is pending (the client reads it again when it resumes)."""
        self.dropped = reason
        self.pending.clear()
        self._wake()

    async def take(self) -> list[LogEntry]:
        """Every pending entry, once there is one; an empty list when the tail's keep-alive
        tick finds the stream idle. Raises `Dropped`."""
        if not self.pending and not self.dropped:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.dropped:
            raise Dropped(self.dropped)
        taken = list(self.pending)
        self.pending.clear()
        if taken:
            self.after = taken[-1].position
        self.quiet = False
        return taken

    def tick(self) -> None:
        """The keep-alive clock: a stream quiet since the previous tick gets an empty batch."""
        if self.quiet:
            self._wake()
        self.quiet = True


class OpenStream:
    """One stream served from a position (`LogTail.open`): its history in batches
    (`history`), then, if it follows the log, its `subscriber`'s live entries; `close` it
    when done."""

    def __init__(self, tail: LogTail, wanted: EventFilter, after: int | None,
                 follow: bool) -> None:
        self.tail, self.wanted, self.after, self.follow = tail, wanted, after, follow
        self.subscriber: Subscriber | None = None  # once `history` has reached the present
        self.closed = False

    async def history(self) -> AsyncIterator[list[LogEntry]]:
        """The entries wanted from the start position up to the present, in log order, each
        once; at its end the stream has its `subscriber` (for every position after those), or,
        without `follow`, none (it has reached where it stops)."""
        tail, wanted = self.tail, self.wanted
        await tail._live.wait()
        cursor = tail.position if self.after is None else self.after
        until = None if self.follow else tail.position
        while until is None or cursor < until:
            # no await between the check and the subscription below: nothing falls between
            if tail._recent_after(cursor) is not None or cursor >= tail.position:
                break
            rows = await tail._fetch(cursor, tail.page, 0.0)
            if not rows:
                break  # the log holds nothing after `cursor` (it was reset): go live
            entries = [LogEntry.from_row(row) for row in rows]
            if until is not None:
                entries = [e for e in entries if e.position <= until]
                if not entries:
                    return
            yield [e for e in entries if wanted.wants(e)]
            if until is not None and entries[-1].position >= until:
                return
            cursor = entries[-1].position
        else:
            return
        recent = [e for e in tail._recent_after(cursor) or () if wanted.wants(e)]
        if until is not None:
            yield [e for e in recent if e.position <= until]
            return
        if self.closed:
            return
        self.subscriber = tail.subscribe(wanted, max(cursor, tail.position))
        if recent:
            yield recent

    def close(self) -> None:
        """Stop: no more entries are kept for it."""
        if not self.closed:
            self.closed = True
            self.tail._streams -= 1
            if self.subscriber is not None:
                self.tail.unsubscribe(self.subscriber)


class LogTail:
    """Follows the log (`run`) and serves streams from any position (`stream`)."""

    def __init__(self, fetch: Fetch, head: Head, *, keep: int = 10_000, page: int = 1000,
                 wait: float = 5.0, max_pending: int = 1000, idle: float = 15.0) -> None:
        self._fetch, self._head = fetch, head
        self.page, self.wait, self.max_pending, self.idle = page, wait, max_pending, idle
        self.position = 0  # the last position read (current while `_live`)
        self.ready = asyncio.Event()  # the head was read once
        self._live = asyncio.Event()  # following the log now
        self._demand = asyncio.Event()  # a stream opened while it was not
        self._streams = 0  # open streams, live or still reading history
        self.recent: deque[LogEntry] = deque(maxlen=keep)  # contiguous positions, up to position
        self._by_user: dict[str | None, set[Subscriber]] = {}  # None: subscribers to everyone's
        self.dropped = 0  # subscribers dropped for falling behind, since the start

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._by_user.values())

    # ------------------------------------------------------------------ following the log

    async def run(self) -> None:
        """Follow the log, and tick the keep-alive clock every `idle / 2` seconds (a quiet
        stream gets a keep-alive every `idle` seconds or so), until cancelled."""
        clock = asyncio.ensure_future(self._tick())
        try:
            await self._follow()
        finally:
            clock.cancel()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.idle / 2)
            for subscribers in list(self._by_user.values()):
                for subscriber in subscribers:
                    subscriber.tick()

    async def _follow(self) -> None:
        """Read the head, then, while any stream is open, long-poll for the entries after the
        last one read; with none open it stops asking (an unwatched gateway costs the monitor
        nothing). An unreachable monitor is retried with a growing pause."""
        pause = 0.2
        while True:
            if self.ready.is_set() and not self._streams:
                self._live.clear()
                self._demand.clear()
                await self._demand.wait()
            try:
                if not self._live.is_set():
                    head = await self._head()
                    if head != self.position:
                        self.recent.clear()  # what came meanwhile was not read
                    self.position = head
                    self.ready.set()
                    self._live.set()
                    continue
                asked = time.monotonic()
                rows = await self._fetch(self.position, self.page, self.wait)
                if not rows and time.monotonic() - asked < min(self.wait / 2, 0.1):
                    await asyncio.sleep(NO_LONG_POLL)  # a monitor that does not wait: poll
            except asyncio.CancelledError:
                raise
            except BusUnavailable:  # the bus has said so, and the next fetch waits for it
                await asyncio.sleep(0.2)
                continue
            except Exception as exc:
                log.warning("event stream: cannot read the log (%s); retrying in %.1fs", exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            pause = 0.2
            self.advance(rows)

    def advance(self, rows: Iterable[dict[str, Any]]) -> None:
        """Take the rows read after `position`: remember them and hand each to its subscribers."""
        for row in rows:
            entry = LogEntry.from_row(row)
            if entry.position <= self.position:
                continue  # read already
            if entry.position != self.position + 1:
                log.warning("event stream: the log jumped from %d to %d", self.position,
                            entry.position)
                self.recent.clear()  # `recent` holds contiguous positions only
            self.position = entry.position
            self.recent.append(entry)
            for key in (entry.user_id, None) if entry.user_id is not None else (None,):
                subscribers = self._by_user.get(key)
                if not subscribers:
                    continue
                for subscriber in [s for s in subscribers if not s.offer(entry)]:
                    behind = len(subscriber.pending) + 1
                    log.info("event stream: dropped a subscriber %d events behind", behind)
                    self.unsubscribe(subscriber)
                    subscriber.drop(f"too slow: {behind} events behind")
                    self.dropped += 1
                    metrics.stream_dropped.inc()

    def close(self) -> None:
        """End every live stream (the gateway is stopping)."""
        for subscribers in list(self._by_user.values()):
            for subscriber in list(subscribers):
                self.unsubscribe(subscriber)
                subscriber.drop("the gateway is stopping")

    def subscribe(self, wanted: EventFilter, after: int) -> Subscriber:
        subscriber = Subscriber(wanted, after, self.max_pending, asyncio.get_running_loop())
        self._by_user.setdefault(wanted.user_id, set()).add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        key = subscriber.filter.user_id
        subscribers = self._by_user.get(key)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._by_user[key]

    def _recent_after(self, position: int) -> list[LogEntry] | None:
        """The remembered entries after `position`, or None if some of them are forgotten."""
        if position >= self.position:
            return []
        if not self.recent or self.recent[0].position > position + 1:
            return None
        return list(itertools.islice(self.recent, position + 1 - self.recent[0].position, None))

    # ------------------------------------------------------------------ streams

    def open(self, wanted: EventFilter, after: int | None = None, *,
             follow: bool = True) -> OpenStream:
        """A stream of the entries `wanted` after position `after` (None: from now on), as
        `stream` gives them, for a caller that takes the live ones from its subscriber
        itself."""
        self._streams += 1
        self._demand.set()
        return OpenStream(self, wanted, after, follow)

    async def stream(self, wanted: EventFilter, after: int | None = None, *,
                     follow: bool = True) -> AsyncIterator[list[LogEntry]]:
        """The entries `wanted` after position `after` (None: from now on), in log order, each
        once, in batches, with an empty batch after about `idle` quiet seconds (keep-alives).
        Without `follow` it ends at the present; raises `Dropped` when it falls `max_pending`
        entries behind."""
        opened = self.open(wanted, after, follow=follow)
        try:
            async for batch in opened.history():
                yield batch
            if opened.subscriber is not None:
                while True:
                    yield await opened.subscriber.take()
        finally:
            opened.close()
