"""Request ids: the ``x-request-id`` of every answer and the usage row's key of a billed call."""

from __future__ import annotations

from random import getrandbits
from time import time


def new_request_id() -> str:
    """``req_`` + 32 hex characters; a billed call's usage row and ``x-request-id`` carry it.

    The first 12 hex digits are the Unix time in milliseconds, the other 20 are 80 random bits
    (the layout of a UUIDv7): ids sort by creation time, so Postgres appends them at the right
    edge of the unique indexes on ``usage_events.request_id`` and ``ledger_entries``'s
    idempotency key instead of writing into random pages (faster batches, and fewer pages
    rewritten whole after each checkpoint). The random bits come from ``random`` (seeded from
    the OS at start-up and again in every forked child), without a ``getrandom`` system call
    per request. An id is a label, never a secret.
    """
    return f"req_{int(time() * 1000):012x}{getrandbits(80):020x}"
