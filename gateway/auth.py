"""Bearer-key authentication with a short in-process cache.

Keys are looked up in Postgres by SHA-256 digest. Results (hits and misses) are cached for
``ttl_s`` seconds so the hot path needs no query per request. The identity carries the
account's status and the key's and account's spend controls (one query, a join:
``billing.api_keys.find_active_key``); a suspended account's keys are refused here
(403). Concurrent requests with a key
that is not cached (or whose entry just expired) share one lookup, so a busy key costs
Postgres one query per ``ttl_s``, not one per request in flight.

A revoked key, or a suspended account's, stops working at once on every process that hears
the change's ``KEYS`` or ``ACCOUNTS`` control event: the control listener calls
``forget_all`` (``runtime.control``; within ``CONTROL_REFRESH_S`` when it is not connected),
and otherwise within ``ttl_s`` at the latest.
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
INVALID_KEY_MESSAGE = "Incorrect API key provided."
_MAX_CACHE_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: the key's id and its account, and what is enforced for them
    (``controls``: None when nothing is, the usual case, which then costs nothing)."""

    api_key_id: int
    account_id: int
    controls: SpendControls | None = None


def bearer_key(request: web.BaseRequest) -> str:
    """The key of ``Authorization: Bearer <key>`` (not yet looked up).

    Raises:
        AuthenticationError: no such header, or not a bearer one (401 ``missing_api_key``).
    """
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        # A new exception each time: a shared instance's traceback would grow with every
        # raise and keep each refused request's frames alive.
        raise AuthenticationError(_MISSING_MESSAGE, code="missing_api_key")
    return key


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
        # Bumped by forget_all: a lookup that started before it does not cache its answer
        # (it may have read a key in the instant before its revocation committed).
        self._generation = 0

    def forget_all(self) -> None:
        """Drop every cached answer: the next request of each key looks it up again (keys
        were revoked or changed, or accounts suspended; ``runtime.control``)."""
        self._cache.clear()
        self._generation += 1

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
        generation = self._generation
        try:
            found = await find_active_key(self._pool, key)
        except POSTGRES_UNAVAILABLE as exc:
            raise BillingUnavailableError(f"postgres: {exc}") from exc
        identity = Identity(found.api_key_id, found.account_id, found.controls) if found else None
        if generation != self._generation:
            return identity  # answered, but not cached: forget_all ran meanwhile
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
        identity = await self.identify(bearer_key(request))
        if identity is None:
            raise AuthenticationError(INVALID_KEY_MESSAGE)
        if identity.controls is not None and identity.controls.account_suspended:
            raise AccountDeactivatedError(identity.account_id)
        return identity
