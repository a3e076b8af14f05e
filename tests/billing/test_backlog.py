"""The settlement backlog over every outbox stream (``billing.metering.backlog``)."""

from __future__ import annotations

import redis.asyncio as aioredis

from billing.metering.backlog import OutboxBacklog, backlog_streams, read_outbox_backlog
from billing.metering.posting import GROUP
from billing.metering.redis_keys import LEGACY_OUTBOX_KEY, outbox_key, outbox_keys


async def test_backlog_of_no_stream_is_empty(redis_client: aioredis.Redis) -> None:
    assert await read_outbox_backlog(redis_client) == OutboxBacklog(0, 0, None)
    assert backlog_streams() == (*outbox_keys(), LEGACY_OUTBOX_KEY)


async def test_backlog_sums_every_shard_and_the_v1_stream(redis_client: aioredis.Redis) -> None:
    """Lengths and pending counts summed over the streams (one without a consumer group
    counts nothing pending), the oldest entry the oldest of any stream."""
    await redis_client.xadd(outbox_key(3), {"a": "3"}, id="5000-0")
    await redis_client.xadd(outbox_key(3), {"a": "3"}, id="9000-0")
    await redis_client.xadd(outbox_key(60), {"a": "60"}, id="2000-1")
    await redis_client.xadd(LEGACY_OUTBOX_KEY, {"a": "1"}, id="7000-0")
    await redis_client.xgroup_create(outbox_key(3), GROUP, id="0")
    await redis_client.xreadgroup(GROUP, "c1", {outbox_key(3): ">"}, count=1)
    await redis_client.xgroup_create(LEGACY_OUTBOX_KEY, GROUP, id="0")
    await redis_client.xreadgroup(GROUP, "c1", {LEGACY_OUTBOX_KEY: ">"})

    assert await read_outbox_backlog(redis_client) == OutboxBacklog(4, 2, 2000)
