"""``creditgate admin``: the admin API's tokens from the command line (the first one is
created here).

    creditgate admin create-token --role viewer|operator|admin [--name N] [--expires-in-days D]
    creditgate admin tokens
    creditgate admin revoke-token ID

Each command prints one JSON document, as every ``creditgate`` command (``creditgate.cli``);
they read only DATABASE_URL. Only a token's SHA-256 digest is stored (``billing.admin_tokens``).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from billing import admin_tokens
from billing.audit import CLI_ACTOR
from runtime.settings import StoreSettings


def _token_doc(record: admin_tokens.AdminTokenRecord) -> dict[str, Any]:
    def when(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "id": record.id,
        "name": record.name,
        "role": record.role.value,
        "tokenPrefix": record.token_prefix,
        "createdAt": when(record.created_at),
        "createdByTokenId": record.created_by_token_id,
        "expiresAt": when(record.expires_at),
        "revokedAt": when(record.revoked_at),
        "lastUsedAt": when(record.last_used_at),
    }


async def cmd_admin_create_token(
    settings: StoreSettings, args: argparse.Namespace
) -> dict[str, Any]:
    """Create an admin API token (audited as ``cli``); the document carries the token once."""
    expires_at = None
    if args.expires_in_days is not None:
        expires_at = datetime.now(UTC) + timedelta(days=args.expires_in_days)
    conn = await asyncpg.connect(settings.database_url)
    try:
        token, record = await admin_tokens.create_admin_token(
            conn,
            CLI_ACTOR,
            role=admin_tokens.Role(args.role),
            name=args.name,
            expires_at=expires_at,
        )
    finally:
        await conn.close()
    return {
        **_token_doc(record),
        "token": token,
        "note": "The token is shown once; only its SHA-256 digest is stored.",
    }


async def cmd_admin_tokens(settings: StoreSettings, args: argparse.Namespace) -> dict[str, Any]:
    """Every admin token, newest first (prefixes only, never a token)."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        records = await admin_tokens.list_admin_tokens(conn, limit=10_000)
    finally:
        await conn.close()
    return {"tokens": [_token_doc(record) for record in records]}


async def cmd_admin_revoke_token(
    settings: StoreSettings, args: argparse.Namespace
) -> dict[str, Any]:
    """Revoke an admin token now (audited as ``cli``)."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        record = await admin_tokens.revoke_admin_token(conn, CLI_ACTOR, args.id)
    finally:
        await conn.close()
    return _token_doc(record)


def _positive_days(text: str) -> float:
    days = float(text)
    if not days > 0:
        raise argparse.ArgumentTypeError("must be a number of days > 0")
    return days


def add_admin_parser(sub: Any) -> None:
    """The ``admin`` command and its ``create-token``, ``tokens`` and ``revoke-token``
    subcommands, on ``sub`` (the ``creditgate`` parser's subparsers)."""
    admin = sub.add_parser(
        "admin", help="admin API tokens: create (the first one), list, revoke"
    ).add_subparsers(dest="action", required=True)
    creating = (
        "Create an admin API token and print it once, as JSON (only its SHA-256 digest is "
        "stored). Audited as actor cli."
    )
    create = admin.add_parser("create-token", help=creating, description=creating)
    create.add_argument("--role", required=True, choices=[role.value for role in admin_tokens.Role])
    create.add_argument("--name", default="")
    create.add_argument("--expires-in-days", type=_positive_days, default=None)
    create.set_defaults(fn=cmd_admin_create_token, config=StoreSettings.from_env)
    admin.add_parser("tokens", help="list admin tokens, newest first").set_defaults(
        fn=cmd_admin_tokens, config=StoreSettings.from_env
    )
    revoke = admin.add_parser("revoke-token", help="revoke an admin token now (audited)")
    revoke.add_argument("id", type=int)
    revoke.set_defaults(fn=cmd_admin_revoke_token, config=StoreSettings.from_env)
