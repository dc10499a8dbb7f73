"""Log lines on stderr: ``text`` for people, ``json`` (one object a line) for log pipelines.

A JSON line carries ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``msg``,
``exc`` (the traceback, when there is one), every ``extra=`` field of the call,
and the ``trace_id`` / ``span_id`` of the current OpenTelemetry span when one is
valid. OpenTelemetry is optional: without the package the ids are simply absent.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_CORE_FIELDS = ("ts", "level", "logger", "msg", "exc")


def _current_span_ids() -> Callable[[], tuple[str, str] | None] | None:
    """A function giving (trace_id, span_id) of the current span, or None; None when OpenTelemetry is absent."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None

    def ids() -> tuple[str, str] | None:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return format(context.trace_id, "032x"), format(context.span_id, "016x")

    return ids


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values JSON cannot carry are written as their ``str()``."""

    def __init__(self) -> None:
        super().__init__()
        self._span_ids = _current_span_ids()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS:
                # An extra named like a core field keeps its value under another name instead of replacing it.
                line["extra_" + key if key in _CORE_FIELDS else key] = value
        if self._span_ids is not None and "trace_id" not in line:
            ids = self._span_ids()
            if ids is not None:
                line["trace_id"], line["span_id"] = ids
        try:
            return json.dumps(line, default=str, allow_nan=False)
        except Exception:
            # A circular structure, a NaN or a str() that raises: that field is written as its repr.
            return json.dumps({key: _plain(value) for key, value in line.items()}, default=str)


def _plain(value: Any) -> Any:
    """``value`` when JSON can carry it, else its repr (or a placeholder when even that raises)."""
    try:
        json.dumps(value, default=str, allow_nan=False)
        return value
    except Exception:
        pass
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def stderr_handler(log_format: str) -> logging.Handler:
    """A stderr handler with the ``log_format`` setting's formatter: ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler
