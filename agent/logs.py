"""JSON-lines logging on stderr: one object per record, `extra=` fields rendered as keys.

Why: log shippers in a cluster parse JSON; everyone in the code base logs with
`logging.getLogger(__name__).info("what happened", extra={"key": value})` and this formatter turns
the extra attributes into fields, so no module needs to know about the output format.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON line: time, level, logger, msg, source, extras, error."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "source": f"{record.module}:{record.lineno}",
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in entry:
                entry[key] = _jsonable(value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["error"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Route the root logger to `stream` (stderr) as JSON lines at `level`; returns the handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(level)  # a logger set lower than the root must not print more
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_spegla", False):
            root.removeHandler(old)
    handler._spegla = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # Chatty libraries stay at WARNING unless we debug.
    quiet = logging.WARNING if level != "DEBUG" else logging.DEBUG
    for name in ("hypercorn.access", "urllib3", "kubernetes", "quart.serving"):
        logging.getLogger(name).setLevel(quiet)
    # HTTP/2 framing libraries (the containerd gRPC client) write hundreds of lines per pull at
    # DEBUG: always capped.
    for name in ("hpack", "h2", "grpclib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The per-request access lines: exactly the configured level, even when the agent opens the
    # `registry` loggers to DEBUG for the debug page (so at INFO they cost one level check).
    logging.getLogger("registry.access").setLevel(level)
    return handler
