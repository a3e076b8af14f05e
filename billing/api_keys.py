"""API keys: generated once, shown once, stored only as SHA-256 digests.

Format: ``cg_live_`` + 43 URL-safe base64 characters (32 random bytes), so secret scanners can
match the fixed prefix. The first 12 characters are kept as a visible ``key_prefix``. A string
of any other shape (other characters, non-ASCII, undecodable bytes, another length) is simply
not a key: ``find_active_key`` answers None for it without a query.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from billing.spend_controls import SpendControls, limits_from_row

KEY_PREFIX = "cg_live_"


class SecretFormat:
    """A bearer secret's shape: a fixed prefix and 43 URL-safe base64 characters (32 random
    bytes, ASCII only). API keys (``cg_live_``) and admin tokens (``cg_admin_``,
    ``billing.admin_tokens``) share it; only the SHA-256 digest (``key_digest``) is stored.

    Attributes:
        prefix: the fixed prefix secret scanners match.
        visible_chars: how many leading characters are kept as the visible prefix (the fixed
            prefix and 4 random characters).
    """

    __slots__ = ("_shape", "prefix", "visible_chars")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.visible_chars = len(prefix) + 4
        self._shape = re.compile(re.escape(prefix) + r"[A-Za-z0-9_-]{43}")

    def generate(self) -> str:
        """A new random secret: the prefix and 43 url-safe characters (256 bits)."""
        return self.prefix + secrets.token_urlsafe(32)

    def is_shaped(self, secret: str) -> bool:
        """Whether ``secret`` has the shape ``generate`` makes (ASCII, right length)."""
        return self._shape.fullmatch(secret) is not None

    def visible_prefix(self, secret: str) -> str:
        """The part of a secret that may be shown and stored beside its digest."""
        return secret[: self.visible_chars]


KEY_FORMAT = SecretFormat(KEY_PREFIX)
VISIBLE_PREFIX_CHARS = KEY_FORMAT.visible_chars  # 12


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A stored key (never the key itself)."""

    id: int
    account_id: int
    key_prefix: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None


def generate_key() -> str:
    """A new random key: ``cg_live_<43 url-safe chars>`` (256 bits of entropy)."""
    return KEY_FORMAT.generate()


def is_key_shaped(key: str) -> bool:
    """Whether ``key`` has the shape of a key ``generate_key`` makes (ASCII, right length)."""
    return KEY_FORMAT.is_shaped(key)


def key_digest(key: str) -> bytes:
    """SHA-256 of the key's (or an admin token's) UTF-8 bytes: the only form stored and
    looked up.

    Raises:
        UnicodeEncodeError: ``key`` holds lone surrogates (undecodable header bytes); callers
            with untrusted input check ``is_key_shaped`` first.
    """
    return hashlib.sha256(key.encode("utf-8")).digest()


async def create_api_key(
    conn: asyncpg.Connection,
    account_id: int,
    *,
    name: str = "",
    expires_at: datetime | None = None,
) -> tuple[str, ApiKeyRecord]:
    """Create a key for an account; returns ``(key, record)``. The key is not kept anywhere.

    Raises:
        asyncpg.ForeignKeyViolationError: no such account.
    """
    key = generate_key()
    row = await conn.fetchrow(
        """INSERT INTO api_keys (account_id, key_digest, key_prefix, name, expires_at)
           VALUES ($1, $2, $3, $4, $5)
           RETURNING id, account_id, key_prefix, name, created_at, revoked_at, expires_at""",
        account_id,
        key_digest(key),
        KEY_FORMAT.visible_prefix(key),
        name,
        expires_at,
    )
    return key, ApiKeyRecord(*row)


async def revoke_api_key(conn: asyncpg.Connection, key_id: int) -> bool:
    """Revoke a key now; returns False when it did not exist or was already revoked."""
    status: str = await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id
    )
    return status.endswith(" 1")


@dataclass(frozen=True, slots=True)
class ActiveKey:
    """An active key's identity and what the gateway enforces for it.

    Attributes:
        controls: the key's and its account's spend controls and the account's suspension;
            None when nothing is set (``SpendControls.of``).
    """

    api_key_id: int
    account_id: int
    controls: SpendControls | None


async def find_active_key(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> ActiveKey | None:
    """The active key (not revoked, not expired) with its account's status and both holders'
    spend controls, in one query; None for any other key.

    ``key`` is untrusted (a client's header): anything not key-shaped is None, unqueried.

    Raises:
        OSError / asyncpg.PostgresError: Postgres unreachable.
    """
    if not is_key_shaped(key):
        return None
    row = await conn.fetchrow(
        """SELECT k.id, k.account_id, a.status,
                  k.daily_spend_cap_millicredits, k.monthly_spend_cap_millicredits,
                  k.max_request_millicredits, k.allowed_models, k.requests_per_minute,
                  a.daily_spend_cap_millicredits, a.monthly_spend_cap_millicredits,
                  a.max_request_millicredits, a.allowed_models
           FROM api_keys k JOIN accounts a ON a.id = k.account_id
           WHERE k.key_digest = $1 AND k.revoked_at IS NULL
             AND (k.expires_at IS NULL OR k.expires_at > now())""",
        key_digest(key),
    )
    if row is None:
        return None
    controls = SpendControls.of(
        account_suspended=row[2] == "suspended",
        key=limits_from_row(row[3], row[4], row[5], row[6]),
        account=limits_from_row(row[8], row[9], row[10], row[11]),
        requests_per_minute=row[7],
    )
    return ActiveKey(row[0], row[1], controls)
