"""Outbox entries Postgres refuses, or that cannot be read: isolated from their batch,
dead-lettered with their charge released from ``pending``, the rest of the batch posted."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest

from billing import ledger
from billing.metering import dead_letters
from billing.metering.backlog import OutboxBacklog, read_outbox_backlog
from billing.metering.dead_letters import ReplayOutcome
from billing.metering.holds import HoldStore
from billing.metering.outbox import STREAM_FIELDS, SettlementRecord
from billing.metering.posting import GROUP, SettlementPoster, dead_letter_id
from billing.metering.redis_keys import account_key, outbox_key, shard_of
from tests.billing.money import grant, new_account, usage_record

TOKENS_10_12 = 10**12


@pytest.fixture
async def poster(holds: HoldStore, pool: asyncpg.Pool) -> AsyncIterator[SettlementPoster]:
    poster = SettlementPoster(holds, pool, consumer="t1", claim_idle_ms=50)
    await poster.ensure_group()
    yield poster


def _outbox(account_id: int) -> str:
    return outbox_key(shard_of(account_id))


def _letter_id(account_id: int, entry_id: str) -> str:
    """The dead letter's id of an entry of the account's shard's stream."""
    return dead_letter_id(_outbox(account_id), entry_id)


async def _append(holds: HoldStore, record: SettlementRecord | str, *, account_id: int) -> str:
    """Append an entry as settle.lua does (to the account's shard's stream), its charge added
    to the account's ``pending``; the entry's id."""
    payload = record if isinstance(record, str) else _payload(record)
    charged = 300 if isinstance(record, str) else record.cost_millicredits
    entry_id: str = await holds.redis.xadd(
        _outbox(account_id),
        {
            STREAM_FIELDS.record: payload,
            STREAM_FIELDS.charged_millicredits: charged,
            STREAM_FIELDS.account_id: account_id,
        },
    )
    await holds.redis.hincrby(account_key(account_id), "pending", charged)
    return entry_id


def _payload(record: SettlementRecord) -> str:
    """``record.to_json()``, for counts orjson cannot write too (beyond 64 bits)."""
    return json.dumps(list(record), separators=(",", ":"))


def _tokens(record: SettlementRecord, prompt_tokens: int) -> SettlementRecord:
    return record._replace(prompt_tokens=prompt_tokens, completion_tokens=prompt_tokens)


async def _letters(pool: asyncpg.Pool) -> list[dead_letters.DeadLetter]:
    async with pool.acquire() as conn:
        return await dead_letters.list_dead_letters(conn, include_replayed=True)


async def _pending(holds: HoldStore, account_id: int) -> int:
    return (await holds.account_state(account_id)).pending_millicredits


