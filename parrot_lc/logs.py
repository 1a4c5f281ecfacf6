"""Log records as text or JSON lines, each with the id of the HTTP request it happened in (if any)."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import datetime, timezone

# Set for each HTTP request by the server; tasks started while serving it (the calls of a graph) inherit it.
request_id: ContextVar[str | None] = ContextVar("parrot_request_id", default=None)

# Attributes every LogRecord has: anything else on a record came from `extra=` and goes into the JSON line.
# (uvicorn's color_message is its message again, with terminal colours.)
_STANDARD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Gives each record the `request_id` of the request being served (or the one it already carries)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id, the record's extra fields, and the
    exception's traceback if there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRIBUTES}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_handler(log_format: str) -> logging.Handler:
    """A handler to stderr that writes `text` or `json` lines, each with its request id."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Sends every record of the process (ours, uvicorn's) through one handler of `log_format`."""
    root = logging.getLogger()
    root.handlers[:] = [log_handler(log_format)]
    root.setLevel(level)
    # httpx logs every request at INFO: a remote engine's heartbeats would fill the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
