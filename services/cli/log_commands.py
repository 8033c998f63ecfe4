"""Event-log tools: `runner publish`, `runner events tail`, `runner replay`, `runner audit verify`.

With a token (`--token`, `RUNNER_TOKEN`), `tail` and `replay` go through the gateway's event
stream (a user sees their own events, the admin everyone's); without one they are operators' tools
on the bus and on the monitor's log database, which `replay` and `audit verify` read directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Iterable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from aiormq.exceptions import AMQPError
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from events import REGISTRY, Envelope, UnknownMessageType, model_for
from events.queries import LogQuery, QueryRefused
from events.routing import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from services.bus import AmqpBus, Bus, PublishFailed, RpcError, poison_reason
from services.cli.errors import fail
from services.monitor import views
from services.monitor.log import EventLog, EventLogMissing
from services.monitor.replay import Folded, replay
from services.settings import Settings, async_driver, node_addresses
from services.topology import MONITOR_RPC

events_app = typer.Typer(no_args_is_help=True, help="Watch the event stream.",
                         rich_markup_mode=None)
audit_app = typer.Typer(no_args_is_help=True, help="Check the event log's integrity.",
                        rich_markup_mode=None)

HISTORY_PAGE = 1000
RECENT_IDS = 50_000  # history ids remembered to drop their live twins (the overlap is the tail)


TOKEN_HELP = ("a user's (or the admin's) token: go through the gateway's event stream instead "
              "of the broker and the log database (operators)")


def _gateway_url(settings: Settings) -> str:
    return f"http://{settings.http_host}:{settings.http_port}"


def _run(coro: Awaitable[Any]) -> Any:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _broker_name(settings: Settings) -> str:
    return (",".join(f"{host}:{port}" for host, port in node_addresses(settings.amqp_url))
            + ("" if settings.vhost == "/" else f"/{settings.vhost}"))


async def _connect(settings: Settings) -> Bus:
    for noisy in ("aiormq", "aio_pika"):  # their retries are not the user's news
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    bus = AmqpBus(settings, "cli")
    try:
        await asyncio.wait_for(bus.start(), timeout=settings.request_timeout)
    except (OSError, TimeoutError, AMQPError) as exc:
        fail(f"cannot reach the broker at {_broker_name(settings)}: {type(exc).__name__}")
    return bus


# ---------------------------------------------------------------------------- publish


def _default_stream(payload: dict[str, Any], user: str | None) -> str:
    for key, prefix in (("job_id", "job"), ("host_id", "host")):
        if isinstance(payload.get(key), str):
            return f"{prefix}-{payload[key]}"
    return f"user-{user}" if user else "cli"


def publish_command(
    type_name: str = typer.Argument(..., metavar="TYPE", help="message type, e.g. JobRequested"),
    payload_json: str = typer.Argument(..., metavar="PAYLOAD_JSON", help="the payload as JSON"),
    user: str | None = typer.Option(None, "--user", help="user_id of the envelope"),
    stream: str | None = typer.Option(None, "--stream",
                                      help="stream [job-<job_id> / host-<host_id>]"),
    correlation: str | None = typer.Option(None, "--correlation", help="correlation id [job_id]"),
) -> None:
    """Validate a message against the catalogue, publish it with a confirm, print its event_id."""
    try:
        model = model_for(type_name)
    except UnknownMessageType:
        fail(f"unknown message type {type_name!r} (not in the catalogue)")
    try:
        payload = json.loads(payload_json)
    except ValueError as exc:
        fail(f"payload is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        fail("payload must be a JSON object")
    try:
        message = model.model_validate(payload)
    except ValidationError as exc:
        fail(f"{type_name}: {poison_reason(exc)}")
    envelope = Envelope.wrap(
        message,
        stream=stream or _default_stream(payload, user),
        user_id=user,
        correlation_id=correlation or payload.get("job_id"),
    )
    _run(_publish(Settings(), envelope))
    typer.echo(str(envelope.event_id))


async def _publish(settings: Settings, envelope: Envelope) -> None:
    bus = await _connect(settings)
    try:
        await bus.publish(envelope)
    except PublishFailed as exc:
        fail(str(exc))
    finally:
        await bus.close()


# ---------------------------------------------------------------------------- tail


class _Printer:
    """Filters and prints envelopes, one per line; stops the tail after `limit`."""

    def __init__(self, *, user: str | None, types: list[str], stream: str | None,
                 as_json: bool, limit: int | None) -> None:
        self.user, self.types, self.stream = user, set(types), stream
        self.as_json, self.limit = as_json, limit
        self.printed = 0
        self.console = Console(highlight=False, soft_wrap=True)
        self.done = asyncio.Event()

    def wants(self, envelope: Envelope) -> bool:
        return ((self.user is None or envelope.user_id == self.user)
                and (not self.types or envelope.type in self.types)
                and (self.stream is None or envelope.stream == self.stream))

    def show(self, envelope: Envelope, position: int | None) -> None:
        if self.done.is_set() or not self.wants(envelope):
            return
        model = REGISTRY.get(envelope.type)
        record = {"position": position, "kind": model.kind if model else None,
                  **envelope.model_dump(mode="json")}
        if self.as_json:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
        else:
            self.console.print(_compact(record))
        self.printed += 1
        if self.limit is not None and self.printed >= self.limit:
            self.done.set()


def _compact(record: dict[str, Any]) -> str:
    moment = datetime.fromisoformat(record["occurred_at"]).astimezone(UTC)
    position = record["position"]
    fields = " ".join(
        f"{key}={_short(value)}" for key, value in record["payload"].items()
        if value not in (None, "", [], {})
    )
    who = f" user={record['user_id']}" if record["user_id"] else ""
    return (f"[dim]{'live' if position is None else position:>6} "
            f"{moment:%H:%M:%S}.{moment.microsecond // 1000:03d}[/] "
            f"[bold]{escape(record['type']):<22}[/] [cyan]{escape(record['stream'])}[/]"
            f"{escape(who)} {escape(fields)}")


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 40 else text[:37] + "..."


@events_app.command("tail")
def tail(
    user: str | None = typer.Option(None, "--user", help="only this user's messages"),
    types: Annotated[list[str] | None,
                     typer.Option("--type", help="only this type (repeatable)")] = None,
    stream: str | None = typer.Option(None, "--stream", help="only this stream"),
    from_start: bool = typer.Option(False, "--from-start", help="print the recorded history first"),
    follow: bool = typer.Option(True, "--follow/--no-follow", help="keep printing live messages"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="stop after N messages"),
    after: int | None = typer.Option(None, "--after", min=0,
                                     help="with --token: start after this log position"),
    token: str | None = typer.Option(None, "--token", envvar="RUNNER_TOKEN", help=TOKEN_HELP),
) -> None:
    """Print commands and events as they happen (and, with --from-start, the log before them)."""
    types = types or []
    unknown = [t for t in types if t not in REGISTRY]
    if unknown:
        fail(f"unknown message type {unknown[0]!r} (not in the catalogue)")
    if not from_start and not follow:
        return
    printer = _Printer(user=user, types=types, stream=stream, as_json=as_json, limit=limit)
    if token:
        start = 0 if from_start else after
        _run(_tail_gateway(Settings(), token, printer, after=start, follow=follow))
    else:
        _run(_tail(Settings(), printer, from_start=from_start, follow=follow))


async def _tail_gateway(settings: Settings, token: str, printer: _Printer, *,
                        after: int | None, follow: bool) -> None:
    """`tail` through the gateway's event stream (resumed by the client when it is cut)."""
    from runner_client import RunnerClient, RunnerError

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, printer.done.set)
    async with RunnerClient(_gateway_url(settings), token) as client:
        events = client.events(after=after, user_id=printer.user, types=sorted(printer.types),
                               follow=follow)

        async def show() -> None:
            async for event in events:
                printer.show(Envelope.model_validate(event.envelope), event.position)
                if printer.done.is_set():
                    return

        shown = asyncio.ensure_future(show())
        stop = asyncio.ensure_future(printer.done.wait())
        try:
            await asyncio.wait({shown, stop}, return_when=asyncio.FIRST_COMPLETED)
            if shown.done():
                shown.result()
        except RunnerError as exc:
            fail(str(exc))
        finally:
            for task in (shown, stop):
                task.cancel()
            await events.aclose()


