"""The settlement backlog: what the outbox streams hold that is not yet posted to Postgres.

Every shard's stream (``billing.metering.redis_keys.outbox_keys``) and the v1 stream an
upgrade may leave (``LEGACY_OUTBOX_KEY``, drained by the poster) are read, one command per
stream, all in one round trip (a Redis Cluster refuses one command naming several shards'
streams). Acknowledged entries are deleted, so a stream's length is its unposted
settlements. One reader for the gateway's metrics, the benchmarks and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from billing.metering.posting import GROUP
from billing.metering.redis_keys import LEGACY_OUTBOX_KEY, outbox_keys


@dataclass(frozen=True, slots=True)
class OutboxBacklog:
    """The outbox streams at one moment, summed over the streams.

    Attributes:
        entries: ``XLEN`` summed: settlements not yet posted and acknowledged.
        pending: ``XPENDING`` counts summed: entries a poster has read but not yet
            acknowledged (0 for a stream without the consumer group: nothing read).
        oldest_entry_ms: the Unix ms of the oldest entry of any stream (from its id), None
            when every stream is empty.
    """

    entries: int
    pending: int
    oldest_entry_ms: int | None


def backlog_streams() -> tuple[str, ...]:
    """The streams a backlog covers: every shard's outbox and the v1 stream."""
    return (*outbox_keys(), LEGACY_OUTBOX_KEY)


async def read_outbox_backlog(redis: aioredis.Redis) -> OutboxBacklog:
    """Read every outbox stream's length, pending count and oldest entry.

    Raises:
        redis.exceptions.RedisError: Redis unreachable.
    """
    streams = backlog_streams()
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xrange(stream, "-", "+", count=1)
            pipe.xpending(stream, GROUP)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    entries = pending = 0
    oldest: int | None = None
    for i in range(len(streams)):
        length, first, summary = replies[3 * i : 3 * i + 3]
        for reply in (length, first):
            if isinstance(reply, Exception):
                raise reply
        entries += int(length)
        if isinstance(summary, ResponseError):
            if "NOGROUP" not in str(summary):
                raise summary
        elif isinstance(summary, Exception):
            raise summary
        else:
            pending += int(summary["pending"])
        if first:
            entry_ms = _entry_ms(first[0][0])
            oldest = entry_ms if oldest is None else min(oldest, entry_ms)
    return OutboxBacklog(entries, pending, oldest)


def _entry_ms(entry_id: str | bytes) -> int:
    """The Unix ms a stream entry was added, from its id (``<ms>-<seq>``)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])
