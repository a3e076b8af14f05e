"""Requests per minute per API key, shared by every gateway process (Redis).

A sliding window of 60 s: the start of each admitted request is kept in a sorted set under
the key's account hash tag (``billing.metering.redis_keys.rpm_key``: one Redis Cluster slot
with the account's other keys), scored by Redis's own clock so every process counts on one
clock; one script (``lua/rate_limit.lua``) prunes, counts and admits atomically. A refused
request is not counted. Only keys with a limit pay for it (one more Redis call per request).

Redis unreachable: the limit fails open (the request goes on; a charged request fails closed
at its reserve anyway), logged and counted in ``RateLimiter.failed_open``.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from billing.errors import RateLimitedError
from billing.metering.holds import load_script
from billing.metering.redis_keys import rpm_key

log = logging.getLogger(__name__)

WINDOW_MS = 60_000


class RateLimiter:
    """Admits or refuses a key's requests against its ``requests_per_minute``."""

    def __init__(self, redis: aioredis.Redis) -> None:
        """Register the script (once, at start-up); ``redis`` decodes responses."""
        self._script = redis.register_script(load_script("rate_limit.lua"))
        self.failed_open = 0
        """Requests let through because Redis could not be asked."""

    async def admit(self, account_id: int, api_key_id: int, limit: int) -> int:
        """Count one request of the key; returns how many it made in the last 60 s, this one
        included.

        Raises:
            RateLimitedError: ``limit`` requests in the last 60 s already (HTTP 429); its
                ``retry_after_ms`` is when one more would be admitted.
        """
        try:
            result: Any = await self._script(
                [rpm_key(account_id, api_key_id)], [limit, uuid.uuid4().hex, WINDOW_MS]
            )
        except RedisError as exc:
            self.failed_open += 1
            log.warning("rate limit of key %d not checked (redis: %s); admitted", api_key_id, exc)
            return 0
        if int(result[0]) == 1:
            return int(result[1])
        raise RateLimitedError(limit=limit, retry_after_ms=max(int(result[2]), 1))
