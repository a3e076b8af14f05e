"""The key layout v2 (``billing.metering.redis_keys``): each script's keys in one Cluster slot.

The layout is checked twice: by computing each key's slot (``redis.crc.key_slot``, what a
Cluster client and server compute), and by running the whole money path (every Lua script, the
poster, the sweeper, the backlog reader, reconciliation, the rate limiter) on a Redis node in
cluster mode that owns every slot: such a node refuses a command or script whose keys are in
several slots (``CROSSSLOT``), and a script that touches a key outside its declared keys' slot.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from billing import ledger
from billing.errors import InsufficientCreditsError
from billing.metering.backlog import OutboxBacklog, read_outbox_backlog
from billing.metering.holds import HoldStore
from billing.metering.posting import SettlementPoster
from billing.metering.rate_limit import RateLimiter
from billing.metering.redis_keys import (
    LEGACY_OUTBOX_KEY,
    SHARD_COUNT,
    SHARDS,
    account_key,
    deadlines_key,
    deadlines_keys,
    holds_key,
    outbox_key,
    outbox_keys,
    rpm_key,
    settled_key,
    shard_of,
    spend_key,
)
from billing.metering.script_channel import ScriptChannel
from billing.reconciliation import ReconciliationReport, check_redis
from billing.spend_controls import window_spend
from devtools.localservices import free_port
from tests.billing.money import grant, new_account, usage_payload

# -- the layout ---------------------------------------------------------------------------


def _account_keys(account_id: int) -> list[str]:
    """Every key of an account, and its shard's deadline index and outbox."""
    shard = shard_of(account_id)
    return [
        account_key(account_id),
        holds_key(account_id),
        settled_key(account_id, "req-1"),
        spend_key(account_id, "d", "20261203"),
        spend_key(account_id, "m", "202612"),
        rpm_key(account_id, 7),
        deadlines_key(shard),
        outbox_key(shard),
    ]


@pytest.mark.parametrize("account_id", [0, 1, 7, 63, 64, 65, 127, 1_000_003, 2**62 + 5])
def test_account_keys_share_their_shards_slot(account_id: int) -> None:
    keys = _account_keys(account_id)
    assert {key_slot(key.encode()) for key in keys} == {
        key_slot(outbox_key(account_id % 64).encode())
    }
    assert all(key.startswith(f"cg:v2:{{s{account_id % 64:02d}}}:") for key in keys)


def test_shards_are_spread_over_distinct_slots() -> None:
    slots = {key_slot(key.encode()) for key in outbox_keys()}
    assert len(slots) == SHARD_COUNT == len(SHARDS)
    assert [shard_of(shard) for shard in SHARDS] == list(SHARDS)
    assert outbox_keys()[7] == "cg:v2:{s07}:settlements" == outbox_key(7)
    assert deadlines_keys()[63] == "cg:v2:{s63}:hold_deadlines" == deadlines_key(63)
    assert account_key(71) == "cg:v2:{s07}:acct:71:account"


def test_spend_keys_keep_the_stem_hold_value_lua_derives_them_from() -> None:
    """``hold_value.lua`` builds a spend key from the account key (drops ``account``)."""
    stem = account_key(4242).removesuffix("account")
    assert spend_key(4242, "d", "20261203") == f"{stem}spend:d:20261203"
    assert spend_key(4242, "m", "202612") == f"{stem}spend:m:202612"


