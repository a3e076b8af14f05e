"""One JSON object per log line on stderr, for ``creditgate serve`` and the CLI.

Every line has ``time`` (RFC 3339, UTC), ``level``, ``logger`` and ``message``, plus the fields
the call passes in ``extra=`` (the access line's ``requestId``, ``accountId``, ...; a money
event's ``event``), and ``exc_info`` with the traceback when there is one. Formatted by
python-json-logger's orjson formatter.

Secrets stay out: ``runtime.redaction.RedactingFilter`` runs on the handler (message,
traceback, stack), and a traceback the formatter renders itself is redacted too. The fields
of ``extra=`` are written as given: callers pass ids, counts and amounts, never a key, a
webhook secret, a payload body or a prompt.

The access log (one line per billed request) does not go through ``logging``: a record,
python-json-logger's formatting and one write per line cost about 40 µs of the gateway's
~230 µs per request (docs/benchmarks.md, issue 14). ``BufferedJsonLines`` writes the same
shape of line, serialized by orjson and written in batches, for about 3 µs.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO

import orjson
from pythonjsonlogger.orjson import OrjsonFormatter

from runtime.redaction import RedactingFilter, redact

#: The longest a buffered line waits before it is written (seconds).
LINE_FLUSH_AFTER_S = 0.2
#: Buffered bytes that are written at once, without waiting.
LINE_FLUSH_BYTES = 64 * 1024

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
    global _stream
    flush_buffered_lines()
    _stream = handler.stream
    _buffers.clear()


class BufferedJsonLines:
    """INFO lines of one logger, in ``JsonFormatter``'s shape (``time``, ``level``,
    ``logger``, ``message`` and the fields), serialized with orjson and written to the log
    stream in batches: at most ``LINE_FLUSH_AFTER_S`` after the first line of a batch (a
    timer on the running event loop; at once without one), as soon as ``LINE_FLUSH_BYTES``
    are waiting, and at ``flush_buffered_lines()`` (shutdown, and at exit).

    As with ``extra=`` fields, what is written is what the caller passed: ids, counts,
    amounts and bounded names (a key only as its visible prefix), never a secret.
    """

    __slots__ = ("_level_of", "_lines", "_logger", "_size", "_stream", "_timer")

    def __init__(self, logger: str, stream: TextIO) -> None:
        self._logger = logger
        # The Logger itself, kept: ``logging.getLogger`` takes the logging module's lock on
        # every call, ~2 µs a request in the gateway (py-spy, docs/benchmarks.md).
        self._level_of = logging.getLogger(logger)
        self._stream = stream
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        """The logger is enabled for INFO (its level, or ``logging.disable``, may turn the
        lines off at any time)."""
        return self._level_of.isEnabledFor(logging.INFO)

    def write(self, message: str, fields: Mapping[str, object]) -> None:
        """Buffer one line: ``message`` and ``fields`` (JSON-serializable by orjson)."""
        line = orjson.dumps(
            {
                "time": datetime.now(UTC),
                "level": "INFO",
                "logger": self._logger,
                "message": message,
                **fields,
            }
        )
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= LINE_FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
            else:
                self._timer = loop.call_later(LINE_FLUSH_AFTER_S, self.flush)

    def flush(self) -> None:
        """Write every buffered line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        batch = b"\n".join(self._lines).decode() + "\n"
        self._lines.clear()
        self._size = 0
        self._stream.write(batch)
        self._stream.flush()


_stream: TextIO | None = None
_buffers: dict[str, BufferedJsonLines] = {}


def buffered_lines(logger: str) -> BufferedJsonLines | None:
    """The buffered INFO lines of ``logger``, or None when nothing should be written: JSON
    logging is not installed (``install_json_logging``) or ``logger`` is not enabled for
    INFO (``logging.getLogger(logger).setLevel(logging.WARNING)`` turns its lines off)."""
    buffer = _buffers.get(logger)
    if buffer is None:
        if _stream is None:
            return None
        buffer = _buffers[logger] = BufferedJsonLines(logger, _stream)
    return buffer if buffer.enabled else None


def flush_buffered_lines() -> None:
    """Write every buffered line of every logger now (at shutdown; also run at exit)."""
    for buffer in _buffers.values():
        buffer.flush()


atexit.register(flush_buffered_lines)
