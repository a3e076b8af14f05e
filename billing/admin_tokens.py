"""Admin tokens: the bearer credentials of the admin API, each with a role.

Format: ``cg_admin_`` + 43 URL-safe base64 characters (``billing.api_keys.SecretFormat``, as
API keys), shown once at creation; only the SHA-256 digest (``api_keys.key_digest``) and the
first 13 characters (``token_prefix``) are stored (``admin_tokens``, migrations/0007).

Roles, lowest first: ``viewer`` (reads everything), ``operator`` (accounts, keys,
adjustments), ``admin`` (everything, tokens included). A role allows what every lower role
allows.

Every mutation here writes its one audit row (``billing.audit.record_audit``) in the same
transaction as the change.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from billing.api_keys import SecretFormat, key_digest
from billing.audit import Actor, record_audit
from billing.errors import BillingError

TOKEN_FORMAT = SecretFormat("cg_admin_")

#: What ``last_used_at`` is allowed to lag behind: it is written at most this often per token.
LAST_USED_RESOLUTION_S = 60


class Role(enum.StrEnum):
    """An admin token's role; ``allows`` orders them viewer < operator < admin."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """0 for viewer, 1 for operator, 2 for admin."""
        return _RANKS[self]

    def allows(self, required: Role) -> bool:
        """Whether a token of this role may call what needs ``required``."""
        return self.rank >= required.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


@dataclass(frozen=True, slots=True)
class AdminTokenRecord:
    """A stored admin token (never the token itself)."""

    id: int
    name: str
    role: Role
    token_prefix: str
    created_at: datetime
    created_by_token_id: int | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def snapshot(self) -> dict[str, Any]:
        """The record as the audit log's ``before``/``after`` keeps it."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class AdminIdentity:
    """Who an active token is, as authentication needs it."""

    token_id: int
    name: str
    role: Role
    last_used_at: datetime | None


class AdminTokenNotFoundError(BillingError):
    """No admin token with this id."""

    def __init__(self, token_id: int) -> None:
        super().__init__(f"No admin token with id {token_id}.")
        self.token_id = token_id


class AdminTokenRevokedError(BillingError):
    """The admin token is already revoked (a revoked token cannot be changed)."""

    def __init__(self, token_id: int) -> None:
        super().__init__(f"Admin token {token_id} is revoked.")
        self.token_id = token_id


_COLUMNS = """id, name, role, token_prefix, created_at, created_by_token_id, expires_at,
              revoked_at, last_used_at"""


def _record(row: asyncpg.Record) -> AdminTokenRecord:
    values = dict(row)
    values["role"] = Role(values["role"])
    return AdminTokenRecord(**values)


async def create_admin_token(
    conn: asyncpg.Connection,
    actor: Actor,
    *,
    role: Role,
    name: str = "",
    expires_at: datetime | None = None,
) -> tuple[str, AdminTokenRecord]:
    """Create a token and its audit row (``admin_token.create``) in one transaction; returns
    ``(token, record)``. The token is not kept anywhere.

    ``actor.token_id`` is stored as ``created_by_token_id`` (None for the CLI).

    Raises:
        asyncpg.PostgresError: Postgres refused or is unreachable; nothing written.
    """
    token = TOKEN_FORMAT.generate()
    async with conn.transaction():
        row = await conn.fetchrow(
            f"""INSERT INTO admin_tokens (token_digest, token_prefix, name, role,
                    created_by_token_id, expires_at)
                VALUES ($1, $2, $3, $4, $5, $6)
                RETURNING {_COLUMNS}""",
            key_digest(token),
            TOKEN_FORMAT.visible_prefix(token),
            name,
            role.value,
            actor.token_id,
            expires_at,
        )
        record = _record(row)
        await record_audit(
            conn,
            actor,
            action="admin_token.create",
            target_type="admin_token",
            target_id=record.id,
            after=record.snapshot(),
        )
    return token, record


async def get_admin_token(
    conn: asyncpg.Connection | asyncpg.Pool, token_id: int
) -> AdminTokenRecord:
    """One token by id.

    Raises:
        AdminTokenNotFoundError: no such token.
    """
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM admin_tokens WHERE id = $1", token_id)
    if row is None:
        raise AdminTokenNotFoundError(token_id)
    return _record(row)


async def list_admin_tokens(
    conn: asyncpg.Connection | asyncpg.Pool, *, limit: int, before_id: int | None = None
) -> list[AdminTokenRecord]:
    """Tokens newest first, at most ``limit``, those with an id below ``before_id`` (keyset
    pagination)."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM admin_tokens
            WHERE $1::bigint IS NULL OR id < $1 ORDER BY id DESC LIMIT $2""",
        before_id,
        limit,
    )
    return [_record(row) for row in rows]


class Keep(enum.Enum):
    """``update_admin_token``'s "leave the expiry as it is" (None clears it)."""

    EXPIRY = "keep"