# -- on a Redis node in cluster mode ----------------------------------------------------------


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[str]:
    """A one-node Redis Cluster owning every slot (it refuses cross-slot commands and
    scripts); its URL."""
    executable = shutil.which("redis-server")
    assert executable is not None
    port = free_port()
    log = (tmp_path / "redis.log").open("wb")
    process = subprocess.Popen(
        [
            executable,
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)),
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            # The bus port, else port + 10000: a free port above 55535 would not start.
            *("--cluster-port", str(free_port())),
            *("--save", "", "--appendonly", "no"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


async def _cluster_ready(url: str) -> aioredis.Redis:
    client = aioredis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            await client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            break
        except (RedisConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    while "cluster_state:ok" not in await client.execute_command("CLUSTER", "INFO"):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return client


@pytest.fixture
async def cluster_client(cluster_node: str) -> AsyncIterator[aioredis.Redis]:
    client = await _cluster_ready(cluster_node)
    yield client
    await client.aclose()


async def test_cluster_node_refuses_keys_of_several_slots(cluster_client: aioredis.Redis) -> None:
    """The check the next test relies on: this node refuses what a cluster refuses. (A key
    a script derives itself, as hold_value.lua's spend keys, is checked by the stem test
    above: this node serves every slot, so it does not refuse one of another slot.)"""
    with pytest.raises(ResponseError, match="same slot"):  # CROSSSLOT
        await cluster_client.eval(
            "return redis.call('EXISTS', KEYS[1], KEYS[2])", 2, outbox_key(1), outbox_key(2)
        )


async def test_money_path_touches_one_slot_per_command_on_a_cluster_node(
    cluster_client: aioredis.Redis, cluster_node: str, pool: asyncpg.Pool
) -> None:
    """Reserve (with caps: load_spend), a refused reserve that voids an overdue hold, settle,
    void, expiry, the rate limit, posting (ack_posted), a dead letter, the v1 stream, the
    backlog and reconciliation, for accounts on several shards, on a node that refuses any
    command or script whose keys are in several slots. (On the v1 layout, every settle named
    the global outbox and deadline index beside the account's keys: CROSSSLOT.)"""
    channel = ScriptChannel(cluster_node)
    holds = HoldStore(
        cluster_client,
        lambda account_id: ledger.posted_balance(pool, account_id),
        channel=channel,
        load_spend=lambda account_id, key_id, windows: window_spend(
            pool, account_id, key_id, windows
        ),
    )
    poster = SettlementPoster(holds, pool, consumer="c1", claim_idle_ms=0)
    limiter = RateLimiter(cluster_client)
    try:
        accounts = [await new_account(pool) for _ in range(3)]
        assert len({shard_of(a) for a in accounts}) == 3
        # An entry left by a v1 fleet, for the first account.
        await cluster_client.xadd(
            LEGACY_OUTBOX_KEY,
            {
                "p": usage_payload(request_id="v1", account_id=accounts[0], cost_millicredits=5),
                "c": 5,
                "a": accounts[0],
            },
        )
        now_ms = int(time.time() * 1000)
        for account_id in accounts:
            await grant(pool, account_id, 10_000, holds=holds)
            caps = (1_000_000, None, None, None)
            await holds.reserve(account_id, 2_000, request_id="a", window_caps=caps)
            await holds.reserve(account_id, 2_000, request_id="gone", ttl_s=0.001)
            await holds.reserve(account_id, 1_000, request_id="voided")
            await asyncio.sleep(0.01)
            with pytest.raises(InsufficientCreditsError):
                await holds.reserve(account_id, 9_000, request_id="too-much")
            await holds.reserve(account_id, 2_000, request_id="late", ttl_s=0.001)
            payload = usage_payload(
                request_id=f"a{account_id}", account_id=account_id, cost_millicredits=1_500
            )
            await holds.settle(account_id, request_id="a", cost_millicredits=1_500, payload=payload)
            assert await holds.void(account_id, request_id="voided") == 1_000
            assert await limiter.admit(account_id, 7, 10) == 1
        await cluster_client.xadd(
            outbox_key(shard_of(accounts[1])), {"p": "not a record", "c": 0, "a": accounts[1]}
        )
        await asyncio.sleep(0.01)
        assert await holds.sweep_expired(now_ms=now_ms + 60_000) == 3
        assert (await read_outbox_backlog(cluster_client)).entries == 5

        assert await poster.drain_all() == 4
        assert await poster.claim_stale() == 0

        assert await read_outbox_backlog(cluster_client) == OutboxBacklog(0, 0, None)
        assert poster.stats.dead_lettered == 1
        assert poster.streams == outbox_keys()
        for account_id in accounts:
            state = await holds.account_state(account_id)
            assert (state.held_millicredits, state.pending_millicredits) == (0, 0)
        report = ReconciliationReport(since=date.today(), started_at=datetime.now(UTC))
        await check_redis(pool, cluster_client, report)
        assert report.mismatches == []
        assert report.counts["redisBalancesCompared"] == 3
    finally:
        await channel.close()
