"""Control events: tell every running gateway and admin process that operators changed
something, so it takes effect within seconds instead of at the next restart.

An event is a PostgreSQL ``NOTIFY`` on ``CONTROL_CHANNEL``, sent **inside the transaction
that makes the change**: PostgreSQL delivers it only when that transaction commits, so no
process re-reads before the change is visible, and a rolled-back change notifies nobody.
Each process listens on a connection of its own (``runtime.control``) and re-reads what the
event names; a periodic re-read is the safety net for events missed while that connection
was down.

Payload: compact JSON ``{"kind": KIND, ...}`` with optional ``account_id`` / ``api_key_id``.
"""

from __future__ import annotations

import enum

import asyncpg
import orjson

CONTROL_CHANNEL = "creditgate_control"


class ControlKind(enum.StrEnum):
    """What changed, and so what a process re-reads."""

    FLAGS = "flags"
    """A live flag (``billing.live_flags``): re-read the flags."""
    KEYS = "keys"
    """An API key was revoked, expired or had its spend controls changed: drop cached keys."""
    ACCOUNTS = "accounts"
    """An account was suspended, reactivated or had its spend controls changed: drop cached
    keys (an identity carries its account's status and controls)."""
    RATE_CARDS = "rate_cards"
    """A rate card was published: reload the rate card book."""
    PACKAGES = "packages"
    """A package was created, edited, activated or deactivated."""


async def notify_control(
    conn: asyncpg.Connection,
    kind: ControlKind,
    *,
    account_id: int | None = None,
    api_key_id: int | None = None,
) -> None:
    """Queue a control event on ``conn``'s transaction (delivered at its commit; outside a
    transaction, at once).

    Raises:
        asyncpg.PostgresError: as any statement on ``conn``.
    """
    event: dict[str, object] = {"kind": kind.value}
    if account_id is not None:
        event["account_id"] = account_id
    if api_key_id is not None:
        event["api_key_id"] = api_key_id
    await conn.execute("SELECT pg_notify($1, $2)", CONTROL_CHANNEL, orjson.dumps(event).decode())
