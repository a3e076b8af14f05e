"""The settlement poster: outbox stream -> Postgres, acknowledged after commit, crash-safe."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from billing import ledger
from billing.ledger import PostedBalance
from billing.metering import holds as holds_module
from billing.metering import outbox, posting, rescue
from billing.metering.backlog import OutboxBacklog, read_outbox_backlog
from billing.metering.holds import HoldStore
from billing.metering.posting import GROUP, SettlementPoster, dead_letter_id
from billing.metering.redis_keys import (
    LEGACY_OUTBOX_KEY,
    account_key,
    outbox_key,
    outbox_keys,
    shard_of,
)
from billing.metering.rescue import LostSettlement, SettlementRescue
from billing.metering.script_channel import ScriptChannel
from devtools.localservices import free_port
from tests.billing.money import (
    grant,
    money_totals,
    new_account,
    raw_entries,
    reserve_and_settle,
    usage_payload,
    usage_record,
)

CLAIM_IDLE_MS = 50


@pytest.fixture(params=["redis-py", "reader-channel"])
async def poster(
    request: pytest.FixtureRequest, holds: HoldStore, pool: asyncpg.Pool, redis_url: str
) -> AsyncIterator[SettlementPoster]:
    """The poster, reading new entries through redis-py or (as the gateway does) through a
    pipelined channel of its own: every test runs on both."""
    reader = (
        ScriptChannel(redis_url, decode_responses=False)
        if request.param == "reader-channel"
        else None
    )
    poster = SettlementPoster(
        holds, pool, consumer="t1", claim_idle_ms=CLAIM_IDLE_MS, reader=reader
    )
    await poster.ensure_group()
    yield poster
    if reader is not None:
        await reader.close()


async def _posted(pool: asyncpg.Pool, account_id: int) -> PostedBalance:
    return await ledger.posted_balance(pool, account_id)


def _outbox(account_id: int) -> str:
    return outbox_key(shard_of(account_id))


async def _group_pending(holds: HoldStore) -> int:
    """Entries read and not acknowledged, in every outbox stream."""
    return (await read_outbox_backlog(holds.redis)).pending


async def _assert_converged(holds: HoldStore, pool: asyncpg.Pool, account_id: int) -> None:
    """After a drain: nothing pending, and Redis holds exactly Postgres's (balance, version)."""
    state = await holds.account_state(account_id)
    posted = await _posted(pool, account_id)
    assert state.pending_millicredits == 0
    assert (state.balance_millicredits, state.version) == (
        posted.balance_millicredits,
        posted.version,
    )
    async with pool.acquire() as conn:
        assert await ledger.ledger_sum_matches_balance(conn, account_id)
    charged, deducted = await money_totals(pool)
    assert charged == -deducted


async def _commit_without_ack(
    pool: asyncpg.Pool, entries: list[tuple[str, dict[str, Any]]]
) -> None:
    """What a poster does before it crashes between its commit and its acknowledgement."""
    record, charged, _account = outbox.STREAM_FIELDS
    rows = [
        outbox.posting_row(fields[record], charged_millicredits=int(fields[charged]))
        for _entry_id, fields in entries
    ]
    async with pool.acquire() as conn:
        await posting.post_settlements(conn, "[" + ",".join(rows) + "]")


