"""Bearer-key authentication with a short in-process cache.

Keys are looked up in Postgres by SHA-256 digest. Results (hits and misses) are cached for
``ttl_s`` seconds so the hot path needs no query per request; a revoked key therefore stops
working within ``ttl_s`` (default 5 s) on every gateway process, and so does a change of the
account's status or of either's spend controls, which the identity carries (one query, a
join: ``billing.api_keys.find_active_key``). A suspended account's keys are refused here
(403). Concurrent requests with a key
that is not cached (or whose entry just expired) share one lookup, so a busy key costs
Postgres one query per ``ttl_s``, not one per request in flight.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from functools import partial

import asyncpg
from aiohttp import web

from billing.api_keys import find_active_key
from billing.errors import POSTGRES_UNAVAILABLE, AccountDeactivatedError, BillingUnavailableError
from billing.spend_controls import SpendControls
from runtime.errors import AuthenticationError

_MISSING_MESSAGE = "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
_INVALID_MESSAGE = "Incorrect API key provided."
_MAX_CACHE_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: the key's id and its account, and what is enforced for them
    (``controls``: None when nothing is, the usual case, which then costs nothing)."""

    api_key_id: int
    account_id: int
    controls: SpendControls | None = None


class KeyAuthenticator:
    """Resolves ``Authorization: Bearer <key>`` to an ``Identity``."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float = 5.0) -> None:
        self._pool = pool
        self._ttl_s = ttl_s
        # Keyed by the key as presented (hashing it for every request cost more than the
        # lookup itself); the database only ever sees its digest.
        self._cache: dict[str, tuple[float, Identity | None]] = {}
        # Lookups in flight, by key: later callers await the first one's task.
        self._lookups: dict[str, asyncio.Task[Identity | None]] = {}

    async def identify(self, key: str) -> Identity | None:
        """The identity of an active key, or None (unknown, revoked, expired).

        Raises:
            BillingUnavailableError: Postgres unreachable and the key is not cached (503).
        """
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        lookup = self._lookups.get(key)
        if lookup is None:
            # A task of its own, so a caller that is cancelled (its client left) does not
            # cancel the lookup the others wait for.
            lookup = asyncio.ensure_future(self._look_up(key))
            self._lookups[key] = lookup
            lookup.add_done_callback(partial(self._looked_up, key))
        return await asyncio.shield(lookup)

    async def _look_up(self, key: str) -> Identity | None:
        try:
            found = await find_active_key(self._pool, key)
        except POSTGRES_UNAVAILABLE as exc:
            raise BillingUnavailableError(f"postgres: {exc}") from exc
        identity = Identity(found.api_key_id, found.account_id, found.controls) if found else None
        if len(self._cache) >= _MAX_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = (time.monotonic() + self._ttl_s, identity)
        return identity

    def _looked_up(self, key: str, lookup: asyncio.Task[Identity | None]) -> None:
        del self._lookups[key]
        if not lookup.cancelled():
            lookup.exception()  # retrieved here too: every waiter may have gone

    async def authenticate(self, request: web.Request) -> Identity:
        """The caller's identity from the Authorization header.

        Raises:
            AuthenticationError: no bearer key, or an unknown, revoked or expired one (401,
                the same answer for all three).
            AccountDeactivatedError: the key's account is suspended (403).
            BillingUnavailableError: Postgres unreachable (503).
        """
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            # A new exception each time: a shared instance's traceback would grow with every
            # raise and keep each refused request's frames alive.
            raise AuthenticationError(_MISSING_MESSAGE, code="missing_api_key")
        identity = await self.identify(key)
        if identity is None:
            raise AuthenticationError(_INVALID_MESSAGE)
        if identity.controls is not None and identity.controls.account_suspended:
            raise AccountDeactivatedError(identity.account_id)
        return identity