async def test_poster_posts_a_record_of_10_to_the_12_tokens(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    record = usage_record(request_id="huge", account_id=account_id, cost_millicredits=5_000)
    await _append(holds, _tokens(record, TOKENS_10_12), account_id=account_id)

    assert await poster.drain_all() == 1

    async with pool.acquire() as conn:
        tokens = await conn.fetchrow(
            "SELECT prompt_tokens, completion_tokens FROM usage_events WHERE request_id = 'huge'"
        )
    assert tuple(tokens) == (TOKENS_10_12, TOKENS_10_12)
    assert await _pending(holds, account_id) == 0
    assert await _letters(pool) == []


async def test_poster_dead_letters_refused_records_and_posts_the_rest_of_the_batch(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster, caplog: pytest.LogCaptureFixture
) -> None:
    """One batch: good settlements of two accounts around a count no bigint holds and a
    record naming an account Postgres does not know. Before the fix the whole batch failed
    on every retry and nothing was posted."""
    first, second = await new_account(pool), await new_account(pool)
    for account_id in (first, second):
        await grant(pool, account_id, 10_000, holds=holds)
    unknown_account = second + 1_000
    good = [
        usage_record(request_id=f"good-{i}", account_id=account_id, cost_millicredits=100)
        for i, account_id in enumerate((first, second, first, second, first))
    ]
    too_big = _tokens(
        usage_record(request_id="too-big", account_id=first, cost_millicredits=700), 10**20
    )
    stranger = usage_record(
        request_id="stranger", account_id=unknown_account, cost_millicredits=900
    )
    too_big_id = stranger_id = ""
    for record in (*good[:2], too_big, *good[2:4], stranger, good[4]):
        entry_id = await _append(holds, record, account_id=record.account_id)
        letter_id = _letter_id(record.account_id, entry_id)
        too_big_id = letter_id if record is too_big else too_big_id
        stranger_id = letter_id if record is stranger else stranger_id

    with caplog.at_level(logging.ERROR):
        assert await poster.drain_all() == 5

    assert (await ledger.posted_balance(pool, first)).balance_millicredits == 10_000 - 300
    assert (await ledger.posted_balance(pool, second)).balance_millicredits == 10_000 - 200
    for account_id in (first, second, unknown_account):
        assert await _pending(holds, account_id) == 0
    assert await read_outbox_backlog(holds.redis) == OutboxBacklog(0, 0, None)
    letters = {letter.stream_entry_id: letter for letter in await _letters(pool)}
    assert set(letters) == {too_big_id, stranger_id}
    assert letters[too_big_id].request_id == "too-big"
    assert (letters[too_big_id].account_id, letters[too_big_id].charged_millicredits) == (
        first,
        700,
    )
    assert letters[too_big_id].payload == _payload(too_big)
    assert "out of range" in letters[too_big_id].error
    assert letters[stranger_id].request_id == "stranger"
    assert str(unknown_account) in letters[stranger_id].error
    assert poster.stats.dead_lettered == 2
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("too-big" in m and too_big_id in m and "out of range" in m for m in logged)


@pytest.mark.parametrize(
    "fields",
    [
        {"p": '{"not": "a settlement record"}', "c": "300", "a": "{account}"},
        {"p": '["cut short', "c": "300", "a": "{account}"},
        {"p": "[]", "c": "not a number", "a": "{account}"},
        {"c": "300", "a": "{account}"},
    ],
    ids=["object", "truncated", "charge", "no-record"],
)
async def test_poster_dead_letters_an_unreadable_entry_and_releases_its_charge(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster, fields: dict[str, str]
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    entry = {name: value.replace("{account}", str(account_id)) for name, value in fields.items()}
    entry_id = await holds.redis.xadd(_outbox(account_id), entry)
    await holds.redis.hincrby(account_key(account_id), "pending", 300)

    assert await poster.drain_all() == 0

    (letter,) = await _letters(pool)
    assert (letter.stream_entry_id, letter.account_id) == (
        _letter_id(account_id, entry_id),
        account_id,
    )
    assert letter.request_id is None
    assert letter.payload == entry.get("p", orjson.dumps(entry).decode())
    assert letter.error.startswith("unreadable outbox entry")
    released = 0 if entry["c"] == "not a number" else 300
    assert await _pending(holds, account_id) == 300 - released
    assert await holds.redis.xlen(_outbox(account_id)) == 0
    assert (poster.stats.unreadable, poster.stats.dead_lettered) == (1, 1)


async def test_dead_letter_twice_releases_pending_once(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    """A poster that crashed after the script met the entry again: one row, one release."""
    account_id = await new_account(pool)
    record = usage_record(request_id="twice", account_id=account_id, cost_millicredits=400)
    await _append(holds, record, account_id=account_id)
    await holds.redis.hincrby(account_key(account_id), "pending", 1_000)  # other settlements
    reply = await holds.redis.xreadgroup(GROUP, "t1", {_outbox(account_id): ">"})
    ((entry_id, fields),) = reply[0][1]

    await poster.dead_letter(entry_id, fields, "refused", stream=_outbox(account_id))
    await poster.dead_letter(entry_id, fields, "refused", stream=_outbox(account_id))

    assert len(await _letters(pool)) == 1
    assert await _pending(holds, account_id) == 1_000


async def test_dead_letter_without_postgres_releases_nothing(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    """The row is written before the charge is released: with Postgres unreachable the
    entry stays pending with its charge, and Postgres unreachable never dead-letters."""
    account_id = await new_account(pool)
    record = usage_record(request_id="unreached", account_id=account_id, cost_millicredits=400)
    entry_id = await _append(holds, record, account_id=account_id)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unreachable = await asyncpg.create_pool(f"postgresql://127.0.0.1:{port}/none", min_size=0)
    cut_off = SettlementPoster(holds, unreachable, consumer="t1")
    try:
        with pytest.raises(OSError):
            await cut_off.drain_all()
        ((_, fields),) = await holds.redis.xrange(_outbox(account_id))
        with pytest.raises(OSError):
            await cut_off.dead_letter(entry_id, fields, "refused", stream=_outbox(account_id))
    finally:
        await unreachable.close()

    assert await _pending(holds, account_id) == 400
    assert (await holds.redis.xpending(_outbox(account_id), GROUP))["pending"] == 1
    assert await _letters(pool) == []
    assert cut_off.stats.dead_lettered == 0


async def test_replay_posts_a_dead_letter_once_its_account_exists(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    account_id = await new_account(pool) + 1  # the next account's id, not created yet
    record = usage_record(request_id="early", account_id=account_id, cost_millicredits=400)
    entry_id = _letter_id(account_id, await _append(holds, record, account_id=account_id))
    await poster.drain_all()
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError):
            await dead_letters.replay_dead_letter(conn, entry_id)
        assert await new_account(pool) == account_id
        await grant(pool, account_id, 10_000)

        first = await dead_letters.replay_dead_letter(conn, entry_id)
        again = await dead_letters.replay_dead_letter(conn, entry_id)

    assert first.outcome is ReplayOutcome.POSTED
    assert first.posting is not None and first.posting.charged_millicredits == 400
    assert first.dead_letter.replayed_at is not None
    assert again.outcome is ReplayOutcome.ALREADY_REPLAYED
    assert (await ledger.posted_balance(pool, account_id)).balance_millicredits == 10_000 - 400


@pytest.mark.parametrize(
    ("fields", "released"),
    [
        ({"p": b'["req-\xff",{account},1]', "c": b"300", "a": b"{account}"}, 300),
        ({b"p\xfe": b"[]", "c": b"300", "a": b"{account}"}, 300),
        ({"p": b'["no-account",{account},1]', "c": b"300"}, 0),
        ({"p": b'["negative",{account},1]', "c": b"-300", "a": b"{account}"}, 0),
        ({"p": b'["other",{other},1]', "c": b"300", "a": b"{account}"}, 300),
    ],
    ids=["not-utf-8", "field-name-not-utf-8", "no-account", "negative-charge", "other-account"],
)
async def test_poster_dead_letters_an_undecodable_or_inconsistent_entry_and_goes_on(
    holds: HoldStore,
    pool: asyncpg.Pool,
    poster: SettlementPoster,
    fields: dict[str | bytes, bytes],
    released: int,
) -> None:
    """Before the fix, bytes that are not UTF-8 failed every read of the stream (nothing after
    them was ever posted), and an entry whose record names another account was posted to
    that account and never acknowledged."""
    account_id, other = await new_account(pool), await new_account(pool)
    for owner in (account_id, other):
        await grant(pool, owner, 10_000, holds=holds)
    values = {b"{account}": str(account_id).encode(), b"{other}": str(other).encode()}
    entry = {}
    for name, value in fields.items():
        for placeholder, number in values.items():
            value = value.replace(placeholder, number)
        entry[name] = value
    entry_id = await holds.redis.xadd(_outbox(account_id), entry)
    await holds.redis.hincrby(account_key(account_id), "pending", 300)
    good = usage_record(request_id="after", account_id=account_id, cost_millicredits=100)
    await _append(holds, good, account_id=account_id)

    assert await poster.drain_all() == 1

    (letter,) = await _letters(pool)
    assert letter.stream_entry_id == _letter_id(account_id, entry_id)
    assert letter.error.startswith("unreadable outbox entry")
    assert "\ufffd" not in letter.payload
    if "not-utf-8" in letter.error or b"\xff" in entry.get("p", b""):
        assert "\\xff" in letter.payload
    assert await _pending(holds, account_id) == 300 - released
    assert await _pending(holds, other) == 0
    assert (await ledger.posted_balance(pool, account_id)).balance_millicredits == 10_000 - 100
    assert (await ledger.posted_balance(pool, other)).balance_millicredits == 10_000
    assert await holds.redis.xlen(_outbox(account_id)) == 0
    assert (await holds.redis.xpending(_outbox(account_id), GROUP))["pending"] == 0


async def test_entries_of_two_shards_with_one_id_are_two_dead_letters(
    holds: HoldStore, pool: asyncpg.Pool, poster: SettlementPoster
) -> None:
    """Each shard's stream numbers its entries by its own clock, so two streams can give two
    entries one id; the dead letters are named by shard and entry, and both are kept (named
    by the bare id, the second would have been dropped as a repeat of the first)."""
    first, second = await new_account(pool), await new_account(pool)
    assert shard_of(first) != shard_of(second)
    for account_id in (first, second):
        entry = {"p": "not a record", "c": "300", "a": str(account_id)}
        assert await holds.redis.xadd(_outbox(account_id), entry, id="1-1") == "1-1"
        await holds.redis.hincrby(account_key(account_id), "pending", 300)

    assert await poster.drain_all() == 0

    letters = {letter.stream_entry_id: letter.account_id for letter in await _letters(pool)}
    assert letters == {_letter_id(first, "1-1"): first, _letter_id(second, "1-1"): second}
    assert _letter_id(first, "1-1") == f"s{shard_of(first):02d}/1-1"
    for account_id in (first, second):
        assert await _pending(holds, account_id) == 0