async def update_admin_token(
    conn: asyncpg.Connection,
    actor: Actor,
    token_id: int,
    *,
    name: str | None = None,
    expires_at: datetime | Literal[Keep.EXPIRY] | None = Keep.EXPIRY,
) -> AdminTokenRecord:
    """Rename a token (``name`` None: unchanged) and/or set its expiry (None: never
    expires; ``Keep.EXPIRY``: unchanged), with its audit row (``admin_token.update``), in one
    transaction.

    Raises:
        AdminTokenNotFoundError: no such token.
        AdminTokenRevokedError: the token is revoked.
    """
    async with conn.transaction():
        before = await _locked(conn, token_id)
        row = await conn.fetchrow(
            f"""UPDATE admin_tokens
                SET name = coalesce($2, name),
                    expires_at = CASE WHEN $3 THEN $4 ELSE expires_at END
                WHERE id = $1 RETURNING {_COLUMNS}""",
            token_id,
            name,
            expires_at is not Keep.EXPIRY,
            None if expires_at is Keep.EXPIRY else expires_at,
        )
        after = _record(row)
        await record_audit(
            conn,
            actor,
            action="admin_token.update",
            target_type="admin_token",
            target_id=token_id,
            before=before.snapshot(),
            after=after.snapshot(),
        )
    return after


async def revoke_admin_token(
    conn: asyncpg.Connection, actor: Actor, token_id: int
) -> AdminTokenRecord:
    """Revoke a token now, with its audit row (``admin_token.revoke``), in one transaction.

    Raises:
        AdminTokenNotFoundError: no such token.
        AdminTokenRevokedError: already revoked (nothing written).
    """
    async with conn.transaction():
        before = await _locked(conn, token_id)
        row = await conn.fetchrow(
            f"UPDATE admin_tokens SET revoked_at = now() WHERE id = $1 RETURNING {_COLUMNS}",
            token_id,
        )
        after = _record(row)
        await record_audit(
            conn,
            actor,
            action="admin_token.revoke",
            target_type="admin_token",
            target_id=token_id,
            before=before.snapshot(),
            after=after.snapshot(),
        )
    return after


async def _locked(conn: asyncpg.Connection, token_id: int) -> AdminTokenRecord:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM admin_tokens WHERE id = $1 FOR UPDATE", token_id
    )
    if row is None:
        raise AdminTokenNotFoundError(token_id)
    record = _record(row)
    if record.revoked_at is not None:
        raise AdminTokenRevokedError(token_id)
    return record


async def find_active_admin_token(
    conn: asyncpg.Connection | asyncpg.Pool, token: str
) -> AdminIdentity | None:
    """The identity of an active token (known, not revoked, not expired), else None.

    ``token`` is untrusted (a client's header): anything not token-shaped is None, unqueried.

    Raises:
        OSError / asyncpg.PostgresError: Postgres unreachable.
    """
    if not TOKEN_FORMAT.is_shaped(token):
        return None
    row = await conn.fetchrow(
        """SELECT id, name, role, last_used_at FROM admin_tokens
           WHERE token_digest = $1 AND revoked_at IS NULL
             AND (expires_at IS NULL OR expires_at > now())""",
        key_digest(token),
    )
    if row is None:
        return None
    return AdminIdentity(row["id"], row["name"], Role(row["role"]), row["last_used_at"])


async def touch_last_used(conn: asyncpg.Connection | asyncpg.Pool, token_id: int) -> None:
    """Set ``last_used_at`` to now, unless it was set within ``LAST_USED_RESOLUTION_S`` (so
    concurrent callers write once a minute at most). Not audited: it is not a change an
    operator made.

    Raises:
        OSError / asyncpg.PostgresError: Postgres unreachable.
    """
    await conn.execute(
        """UPDATE admin_tokens SET last_used_at = now()
           WHERE id = $1 AND (last_used_at IS NULL
                              OR last_used_at < now() - make_interval(secs => $2))""",
        token_id,
        float(LAST_USED_RESOLUTION_S),
    )
