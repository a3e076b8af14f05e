"""The gateway's billing-integrity metrics and the background loops that read them.

- Holds voided by the sweeper (``count_expired_holds``, from ``gateway.app``'s sweeper).
- The settlement backlog: outbox entries not yet posted and the age of the oldest, summed and
  the oldest over every shard's stream (``billing.metering.backlog``), read from Redis by
  ``read_settlement_backlog`` every ``BACKLOG_INTERVAL_S`` (never per scrape: a scrape does
  no I/O). They describe the whole fleet; every process exports the same values.
- The settlement poster's batches, settlements posted and batch durations
  (``billing.metering.posting.PosterStats``, read at scrape time; durations observed as each
  batch commits).
- ``creditgate_dependency_up{dependency}``: Postgres (``SELECT 1``) and Redis (``PING``)
  probed every ``PROBE_INTERVAL_S`` by ``probe_dependencies``, each with a short timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.exceptions import RedisError

from billing.errors import POSTGRES_UNAVAILABLE
from billing.metering.backlog import read_outbox_backlog
from billing.metering.posting import PosterStats
from runtime.metrics import CounterReading, LabelledReading, StatsCollector

log = logging.getLogger(__name__)

#: Seconds between two reads of the settlement backlog.
BACKLOG_INTERVAL_S = 5.0
#: Seconds between two probes of Postgres and Redis, and each probe's timeout.
PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 2.0

#: Seconds; a batch is one Postgres transaction and its Redis acknowledgements.
BATCH_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

DEPENDENCIES = ("postgres", "redis")


class IntegrityMetrics:
    """The integrity metrics of one gateway app (see the module docstring), registered on
    ``registry``; ``poster`` is the app's settlement poster's stats, read at scrape time."""

    def __init__(self, registry: CollectorRegistry, poster: PosterStats) -> None:
        self._holds_expired = Counter(
            "creditgate_holds_expired",
            "Holds voided by the sweeper at their deadline (a gateway that crashed or lost "
            "Redis mid-request).",
            registry=registry,
        )
        self._backlog = Gauge(
            "creditgate_settlement_backlog_entries",
            "Outbox entries not yet posted to Postgres (unread and pending; fleet-wide, "
            "read from Redis every few seconds).",
            registry=registry,
        )
        self._oldest_age = Gauge(
            "creditgate_settlement_oldest_unposted_age_seconds",
            "Age of the oldest outbox entry not yet posted (0 when none; fleet-wide).",
            registry=registry,
        )
        self._batch_duration = Histogram(
            "creditgate_settlement_batch_duration_seconds",
            "Settlement batches from their Postgres statement to their Redis acknowledgement.",
            buckets=BATCH_BUCKETS_S,
            registry=registry,
        )
        self._dependency_up = Gauge(
            "creditgate_dependency_up",
            "1 when the last probe of the dependency (SELECT 1, PING) answered in time, else 0.",
            ["dependency"],
            registry=registry,
        )
        for dependency in DEPENDENCIES:
            self._dependency_up.labels(dependency).set(1)
        poster.on_batch = self._batch_duration.observe
        registry.register(
            StatsCollector(
                [
                    CounterReading(
                        "creditgate_settlements_posted",
                        "Settlements posted to Postgres by this process (usage rows written).",
                        lambda: poster.posted,
                    ),
                ],
                [
                    LabelledReading(
                        "creditgate_settlement_batches",
                        "Settlement batches by outcome: posted, or failed (Redis or Postgres "
                        "unreachable; the entries stay in the outbox and are posted later).",
                        "outcome",
                        lambda: {"posted": poster.batches, "failed": poster.failures},
                    ),
                ],
            )
        )

    def count_expired_holds(self, voided: int) -> None:
        """``voided`` holds were voided by the sweeper."""
        self._holds_expired.inc(voided)

    async def read_settlement_backlog(self, redis: aioredis.Redis) -> None:
        """Read the outbox streams' length and their oldest entry's age into the backlog
        gauges. Redis unreachable: logged, the gauges keep their last values
        (``dependency_up`` says Redis is down)."""
        try:
            backlog = await read_outbox_backlog(redis)
        except RedisError as exc:
            log.warning("settlement backlog not read: %r", exc)
            return
        self._backlog.set(backlog.entries)
        self._oldest_age.set(_entry_age_s(backlog.oldest_entry_ms, time.time()))

    async def probe_dependencies(self, pool: asyncpg.Pool, redis: aioredis.Redis) -> None:
        """Probe Postgres and Redis once (concurrently) and set ``dependency_up``."""
        postgres_up, redis_up = await asyncio.gather(_probe_postgres(pool), _probe_redis(redis))
        self._dependency_up.labels("postgres").set(1 if postgres_up else 0)
        self._dependency_up.labels("redis").set(1 if redis_up else 0)


def _entry_age_s(oldest_entry_ms: int | None, now_s: float) -> float:
    """Seconds since the oldest outbox entry was added; 0 when every stream is empty."""
    if oldest_entry_ms is None:
        return 0.0
    return max(now_s - oldest_entry_ms / 1000, 0.0)


async def _probe_postgres(pool: asyncpg.Pool) -> bool:
    try:
        # The pool's acquire waits too (a dead server, a full pool): one deadline for both.
        await asyncio.wait_for(pool.fetchval("SELECT 1"), PROBE_TIMEOUT_S)
    except (*POSTGRES_UNAVAILABLE, asyncpg.PostgresError, TimeoutError) as exc:
        log.warning("postgres probe failed: %r", exc)
        return False
    return True


async def _probe_redis(redis: aioredis.Redis) -> bool:
    try:
        await asyncio.wait_for(redis.ping(), PROBE_TIMEOUT_S)
    except (RedisError, TimeoutError, OSError) as exc:
        log.warning("redis probe failed: %r", exc)
        return False
    return True
