"""Portal links: short-lived, single-use URLs that sign a user in to the Credits page.

Both services make them (the admin API for an operator, the gateway for a user's own key);
the gateway consumes them: ``GET /credits/portal/{token}`` only shows a confirmation page
(``peek``), its ``POST`` uses the link up and signs in (so an attacker's link followed by a
victim's browser cannot silently sign it in to the attacker's account: login CSRF).

Redis holds, per link, only the SHA-256 digest of its token under
``cg:v1:portal_link:<hex digest>``, with a TTL of ``PORTAL_LINK_TTL_S``; the value is JSON
``{"accountId", "apiKeyId", "returnTo"}``. The token itself is never stored: a Redis dump
cannot open a session. ``consume`` reads and deletes the key in one command (``GETDEL``), so
two concurrent opens of one link cannot both win: single use.

``session_holder`` / ``session_holder_status`` is the check every session-authenticated
billing request (and every link opened) makes: the account still exists and the key that
signed the session in (if any) is still active.

Redis unreachable: ``redis.exceptions.ConnectionError`` / ``TimeoutError`` propagate (the
services answer 503). Postgres unreachable: ``POSTGRES_UNAVAILABLE`` propagates.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

#: Where an opened link is answered (``PUBLIC_BASE_URL`` + this + ``/<token>``).
PORTAL_PATH = "/credits/portal"

_KEY_PREFIX = "cg:v1:portal_link:"
_MAX_TOKEN_CHARS = 128  # ours are 43 characters: no digest of a huge path is computed


@dataclass(frozen=True, slots=True)
class PortalLink:
    """A link just made: give ``url`` to the user once; it is not kept anywhere.

    Attributes:
        url: ``<PUBLIC_BASE_URL>/credits/portal/<token>``.
        expires_at: when Redis forgets it (``PORTAL_LINK_TTL_S`` after creation).
        return_to: where the opened link redirects (a validated path or URL), None for
            ``/credits``.
    """

    url: str
    expires_at: datetime
    return_to: str | None


def portal_link_document(link: PortalLink) -> dict[str, Any]:
    """The answer both services give for a new link: ``{"object": "billing_portal.session",
    "url", "expiresAt": ISO 8601, "returnTo": str | None}``."""
    return {
        "object": "billing_portal.session",
        "url": link.url,
        "expiresAt": link.expires_at.isoformat(),
        "returnTo": link.return_to,
    }


@dataclass(frozen=True, slots=True)
class LinkGrant:
    """What an opened link grants: a session for ``account_id`` (signed in by
    ``api_key_id``, None for an operator's link), then a redirect to ``return_to``."""

    account_id: int
    api_key_id: int | None
    return_to: str | None


def _key(token: str) -> str:
    return _KEY_PREFIX + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


async def create_portal_link(
    client: aioredis.Redis,
    *,
    account_id: int,
    api_key_id: int | None,
    return_to: str | None,
    public_base_url: str,
    ttl_s: int,
) -> PortalLink:
    """Make a single-use link for ``account_id`` that expires after ``ttl_s`` seconds.

    The token is ``secrets.token_urlsafe(32)`` (256 bits); only its digest is stored.

    Raises:
        redis.exceptions.ConnectionError, TimeoutError: Redis unreachable (no link made).
    """
    token = secrets.token_urlsafe(32)
    value = orjson.dumps({"accountId": account_id, "apiKeyId": api_key_id, "returnTo": return_to})
    expires_at = datetime.now(UTC) + timedelta(seconds=ttl_s)
    await client.set(_key(token), value, ex=ttl_s)
    return PortalLink(f"{public_base_url}{PORTAL_PATH}/{token}", expires_at, return_to)


async def peek_portal_link(client: aioredis.Redis, token: str) -> LinkGrant | None:
    """What a link would grant, without using it up (the confirmation page's ``GET``); None
    when the token is unknown, expired or already used.

    Raises:
        redis.exceptions.ConnectionError, TimeoutError: Redis unreachable.
    """
    if len(token) > _MAX_TOKEN_CHARS:
        return None
    return _grant(await client.get(_key(token)))


async def consume_portal_link(client: aioredis.Redis, token: str) -> LinkGrant | None:
    """Use a link up: its grant, deleted in the same command; None when the token is
    unknown, expired or already used (the same answer for all three).

    Raises:
        redis.exceptions.ConnectionError, TimeoutError: Redis unreachable (the link stays
            usable if it was not consumed).
    """
    if len(token) > _MAX_TOKEN_CHARS:
        return None
    return _grant(await client.getdel(_key(token)))


def _grant(raw: bytes | str | None) -> LinkGrant | None:
    if raw is None:
        return None
    value = orjson.loads(raw)
    return LinkGrant(value["accountId"], value["apiKeyId"], value["returnTo"])


@dataclass(frozen=True, slots=True)
class SessionHolder:
    """The account a still-valid session (or link) is for: its ``status`` (``"active"`` or
    ``"suspended"``) and ``email`` (the portal link's confirmation page names it)."""

    status: str
    email: str


async def session_holder_status(
    pool: asyncpg.Pool | asyncpg.Connection, account_id: int, api_key_id: int | None
) -> str | None:
    """The account's status (``"active"`` or ``"suspended"``) when a billing session for it
    is still valid (``session_holder``); None otherwise (the session counts as signed out).

    Raises:
        OSError / asyncpg.PostgresError: Postgres unreachable.
    """
    holder = await session_holder(pool, account_id, api_key_id)
    return None if holder is None else holder.status


async def session_holder(
    pool: asyncpg.Pool | asyncpg.Connection, account_id: int, api_key_id: int | None
) -> SessionHolder | None:
    """The account when a billing session for it is still valid: the account exists and
    ``api_key_id`` (when not None) is its key, not revoked, not expired. None otherwise.
    One query.

    Raises:
        OSError / asyncpg.PostgresError: Postgres unreachable.
    """
    row = await pool.fetchrow(
        """SELECT a.status, a.email FROM accounts a
           WHERE a.id = $1
             AND ($2::bigint IS NULL OR EXISTS (
                   SELECT 1 FROM api_keys k
                   WHERE k.id = $2 AND k.account_id = a.id AND k.revoked_at IS NULL
                     AND (k.expires_at IS NULL OR k.expires_at > now())))""",
        account_id,
        api_key_id,
    )
    return None if row is None else SessionHolder(row["status"], row["email"])
