"""The audit log: who changed what, written in the same transaction as the change.

Every mutating admin API call and CLI command writes one ``audit_log`` row through
``record_audit``, on the connection (and inside the transaction) that makes the change, so a
change without its audit row, or an audit row without its change, cannot commit. The table
is append-only (a trigger refuses UPDATE, DELETE and TRUNCATE for every role; the
application's role has only SELECT and INSERT on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: an admin token (``kind="token"``, its id and name) or the CLI.

    Attributes:
        kind: ``"token"`` or ``"cli"``.
        name: the token's name, or ``"cli"``.
        token_id: the admin token's id; None for the CLI.
        request_id: the admin API request's ``x-request-id``; None for the CLI.
        client_address: the caller's address as the service saw it; None for the CLI.
    """

    kind: str
    name: str
    token_id: int | None = None
    request_id: str | None = None
    client_address: str | None = None


CLI_ACTOR = Actor(kind="cli", name="cli")


def _json(value: Any) -> str | None:
    # default=str: datetimes, Decimals and enums as their text; bigint amounts stay integers.
    return None if value is None else orjson.dumps(value, default=str).decode()


async def record_audit(
    conn: asyncpg.Connection,
    actor: Actor,
    *,
    action: str,
    target_type: str,
    target_id: str | int | None,
    before: Any = None,
    after: Any = None,
) -> int:
    """Append one audit row on ``conn`` (call it inside the change's transaction).

    Args:
        action: dotted verb, e.g. ``"account.suspend"``, ``"key.revoke"``, ``"flag.set"``.
        target_type: ``"account"``, ``"api_key"``, ``"rate_card"``, ``"package"``,
            ``"flag"``, ``"admin_token"``, ``"ledger_entry"``.
        before, after: JSON-able snapshots of the target (None where there is none).

    Returns:
        The audit row's id.

    Raises:
        asyncpg.PostgresError: as any statement on ``conn`` (the change rolls back with it).
    """
    return int(
        await conn.fetchval(
            """INSERT INTO audit_log (actor_kind, actor_token_id, actor_name, action,
                   target_type, target_id, before, after, request_id, client_address)
               VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9, $10)
               RETURNING id""",
            actor.kind,
            actor.token_id,
            actor.name,
            action,
            target_type,
            None if target_id is None else str(target_id),
            _json(before),
            _json(after),
            actor.request_id,
            actor.client_address,
        )
    )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One ``audit_log`` row; ``before`` and ``after`` decoded from JSON."""

    id: int
    at: datetime
    actor_kind: str
    actor_token_id: int | None
    actor_name: str
    action: str
    target_type: str
    target_id: str | None
    before: Any
    after: Any
    request_id: str | None
    client_address: str | None


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What ``list_audit_entries`` selects; None selects everything."""

    actor_token_id: int | None = None
    action: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


async def list_audit_entries(
    conn: asyncpg.Connection | asyncpg.Pool,
    where: AuditFilter,
    *,
    limit: int,
    before_id: int | None = None,
) -> list[AuditEntry]:
    """Audit rows newest first, at most ``limit``, with an id below ``before_id`` (keyset
    pagination); ``since`` inclusive, ``until`` exclusive.

    Raises:
        asyncpg.PostgresError / OSError: Postgres unreachable.
    """
    rows = await conn.fetch(
        """SELECT id, at, actor_kind, actor_token_id, actor_name, action, target_type,
                  target_id, before, after, request_id, client_address
           FROM audit_log
           WHERE ($1::bigint IS NULL OR id < $1)
             AND ($2::bigint IS NULL OR actor_token_id = $2)
             AND ($3::text IS NULL OR action = $3)
             AND ($4::text IS NULL OR target_type = $4)
             AND ($5::text IS NULL OR target_id = $5)
             AND ($6::timestamptz IS NULL OR at >= $6)
             AND ($7::timestamptz IS NULL OR at < $7)
           ORDER BY id DESC LIMIT $8""",
        before_id,
        where.actor_token_id,
        where.action,
        where.target_type,
        where.target_id,
        where.since,
        where.until,
        limit,
    )
    return [
        AuditEntry(
            **{
                **dict(row),
                "before": _decoded(row["before"]),
                "after": _decoded(row["after"]),
            }
        )
        for row in rows
    ]


def _decoded(value: str | None) -> Any:
    return None if value is None else orjson.loads(value)