async def _tail(settings: Settings, printer: _Printer, *, from_start: bool, follow: bool) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, printer.done.set)
    bus = await _connect(settings)
    live: asyncio.Queue[bytes] = asyncio.Queue()
    try:
        if follow:  # listen before reading history, so nothing falls between the two
            def on_live(body: bytes) -> None:
                live.put_nowait(body)

            await bus.watch(((COMMANDS_EXCHANGE, "#"), (EVENTS_EXCHANGE, "#")), on_live)
        recent: deque[str] = deque(maxlen=RECENT_IDS)
        if from_start:
            await _print_history(bus, printer, recent)
        if follow:
            await _print_live(live, printer, set(recent))
    finally:
        await bus.close()


async def _print_history(bus: Bus, printer: _Printer, recent: deque[str]) -> None:
    after = 0
    while not printer.done.is_set():
        try:
            rows = await bus.request(MONITOR_RPC, LogQuery(after=after, limit=HISTORY_PAGE))
        except (RpcError, QueryRefused) as exc:
            fail(f"monitor: {exc}")
        for row in rows:
            envelope = Envelope.model_validate(row["envelope"])
            recent.append(str(envelope.event_id))
            printer.show(envelope, row["position"])
            after = row["position"]
        if len(rows) < HISTORY_PAGE:
            return


