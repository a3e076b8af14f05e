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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg

from billing.audit import Actor, record_audit
from billing.control import ControlKind, notify_control
from billing.errors import AccountNotFoundError, ApiKeyNotFoundError
from billing.spend_controls import (
    CONTROL_COLUMNS,
    Limits,
    SpendControls,
    limits_from_record,
    limits_from_row,
    limits_snapshot,
    update_columns,
)

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
    """A stored key (never the key itself).

    Attributes:
        controls: the key's own spend controls (the account's apply too).
        requests_per_minute: the key's rate limit; None for none.
        last_used_at: when its newest usage event finished; None if never used (filled by
            ``get_api_key`` and ``list_api_keys`` only).
    """

    id: int
    account_id: int
    key_prefix: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None
    controls: Limits = field(default_factory=Limits)
    requests_per_minute: int | None = None
    last_used_at: datetime | None = None


_RETURNING = (
    "id, account_id, key_prefix, name, created_at, revoked_at, expires_at, "
    + ", ".join(CONTROL_COLUMNS)
    + ", requests_per_minute"
)
# Last used: the key's newest usage event, by id (usage_events_api_key_id_idx).
_SELECT_KEY = (
    "SELECT k.id, k.account_id, k.key_prefix, k.name, k.created_at, k.revoked_at, "
    "k.expires_at, "
    + ", ".join(f"k.{column}" for column in CONTROL_COLUMNS)
    + ", k.requests_per_minute, "
    "(SELECT u.finished_at FROM usage_events u WHERE u.api_key_id = k.id "
    "ORDER BY u.id DESC LIMIT 1) AS last_used_at FROM api_keys k"
)

UPDATABLE_COLUMNS: Final = frozenset(
    {"name", "expires_at", "requests_per_minute", *CONTROL_COLUMNS}
)
"""What ``update_api_key`` may change."""


def _record(row: asyncpg.Record) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row["id"],
        account_id=row["account_id"],
        key_prefix=row["key_prefix"],
        name=row["name"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        expires_at=row["expires_at"],
        controls=limits_from_record(row),
        requests_per_minute=row["requests_per_minute"],
        last_used_at=row.get("last_used_at"),
    )


def key_snapshot(record: ApiKeyRecord) -> dict[str, Any]:
    """The key as a JSON-able dict of its column names (audit ``before``/``after``); never
    the secret, which is not stored."""
    return {
        "id": record.id,
        "account_id": record.account_id,
        "key_prefix": record.key_prefix,
        "name": record.name,
        "revoked_at": record.revoked_at,
        "expires_at": record.expires_at,
        "requests_per_minute": record.requests_per_minute,
        **limits_snapshot(record.controls),
    }


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
    controls: Limits | None = None,
    requests_per_minute: int | None = None,
) -> tuple[str, ApiKeyRecord]:
    """Create a key for an account; returns ``(key, record)``. The key is not kept anywhere.

    Raises:
        asyncpg.ForeignKeyViolationError: no such account.
    """
    key = generate_key()
    controls = controls or Limits()
    models = controls.allowed_models
    row = await conn.fetchrow(
        f"""INSERT INTO api_keys (account_id, key_digest, key_prefix, name, expires_at,
                                  {", ".join(CONTROL_COLUMNS)}, requests_per_minute)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            RETURNING {_RETURNING}""",
        account_id,
        key_digest(key),
        KEY_FORMAT.visible_prefix(key),
        name,
        expires_at,
        controls.daily_spend_cap_millicredits,
        controls.monthly_spend_cap_millicredits,
        controls.max_request_millicredits,
        None if models is None else sorted(models),
        requests_per_minute,
    )
    return key, _record(row)


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


async def get_api_key(
    conn: asyncpg.Connection | asyncpg.Pool, api_key_id: int, *, for_update: bool = False
) -> ApiKeyRecord:
    """One key with its last use; ``for_update`` locks its row until the transaction ends.

    Raises:
        ApiKeyNotFoundError: no such key.
    """
    row = await conn.fetchrow(
        _SELECT_KEY + " WHERE k.id = $1" + (" FOR UPDATE OF k" if for_update else ""),
        api_key_id,
    )
    if row is None:
        raise ApiKeyNotFoundError(api_key_id)
    return _record(row)


async def list_api_keys(
    conn: asyncpg.Connection | asyncpg.Pool, account_id: int
) -> list[ApiKeyRecord]:
    """Every key of an account (revoked and expired too), oldest first."""
    rows = await conn.fetch(_SELECT_KEY + " WHERE k.account_id = $1 ORDER BY k.id", account_id)
    return [_record(row) for row in rows]


async def _audit_key(
    conn: asyncpg.Connection,
    actor: Actor,
    action: str,
    before: ApiKeyRecord | None,
    after: ApiKeyRecord,
) -> None:
    """The audit row and the control event of one key change (inside its transaction)."""
    await record_audit(
        conn,
        actor,
        action=action,
        target_type="api_key",
        target_id=after.id,
        before=None if before is None else key_snapshot(before),
        after=key_snapshot(after),
    )
    await notify_control(conn, ControlKind.KEYS, account_id=after.account_id, api_key_id=after.id)


async def issue_api_key(
    conn: asyncpg.Connection,
    actor: Actor,
    account_id: int,
    *,
    name: str = "",
    expires_at: datetime | None = None,
    controls: Limits | None = None,
    requests_per_minute: int | None = None,
) -> tuple[str, ApiKeyRecord]:
    """``create_api_key`` with its audit row (``key.create``) and control event, in one
    transaction; returns ``(key, record)``: the key is shown to the caller once.

    Raises:
        AccountNotFoundError: no such account.
    """
    async with conn.transaction():
        try:
            async with conn.transaction():
                key, record = await create_api_key(
                    conn,
                    account_id,
                    name=name,
                    expires_at=expires_at,
                    controls=controls,
                    requests_per_minute=requests_per_minute,
                )
        except asyncpg.ForeignKeyViolationError:
            raise AccountNotFoundError(account_id) from None
        await _audit_key(conn, actor, "key.create", None, record)
    return key, record


async def update_api_key(
    conn: asyncpg.Connection, actor: Actor, api_key_id: int, changes: Mapping[str, Any]
) -> ApiKeyRecord:
    """Set the key's name, expiry, rate limit and spend controls named in ``changes``
    (column name -> value; None clears). Audit ``key.update`` and a control event.

    Raises:
        ApiKeyNotFoundError: no such key.
        ValueError: a column outside ``UPDATABLE_COLUMNS``.
    """
    async with conn.transaction():
        before = await get_api_key(conn, api_key_id, for_update=True)
        await update_columns(conn, "api_keys", api_key_id, changes, allowed=UPDATABLE_COLUMNS)
        after = await get_api_key(conn, api_key_id)
        await _audit_key(conn, actor, "key.update", before, after)
    return after


async def revoke_api_key_audited(
    conn: asyncpg.Connection, actor: Actor, api_key_id: int
) -> ApiKeyRecord:
    """Revoke a key now (a revoked key keeps its first ``revoked_at``), with its audit row
    (``key.revoke``) and a control event so every gateway drops it from its auth cache.

    Raises:
        ApiKeyNotFoundError: no such key.
    """
    async with conn.transaction():
        before = await get_api_key(conn, api_key_id, for_update=True)
        await revoke_api_key(conn, api_key_id)
        after = await get_api_key(conn, api_key_id)
        await _audit_key(conn, actor, "key.revoke", before, after)
    return after