async def test_poster_posts_settlements_and_acks(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    charges = [
        await reserve_and_settle(
            holds, account_id, request_id=f"r{i}", hold_millicredits=2_000, cost_millicredits=cost
        )
        for i, cost in enumerate((1_500, 2_500, 0))
    ]
    assert charges == [1_500, 2_500, 0]
    assert (await holds.account_state(account_id)).pending_millicredits == 4_000

    assert await poster.drain_all() == 3

    posted = await _posted(pool, account_id)
    assert posted.balance_millicredits == 6_000
    await _assert_converged(holds, pool, account_id)
    assert await holds.redis.xlen(_outbox(account_id)) == 0
    assert await _group_pending(holds) == 0
    assert (poster.stats.posted, poster.stats.duplicates) == (3, 0)
    assert poster.stats.charged_millicredits == 4_000
    async with pool.acquire() as conn:
        usage = await conn.fetch(
            "SELECT request_id, charged_millicredits FROM usage_events ORDER BY request_id"
        )
    assert [tuple(r) for r in usage] == [("r0", 1_500), ("r1", 2_500), ("r2", 0)]


async def test_poster_batches_of_many_accounts(holds: HoldStore, pool: asyncpg.Pool) -> None:
    poster = SettlementPoster(holds, pool, consumer="t1", batch_size=4)
    accounts = [await new_account(pool) for _ in range(3)]
    for account_id in accounts:
        await grant(pool, account_id, 5_000, holds=holds)
    for i in range(15):
        await reserve_and_settle(
            holds,
            accounts[i % 3],
            request_id=f"r{i}",
            hold_millicredits=300,
            cost_millicredits=100 + i,
        )

    assert await poster.drain_all() == 15

    for account_id in accounts:
        await _assert_converged(holds, pool, account_id)
    assert poster.stats.batches == 4


async def test_poster_redelivery_after_commit_before_ack_charges_once(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    for i in range(3):
        await reserve_and_settle(
            holds, account_id, request_id=f"r{i}", hold_millicredits=1_000, cost_millicredits=900
        )
    # Poster t1 reads the batch, commits it, and dies before acknowledging.
    reply = await holds.redis.xreadgroup(GROUP, "t1", {_outbox(account_id): ">"}, count=10)
    await _commit_without_ack(pool, reply[0][1])
    assert (await _posted(pool, account_id)).balance_millicredits == 7_300
    assert (await holds.account_state(account_id)).pending_millicredits == 2_700

    # t1 restarts and finds its unacknowledged entries.
    assert await poster.drain_all() == 3

    assert (poster.stats.posted, poster.stats.duplicates) == (0, 3)
    assert (await _posted(pool, account_id)).balance_millicredits == 7_300
    await _assert_converged(holds, pool, account_id)
    # Pending came back to zero once: a further drain finds nothing to release twice.
    assert await poster.drain_all() == 0
    assert (await holds.account_state(account_id)).pending_millicredits == 0
    assert await _group_pending(holds) == 0


async def test_poster_claims_entries_of_dead_consumer(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    for i in range(4):
        await reserve_and_settle(
            holds, account_id, request_id=f"r{i}", hold_millicredits=1_000, cost_millicredits=750
        )
    reply = await holds.redis.xreadgroup(GROUP, "dead", {_outbox(account_id): ">"}, count=10)
    assert len(reply[0][1]) == 4

    # t1 sees nothing new: the entries belong to the dead consumer until they go stale.
    assert await poster.drain_all() == 0
    assert (await _posted(pool, account_id)).balance_millicredits == 10_000
    await asyncio.sleep(CLAIM_IDLE_MS * 3 / 1000)

    assert await poster.claim_stale() == 4

    assert (await _posted(pool, account_id)).balance_millicredits == 7_000
    await _assert_converged(holds, pool, account_id)
    assert await _group_pending(holds) == 0
    assert await poster.claim_stale() == 0


async def test_poster_claims_entries_of_dead_consumer_after_its_commit(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    for i in range(2):
        await reserve_and_settle(
            holds, account_id, request_id=f"r{i}", hold_millicredits=1_000, cost_millicredits=600
        )
    reply = await holds.redis.xreadgroup(GROUP, "dead", {_outbox(account_id): ">"}, count=10)
    await _commit_without_ack(pool, reply[0][1])
    await asyncio.sleep(CLAIM_IDLE_MS * 3 / 1000)

    assert await poster.claim_stale() == 2

    assert poster.stats.duplicates == 2
    assert (await _posted(pool, account_id)).balance_millicredits == 8_800
    await _assert_converged(holds, pool, account_id)


async def test_slow_poster_posting_claimed_entries_releases_pending_once(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    for i in range(2):
        await reserve_and_settle(
            holds, account_id, request_id=f"r{i}", hold_millicredits=1_000, cost_millicredits=1_000
        )
    slow = SettlementPoster(holds, pool, consumer="slow")
    reply = await holds.redis.xreadgroup(GROUP, "slow", {_outbox(account_id): ">"}, count=10)
    await asyncio.sleep(CLAIM_IDLE_MS * 3 / 1000)
    assert await poster.claim_stale() == 2  # t1 takes over and posts them

    await slow.post(
        _outbox(account_id), raw_entries(reply[0][1])
    )  # the slow poster wakes up and posts what it had read

    assert slow.stats.duplicates == 2
    assert (await _posted(pool, account_id)).balance_millicredits == 8_000
    await _assert_converged(holds, pool, account_id)


async def test_drain_all_posts_every_own_unacked_entry(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    """A restarted poster owns more unacknowledged entries than one batch holds."""
    poster = SettlementPoster(holds, pool, consumer="t1", batch_size=2)
    await poster.ensure_group()
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    for i in range(5):
        await reserve_and_settle(
            holds, account_id, request_id=f"r{i}", hold_millicredits=1_000, cost_millicredits=500
        )
    # t1 read all five and died before posting anything.
    await holds.redis.xreadgroup(GROUP, "t1", {_outbox(account_id): ">"}, count=10)

    assert await poster.drain_all() == 5

    assert (await _posted(pool, account_id)).balance_millicredits == 7_500
    await _assert_converged(holds, pool, account_id)
    assert await _group_pending(holds) == 0


async def test_purchase_interleaved_with_settlements_converges(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 5_000, holds=holds)
    await reserve_and_settle(
        holds, account_id, request_id="r0", hold_millicredits=2_000, cost_millicredits=1_200
    )
    await holds.reserve(account_id, 1_000, request_id="r1")
    stale = await _posted(pool, account_id)

    # A purchase posts and tells Redis while r0 is still only in the outbox.
    purchase = await grant(pool, account_id, 9_990, holds=holds)
    state = await holds.account_state(account_id)
    assert (state.balance_millicredits, state.version) == (14_990, purchase.version)
    assert state.available_millicredits == 14_990 - 1_000 - 1_200

    await poster.drain_all()
    await holds.settle(
        account_id,
        request_id="r1",
        cost_millicredits=800,
        payload=usage_payload(request_id="r1", account_id=account_id, cost_millicredits=800),
    )
    await grant(pool, account_id, 100, holds=holds)
    # A reload read before the purchase arrives late: ignored, it is older.
    assert not await holds.sync_balance(account_id, stale)
    await poster.drain_all()

    posted = await _posted(pool, account_id)
    assert posted.balance_millicredits == 5_000 - 1_200 + 9_990 - 800 + 100
    await _assert_converged(holds, pool, account_id)
    assert (await holds.account_state(account_id)).available_millicredits == (
        posted.balance_millicredits
    )


async def test_purchase_between_commit_and_ack_does_not_undercharge(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    await reserve_and_settle(
        holds, account_id, request_id="a", hold_millicredits=5_000, cost_millicredits=5_000
    )
    await holds.reserve(account_id, 5_000, request_id="b")
    # A poster commits "a" (Postgres 5,000 at version 2) and dies before acknowledging it.
    reply = await holds.redis.xreadgroup(GROUP, "dead", {_outbox(account_id): ">"}, count=10)
    await _commit_without_ack(pool, reply[0][1])
    # A purchase lands meanwhile and tells Redis its (balance, version): 6,000 at version 3,
    # which already has "a" taken off, while Redis's pending still holds "a" too.
    await grant(pool, account_id, 1_000, holds=holds)

    # Truly free: 6,000 posted - 5,000 held for "b" - nothing unposted = 1,000. Until the ack,
    # Redis counts "a" twice (in the synced balance and in pending): a conservative view that
    # may refuse a new hold for that window, but must not undercharge "b".
    assert (await holds.account_state(account_id)).available_millicredits == 1_000 - 5_000
    b = await holds.settle(
        account_id,
        request_id="b",
        cost_millicredits=5_000,
        payload=usage_payload(request_id="b", account_id=account_id, cost_millicredits=5_000),
    )
    assert b.charged_millicredits == 5_000  # the balance covers it and the hold was for it
    await asyncio.sleep(CLAIM_IDLE_MS * 3 / 1000)
    await poster.claim_stale()
    await poster.drain_all()
    assert (await _posted(pool, account_id)).balance_millicredits == 1_000
    await _assert_converged(holds, pool, account_id)


async def test_settle_twice_charges_once(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    """A settle sent again because its reply was lost (the first did run): the repeat answers
    the first settlement and changes nothing, so `pending` and the outbox count it once."""
    account_id = await new_account(pool)
    await grant(pool, account_id, 1_000, holds=holds)
    await holds.reserve(account_id, 600, request_id="r1")
    payload = usage_payload(request_id="r1", account_id=account_id, cost_millicredits=500)
    first = await holds.settle(account_id, request_id="r1", cost_millicredits=500, payload=payload)
    repeat = await holds.settle(account_id, request_id="r1", cost_millicredits=500, payload=payload)
    assert repeat == first
    assert (first.charged_millicredits, first.hold_millicredits) == (500, 600)
    assert await holds.redis.xlen(_outbox(account_id)) == 1
    assert (await holds.account_state(account_id)).pending_millicredits == 500
    await poster.drain_all()
    # Posted: a repeat now (its entry acknowledged and deleted) still changes nothing.
    assert (
        await holds.settle(account_id, request_id="r1", cost_millicredits=500, payload=payload)
        == first
    )
    assert await holds.redis.xlen(_outbox(account_id)) == 0
    await _assert_converged(holds, pool, account_id)
    assert (await _posted(pool, account_id)).balance_millicredits == 500


async def test_repeat_after_its_marker_expired_posted_before_original_does_not_undercharge(
    redis_client: aioredis.Redis, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    """Past the marker's life (or after Redis lost its data) a repeat appends a second entry;
    Postgres keeps one settlement per request id and the acks release both pendings."""
    holds = HoldStore(
        redis_client,
        lambda account_id: ledger.posted_balance(pool, account_id),
        settled_marker_ttl_s=0.05,
    )
    account_id = await new_account(pool)
    await grant(pool, account_id, 1_000, holds=holds)
    first = await reserve_and_settle(
        holds, account_id, request_id="r1", hold_millicredits=600, cost_millicredits=600
    )
    await asyncio.sleep(0.1)
    # Not capped against Redis's view, which still counts the first charge.
    repeat = await holds.settle(
        account_id,
        request_id="r1",
        cost_millicredits=600,
        payload=usage_payload(request_id="r1", account_id=account_id, cost_millicredits=600),
    )
    assert (first, repeat.charged_millicredits) == (600, 600)
    # A poster reads the original entry and dies; a healthy poster posts the repeat first.
    await holds.redis.xreadgroup(GROUP, "dead", {_outbox(account_id): ">"}, count=1)
    await poster.drain_all()
    await asyncio.sleep(CLAIM_IDLE_MS * 3 / 1000)
    await poster.claim_stale()

    await _assert_converged(holds, pool, account_id)
    async with pool.acquire() as conn:
        charged = await conn.fetchval(
            "SELECT charged_millicredits FROM usage_events WHERE request_id = 'r1'"
        )
    assert charged == 600  # what the first settle charged, and the balance covered
    assert (await _posted(pool, account_id)).balance_millicredits == 400


async def test_poster_posts_each_record_as_written_in_one_batch(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    """Entries appended to the outbox as the settle script does are posted in one batch,
    every usage row as its record said."""
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    records = [
        usage_record(request_id=f"mixed-{i}", account_id=account_id, cost_millicredits=100 * i)
        for i in range(1, 5)
    ]
    names = outbox.STREAM_FIELDS
    for record in records:
        fields = {
            names.record: record.to_json(),
            names.charged_millicredits: record.cost_millicredits,
            names.account_id: account_id,
        }
        await holds.redis.xadd(_outbox(account_id), fields)
        await holds.redis.hincrby(account_key(account_id), "pending", record.cost_millicredits)
    assert await poster.drain_all() == 4
    assert poster.stats.batches == 1
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT request_id, cost_millicredits, charged_millicredits, prompt_tokens,
                      completion_tokens, output_millicredits_per_1k_tokens, usage_source
                 FROM usage_events WHERE account_id = $1 ORDER BY request_id""",
            account_id,
        )
    assert [tuple(r) for r in rows] == [
        (r.request_id, r.cost_millicredits, r.cost_millicredits, 100, 50, 9_600, "upstream")
        for r in records
    ]
    assert (await _posted(pool, account_id)).balance_millicredits == 10_000 - 1_000
    await _assert_converged(holds, pool, account_id)


async def test_poster_dead_letters_an_unreadable_entry_and_posts_the_rest(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster, caplog
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    bad_id = await holds.redis.xadd(
        _outbox(account_id), {"p": '{"not": "a settlement record"}', "c": 300, "a": account_id}
    )
    await reserve_and_settle(
        holds, account_id, request_id="good", hold_millicredits=1_000, cost_millicredits=400
    )
    assert await poster.drain_all() == 1
    assert (poster.stats.unreadable, poster.stats.dead_lettered) == (1, 1)
    assert (await _posted(pool, account_id)).balance_millicredits == 10_000 - 400
    assert await _group_pending(holds) == 0
    async with pool.acquire() as conn:
        dead = await conn.fetchval("SELECT stream_entry_id FROM settlement_dead_letters")
    assert dead == dead_letter_id(_outbox(account_id), bad_id)
    assert any("dead-lettered" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


# -- the settlement rescue (a settle whose reply was lost) ---------------------------------


async def _lost(holds: HoldStore, account_id: int, *, cost: int = 500) -> LostSettlement:
    await holds.reserve(account_id, 600, request_id="lost")
    payload = usage_payload(request_id="lost", account_id=account_id, cost_millicredits=cost)
    return LostSettlement(account_id, "lost", cost, payload, lost_at=0.0)


@pytest.mark.parametrize("first_ran", [True, False], ids=["ran", "did-not-run"])
async def test_rescue_resends_a_lost_settle_and_charges_once(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster, first_ran: bool
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 1_000, holds=holds)
    lost = await _lost(holds, account_id)
    if first_ran:  # the script ran; only its reply was lost
        await holds.settle(
            account_id, request_id="lost", cost_millicredits=500, payload=lost.payload
        )
    rescue = SettlementRescue(holds, pool)
    rescue.settle_later(account_id, request_id="lost", cost_millicredits=500, payload=lost.payload)
    await rescue.retry_once()
    assert rescue.outstanding == 0
    assert await holds.redis.xlen(_outbox(account_id)) == 1
    state = await holds.account_state(account_id)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 500)
    await poster.drain_all()
    await _assert_converged(holds, pool, account_id)
    assert (await _posted(pool, account_id)).balance_millicredits == 500


@pytest.mark.parametrize("first_ran", [True, False], ids=["ran", "did-not-run"])
async def test_rescue_posted_directly_releases_the_hold_and_charges_once(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster, first_ran: bool
) -> None:
    """Redis did not answer for ``post_after_s``: the record goes to Postgres; once Redis
    answers the hold is voided and the cached balance reloaded. If the first settle did run
    after all, its outbox entry is a duplicate there."""
    account_id = await new_account(pool)
    await grant(pool, account_id, 1_000, holds=holds)
    lost = await _lost(holds, account_id)
    if first_ran:
        await holds.settle(
            account_id, request_id="lost", cost_millicredits=500, payload=lost.payload
        )
    rescue = SettlementRescue(holds, pool)
    assert await rescue.post_directly([lost])
    assert (await _posted(pool, account_id)).balance_millicredits == 500
    await rescue.retry_once()  # Redis answers again: void, after reloading the balance
    assert rescue.outstanding == 0
    await poster.drain_all()
    await _assert_converged(holds, pool, account_id)
    state = await holds.account_state(account_id)
    assert (state.held_millicredits, state.available_millicredits) == (0, 500)
    assert (await _posted(pool, account_id)).balance_millicredits == 500


async def test_rescue_with_redis_down_posts_to_postgres_after_its_limit(
    pool: asyncpg.Pool,
) -> None:
    dead = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True)
    holds = HoldStore(dead, lambda account_id: ledger.posted_balance(pool, account_id))
    account_id = await new_account(pool)
    await grant(pool, account_id, 1_000)
    payload = usage_payload(request_id="lost", account_id=account_id, cost_millicredits=500)
    rescue = SettlementRescue(holds, pool, retry_interval_s=0.01, post_after_s=0.0)
    task = asyncio.create_task(rescue.run())
    try:
        rescue.settle_later(account_id, request_id="lost", cost_millicredits=500, payload=payload)
        for _ in range(500):
            if rescue.stats.posted_directly:
                break
            await asyncio.sleep(0.01)
        assert rescue.stats.posted_directly == 1
        assert rescue.outstanding == 1  # the hold's void waits for Redis
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await dead.aclose()
    assert (await _posted(pool, account_id)).balance_millicredits == 500


def test_rescue_gives_up_on_redis_while_a_repeat_still_finds_the_marker() -> None:
    """The rescue sends a settle to Redis for at most POST_AFTER_S (plus one retry wait and
    one timeout), then posts to Postgres: every repeat it sends must find the marker."""
    assert rescue.POST_AFTER_S + 5.0 + 5.0 < holds_module.SETTLED_MARKER_TTL_S


# -- shards and the v1 stream -------------------------------------------------------------


async def test_poster_posts_settlements_of_accounts_on_different_shards(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    """Each settle goes to its account's shard's stream; one read of every shard posts both,
    in one batch (one Postgres statement)."""
    first, second = await new_account(pool), await new_account(pool)
    assert shard_of(first) != shard_of(second)
    for account_id in (first, second):
        await grant(pool, account_id, 10_000, holds=holds)
        await reserve_and_settle(
            holds,
            account_id,
            request_id=f"r{account_id}",
            hold_millicredits=900,
            cost_millicredits=700,
        )
        assert await holds.redis.xlen(_outbox(account_id)) == 1

    assert await poster.drain_once() == 2

    assert poster.stats.batches == 1
    for account_id in (first, second):
        assert (await _posted(pool, account_id)).balance_millicredits == 10_000 - 700
        await _assert_converged(holds, pool, account_id)
        assert await holds.redis.xlen(_outbox(account_id)) == 0
    assert (await read_outbox_backlog(holds.redis)).entries == 0


async def _append_v1(holds: HoldStore, account_id: int, request_id: str, cost: int) -> str:
    """An entry as a v1 fleet's settle.lua appended it to the single stream."""
    entry_id: str = await holds.redis.xadd(
        LEGACY_OUTBOX_KEY,
        {
            "p": usage_payload(
                request_id=request_id, account_id=account_id, cost_millicredits=cost
            ),
            "c": cost,
            "a": account_id,
        },
    )
    return entry_id


async def test_poster_drains_the_v1_stream_once_then_stops_reading_it(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    """After an upgrade: the v1 stream's entries are posted once, those its old posters read
    and never acknowledged included (claimed when idle), one of them already committed by
    its old poster; then the stream is left alone. Their charges were never in a v2
    ``pending``, which stays as the v2 settlements make it."""
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    await holds.redis.xgroup_create(LEGACY_OUTBOX_KEY, GROUP, id="0", mkstream=True)
    for i in range(3):
        await _append_v1(holds, account_id, f"v1-{i}", 100 * (i + 1))
    # An old poster read two entries, committed the first, and the fleet was stopped.
    reply = await holds.redis.xreadgroup(GROUP, "old-host", {LEGACY_OUTBOX_KEY: ">"}, count=2)
    await _commit_without_ack(pool, reply[0][1][:1])
    await _append_v1(holds, account_id, "v1-3", 400)
    await reserve_and_settle(
        holds, account_id, request_id="v2", hold_millicredits=1_000, cost_millicredits=1_000
    )
    poster = SettlementPoster(holds, pool, consumer="new-host", claim_idle_ms=CLAIM_IDLE_MS)
    assert LEGACY_OUTBOX_KEY in poster.streams

    assert await poster.drain_all() == 3  # v1-2, v1-3 and v2; the old poster's wait
    assert LEGACY_OUTBOX_KEY in poster.streams
    await asyncio.sleep(CLAIM_IDLE_MS * 3 / 1000)
    assert await poster.claim_stale() == 2
    assert await poster.drain_once() == 0

    assert LEGACY_OUTBOX_KEY not in poster.streams
    assert poster.streams == outbox_keys()
    assert (poster.stats.posted, poster.stats.duplicates) == (4, 1)
    assert (await _posted(pool, account_id)).balance_millicredits == 10_000 - 2_000
    await _assert_converged(holds, pool, account_id)
    assert await holds.redis.xlen(LEGACY_OUTBOX_KEY) == 0
    assert await read_outbox_backlog(holds.redis) == OutboxBacklog(0, 0, None)
    async with pool.acquire() as conn:
        rows = await conn.fetchval(
            "SELECT count(*) FROM usage_events WHERE account_id = $1", account_id
        )
    assert rows == 5


async def test_poster_without_a_v1_stream_reads_only_the_shards(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    poster = SettlementPoster(holds, pool, consumer="t1")
    await poster.ensure_group()
    assert poster.streams == outbox_keys()
    assert not await holds.redis.exists(LEGACY_OUTBOX_KEY)
    assert all([await holds.redis.exists(stream) for stream in outbox_keys()])


async def test_idle_poster_wakes_on_a_settle_of_its_process(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    """Every shard empty: the poster waits for this process's next settle (or ``idle_s``, an
    hour here), not polling every shard's stream at a short interval."""
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    poster = SettlementPoster(holds, pool, consumer="t1", idle_s=3_600)
    task = asyncio.create_task(poster.run())
    try:
        while not await holds.redis.exists(_outbox(account_id)):  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the poster created the groups and found nothing
        await asyncio.sleep(0.05)
        await reserve_and_settle(
            holds, account_id, request_id="r1", hold_millicredits=900, cost_millicredits=700
        )
        async with asyncio.timeout(60):
            while poster.stats.posted == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert (await _posted(pool, account_id)).balance_millicredits == 10_000 - 700
