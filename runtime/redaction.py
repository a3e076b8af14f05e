"""Secrets kept out of logs and error bodies: key-shaped strings are replaced before either.

Redacted, whatever surrounds them (a header echoed by aiohttp's parser, a URL path, a
traceback): our API keys (``cg_live_...``), admin tokens (``cg_admin_...``), OpenAI keys
(``sk-...``), Stripe secrets (``whsec_...``, ``sk_live_``/``sk_test_``, ``rk_live_``/``rk_test_``)
and the credential after ``Bearer``. Each keeps its prefix, so a log still says which kind of
secret arrived: ``Bearer cg_live_AAAA`` becomes ``Bearer [REDACTED]``, a bare
``cg_live_AAAA`` becomes ``cg_live_[REDACTED]``.

``redact`` is applied by ``runtime.errors.error_body`` (every error answer) and by
``RedactingFilter``, which ``creditgate serve`` installs on the root logger's handlers
(``install_redacting_filter``) so that records propagated from every logger, aiohttp's
included, pass through it.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[REDACTED]"

# A secret is matched wherever it starts, even glued to a word or after a control character
# that aiohttp's parser echoed escaped ("\\t", "\\x00": a letter or digit then precedes it),
# and runs over its alphabet. ``sk-`` needs 20 characters after it (OpenAI keys have more), so
# "task-list" stays. After ``Bearer`` and white space (or an escaped tab), anything up to white
# space or a quote is a credential.
_SECRET = re.compile(
    r"(?P<prefix>cg_live_|cg_admin_|whsec_|sk_live_|sk_test_|rk_live_|rk_test_)[A-Za-z0-9_-]+"
    r"|(?P<openai>sk-)[A-Za-z0-9_-]{20,}"
    r"|(?P<scheme>(?i:bearer)(?:[ \t]|\\t)+)[^\s'\"]+"
)


def _replacement(match: re.Match[str]) -> str:
    return (match.group("prefix") or match.group("openai") or match.group("scheme")) + REDACTED


def redact(text: str) -> str:
    """``text`` with every key-shaped string replaced by its prefix and ``[REDACTED]``."""
    return _SECRET.sub(_replacement, text)


class RedactingFilter(logging.Filter):
    """Redacts a record's message, traceback and stack before any handler formats it.

    The message is formatted here (``getMessage``) and stored without its arguments when it
    held a secret; the traceback is formatted once (as ``logging.Formatter`` would) into
    ``exc_text``, which formatters print instead of formatting ``exc_info`` again.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg = redacted
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_redacting_filter(logger: logging.Logger | None = None) -> None:
    """Add one ``RedactingFilter`` to each handler of ``logger`` (default: the root logger).

    A handler's filters see every record it emits, those propagated from child loggers too
    (a logger's own filters would not). Installing twice adds nothing.
    """
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
