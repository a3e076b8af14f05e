"""Bearer-key authentication with a short in-process cache.

Keys are looked up in Postgres by SHA-256 digest. Results (hits and misses) are cached for
``ttl_s`` seconds so the hot path needs no query per request; a revoked key therefore stops
working within ``ttl_s`` (default 5 s) on every gateway process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg
from aiohttp import web

from billing.api_keys import find_active_key
from billing.errors import BillingUnavailableError
from gateway.errors import AuthenticationError

_MISSING = AuthenticationError(
    "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
    code="missing_api_key",
)
_INVALID_MESSAGE = "Incorrect API key provided."
_MAX_CACHE_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: the key's id and its account."""

    api_key_id: int
    account_id: int


class KeyAuthenticator:
    """Resolves ``Authorization: Bearer <key>`` to an ``Identity``."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float = 5.0) -> None:
        self._pool = pool
        self._ttl_s = ttl_s
        # Keyed by the key as presented (hashing it for every request cost more than the
        # lookup itself); the database only ever sees its digest.
        self._cache: dict[str, tuple[float, Identity | None]] = {}

    async def identify(self, key: str) -> Identity | None:
        """The identity of an active key, or None (unknown, revoked, expired).

        Raises:
            BillingUnavailableError: Postgres unreachable and the key is not cached (503).
        """
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            found = await find_active_key(self._pool, key)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise BillingUnavailableError(f"postgres: {exc}") from exc
        identity = Identity(found[0], found[1]) if found else None
        if len(self._cache) >= _MAX_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = (now + self._ttl_s, identity)
        return identity

    async def authenticate(self, request: web.Request) -> Identity:
        """The caller's identity from the Authorization header.

        Raises:
            AuthenticationError: no bearer key, or an unknown, revoked or expired one (401,
                the same answer for all three).
            BillingUnavailableError: Postgres unreachable (503).
        """
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise _MISSING
        identity = await self.identify(key)
        if identity is None:
            raise AuthenticationError(_INVALID_MESSAGE)
        return identity


async def authenticate(request: web.Request) -> Identity:
    """Authenticate a request with the app's ``KeyAuthenticator`` (see ``KeyAuthenticator``)."""
    from gateway.appkeys import AUTH

    return await request.app[AUTH].authenticate(request)
