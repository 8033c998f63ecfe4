"""Log lines of every process: plain text, or one JSON object per line (`RUNNER_LOG_FORMAT=json`)
at `RUNNER_LOG_LEVEL`, each carrying the job or worker it is about (`correlation`), set by
whoever handles a message about one; a worker process sets its own at start."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

correlation: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "runner_correlation", default=None)

# The AMQP client logs every failed reconnect attempt, with tracebacks; the bus itself says when
# the connection goes and when it is back (services.bus), so these speak only at DEBUG.
QUIET_LIBRARIES = ("aiormq", "aio_pika")


class CorrelationFilter(logging.Filter):
    """Puts the current correlation id (the job or worker) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = correlation.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, service, logger, message, correlation_id,
    and the exception's text when there is one."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", None),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(service: str = "", *, format: str = "text", level: str | int = "INFO") -> None:
    """Log to stderr in `format` ("text" or "json") from `level` on."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CorrelationFilter())
    if format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        prefix = f"[{service}] " if service else ""
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    debugging = root.level <= logging.DEBUG
    for noisy in QUIET_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.DEBUG if debugging else logging.CRITICAL)
