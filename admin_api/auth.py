"""Admin token authentication: ``Authorization: Bearer cg_admin_...``.

The token is looked up by its SHA-256 digest (``billing.admin_tokens``); unknown, revoked and
expired tokens all get the same 401. ``last_used_at`` is written off the request's path: a
background task per token, at most once a minute (``LAST_USED_RESOLUTION_S``), awaited at
shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
from aiohttp import web

from admin_api.errors import Unauthorized
from billing.admin_tokens import (
    LAST_USED_RESOLUTION_S,
    AdminIdentity,
    find_active_admin_token,
    touch_last_used,
)
from billing.errors import POSTGRES_UNAVAILABLE
from runtime import appkeys

log = logging.getLogger(__name__)

_BEARER = "bearer "


class LastUsedWriter:
    """Writes tokens' ``last_used_at`` in background tasks, one in flight per token."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def note(self, identity: AdminIdentity) -> None:
        """Record a use of ``identity`` unless its ``last_used_at`` is under a minute old."""
        last = identity.last_used_at
        fresh = last is not None and datetime.now(UTC) - last < timedelta(
            seconds=LAST_USED_RESOLUTION_S
        )
        if fresh or identity.token_id in self._tasks:
            return
        task = asyncio.create_task(self._write(identity.token_id))
        self._tasks[identity.token_id] = task

    async def _write(self, token_id: int) -> None:
        try:
            await touch_last_used(self._pool, token_id)
        except POSTGRES_UNAVAILABLE as exc:  # a lost write of a timestamp: the next use retries
            log.warning("admin token %d: last_used_at not written: %s", token_id, exc)
        finally:
            self._tasks.pop(token_id, None)

    async def close(self) -> None:
        """Wait for the writes in flight."""
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


_LAST_USED = web.AppKey("admin_last_used_writer", LastUsedWriter)


async def last_used_ctx(app: web.Application) -> AsyncIterator[None]:
    """The app's ``LastUsedWriter`` (needs ``DB_POOL``); drained at shutdown."""
    writer = LastUsedWriter(app[appkeys.DB_POOL])
    app[_LAST_USED] = writer
    yield
    await writer.close()


async def authenticate(request: web.Request) -> AdminIdentity:
    """The identity of the request's bearer token.

    Raises:
        Unauthorized: no bearer token, or an unknown, revoked or expired one.
        POSTGRES_UNAVAILABLE: Postgres unreachable (the service answers 500; nothing is
            allowed without a lookup).
    """
    header = request.headers.get("Authorization", "")
    if header[: len(_BEARER)].lower() != _BEARER:
        raise Unauthorized(
            "Missing admin token: send it in the Authorization header (scheme: Bearer)."
        )
    identity = await find_active_admin_token(
        request.app[appkeys.DB_POOL], header[len(_BEARER) :].strip()
    )
    if identity is None:
        raise Unauthorized("Invalid admin token: unknown, revoked or expired.")
    request.app[_LAST_USED].note(identity)
    return identity
