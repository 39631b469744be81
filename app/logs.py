"""Log output: plain lines by default, one JSON object per line with CAPSULE_LOG_FORMAT=json.

A leaf: the CLI sets it up for `capsule serve` and `capsule agent` alike, and uvicorn's own loggers
(its access log included) write through the same handler and format.

Events that matter carry their fields as `extra` (event, capsule, tag, pid, outcome, host, ...):
the plain format has them in its message, the JSON format as fields of their own too.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

FORMATS = ("plain", "json")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The attributes every LogRecord has; anything else on a record came in through `extra`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the extra fields, and exc where raised."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


def formatter(kind: str) -> logging.Formatter:
    """The formatter of a log format: plain or json."""
    return JsonFormatter() if kind == "json" else logging.Formatter(PLAIN_FORMAT)


def configure(*, kind: str = "plain", level: str | int = "INFO") -> None:
    """Sends every log record, uvicorn's too, to stderr in one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's loggers go through the root's handler, not handlers of their own.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's log_config: keep the loggers configure() set up (the root's handler), at the root's
    level: --log-level WARNING silences the access log too, and no record is made to be dropped."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            name: {"level": level, "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
