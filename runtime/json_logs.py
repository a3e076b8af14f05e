"""One JSON object per log line on stderr, for ``creditgate serve`` and the CLI.

Every line has ``time`` (RFC 3339, UTC), ``level``, ``logger`` and ``message``, plus the fields
the call passes in ``extra=`` (the access line's ``requestId``, ``accountId``, ...; a money
event's ``event``), and ``exc_info`` with the traceback when there is one. Formatted by
python-json-logger's orjson formatter.

Secrets stay out: ``runtime.redaction.RedactingFilter`` runs on the handler (message,
traceback, stack), and a traceback the formatter renders itself is redacted too. The fields
of ``extra=`` are written as given: callers pass ids, counts and amounts, never a key, a
webhook secret, a payload body or a prompt.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import TextIO

from pythonjsonlogger.orjson import OrjsonFormatter

from runtime.redaction import RedactingFilter, redact

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


class JsonFormatter(OrjsonFormatter):
    """python-json-logger's orjson formatter with our field names and redacted tracebacks."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
        )

    def formatException(self, ei: _ExcInfo) -> str | list[str]:  # type: ignore[override]
        """The traceback, with key-shaped strings redacted."""
        formatted = super().formatException(ei)
        if isinstance(formatted, str):
            return redact(formatted)
        return [redact(line) for line in formatted]


def install_json_logging(
    level: int = logging.INFO, stream: TextIO | None = None, *, force: bool = False
) -> None:
    """Make the root logger write JSON lines to ``stream`` (default: stderr) at ``level``,
    through one handler with the ``RedactingFilter`` and a ``JsonFormatter``.

    As ``logging.basicConfig``: nothing happens when the root logger has handlers already
    (an embedding program, or pytest, configured logging), unless ``force``, which replaces
    them.
    """
    root = logging.getLogger()
    if root.handlers and not force:
        return
    for old in root.handlers[:]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level)