async def _print_live(live: asyncio.Queue[bytes], printer: _Printer, seen: set[str]) -> None:
    stop = asyncio.ensure_future(printer.done.wait())
    try:
        while not printer.done.is_set():
            get = asyncio.ensure_future(live.get())
            await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return
            try:
                envelope = Envelope.from_json(get.result())
            except ValueError:
                continue  # not an envelope: the services dead-letter it, a viewer skips it
            if str(envelope.event_id) not in seen:
                printer.show(envelope, None)
    finally:
        stop.cancel()


# ---------------------------------------------------------------------------- replay / audit


def _log_url(database: str | None) -> str:
    if database is None:
        return Settings().own("monitor").database_for("monitor")
    return async_driver(database) if "://" in database else f"sqlite:///{database}"


async def _open_log(url: str) -> EventLog:
    try:
        event_log = EventLog.at(url, must_exist=True)
        await event_log.ensure_exists()
    except EventLogMissing as exc:
        fail(str(exc))
    except (OSError, SQLAlchemyError) as exc:
        fail(f"cannot open the event log: {type(exc).__name__}: {exc}")
    return event_log


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--until: not an ISO time: {value!r}")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


SHOWN_WORKERS = 100  # a long log holds thousands: a table of them all is too long to print


def replay_command(
    until_position: int | None = typer.Option(None, "--until-position", min=0,
                                              help="stop after this log position"),
    until: str | None = typer.Option(None, "--until",
                                     help="only events that occurred by this ISO time"),
    user: str | None = typer.Option(None, "--user", help="only this user's workers and stats"),
    as_json: bool = typer.Option(False, "--json", help="the status shape as JSON (every worker)"),
    limit: int = typer.Option(SHOWN_WORKERS, "--limit", min=0,
                              help="workers shown, the first in order of creation (0: all)"),
    database: str | None = typer.Option(None, "--database",
                                        help="log database URL or file [the monitor's]"),
    token: str | None = typer.Option(None, "--token", envvar="RUNNER_TOKEN", help=TOKEN_HELP),
) -> None:
    """Rebuild the projections from the log (at any point) and print queue stats and workers."""
    until_time = _parse_time(until)
    if token:
        result = _run(_replay_gateway(Settings(), token, until_position, until_time, user))
    else:
        result = _run(_replay(_log_url(database), until_position, until_time, user))
    if as_json:
        typer.echo(json.dumps(result))
    else:
        _print_status(result, limit or None)


async def _replay(url: str, until_position: int | None, until_time: datetime | None,
                  user: str | None) -> dict[str, Any]:
    event_log = await _open_log(url)
    try:
        folded = await replay(event_log, until_position=until_position, until_time=until_time)
    finally:
        await event_log.close()
    return {"position": folded.position, **views.status(folded.state, user)}


async def _replay_gateway(settings: Settings, token: str, until_position: int | None,
                          until_time: datetime | None, user: str | None) -> dict[str, Any]:
    """`replay` of the events the token may see (a user's own), read from the gateway's event
    stream up to the present and folded here, with the monitor's own fold."""
    from runner_client import RunnerClient, RunnerError

    folded = Folded()
    batch: list[Envelope] = []
    async with RunnerClient(_gateway_url(settings), token) as client:
        try:
            async for event in client.events(after=0, user_id=user, follow=False):
                if until_position is not None and event.position > until_position:
                    break
                envelope = Envelope.model_validate(event.envelope)
                if until_time is None or envelope.occurred_at <= until_time:
                    batch.append(envelope)
                if len(batch) >= 1000:
                    folded.fold(batch, event.position)
                    batch = []
                folded.position = event.position
        except RunnerError as exc:
            fail(str(exc))
    folded.fold(batch, folded.position)
    return {"position": folded.position, **views.status(folded.state, user)}


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("-" if v is None else escape(str(v)) for v in row))
    return table


def _print_status(result: dict[str, Any], limit: int | None) -> None:
    # piped output is not cut to 80 columns: ids must stay whole for grep and the next command
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    stats = result["queueStats"]
    console.print(_table(f"Queue at position {result['position']}",
                         ("queued", "running", "total", "failed"),
                         [(stats["queuedJobs"], stats["runningWorkers"],
                           stats["totalWorkers"], stats["failedJobs"])]))
    every = result["workers"]
    entries = every[:limit]
    hidden = len(every) - len(entries)
    title = f"Workers: the first {len(entries)} of {len(every)}" if hidden else "Workers"
    console.print(_table(title, ("worker", "user", "strategy", "broker", "status", "host",
                                 "pid", "restarts", "started", "reason"),
                         [(w["workerId"], w["userId"], w["strategyId"], w["brokerId"], w["status"],
                           w["hostId"], w["pid"], w["restartCount"], _when(w["startedAt"]),
                           w["reason"]) for e in entries for w in [e["worker"]]]))
    positions = [(e["worker"]["workerId"], p["instrumentName"], p["side"], p["amount"],
                  p["entryPrice"]) for e in entries for p in e["positions"]]
    if positions:
        console.print(_table("Positions", ("worker", "instrument", "side", "amount", "entry"),
                             positions))
    traded = [(e["worker"]["workerId"], s["totalTrades"], s["winningTrades"], s["losingTrades"],
               f"{s['totalPnL']:.2f}", f"{s['winRate']:.2f}%")
              for e in entries for s in [e["stats"]] if s["totalTrades"]]
    if traded:
        console.print(_table("Trading", ("worker", "trades", "won", "lost", "P&L", "win rate"),
                             traded))
    if hidden:
        console.print(f"{hidden} more workers not shown: --limit 0 shows all, --user one "
                      "user's, --json every worker as JSON")


@audit_app.command("verify")
def verify(
    database: str | None = typer.Option(None, "--database",
                                        help="log database URL or file [the monitor's]"),
) -> None:
    """Walk the log's hash chain; exit 1 naming the first row that breaks it."""
    count, head, broken = _run(_verify(_log_url(database)))
    if broken is not None:
        fail(str(broken))
    typer.echo(f"ok: {count} events, chain intact, head {head[:16]}")


async def _verify(url: str) -> tuple[int, str, Any]:
    event_log = await _open_log(url)
    try:
        head = await event_log.head()
        broken = await event_log.verify(until_position=head.position)
    finally:
        await event_log.close()
    return head.position, head.hash, broken
