"""The Postgres ledger of record: idempotent entries, no balance below zero, append-only rows,
and settlement batches posted once per request id."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import asyncpg
import pytest

from billing import api_keys, ledger
from billing.errors import AccountNotFoundError, NegativeBalanceError
from billing.ledger import PostedBalance
from billing.metering import outbox, posting, rate_cards
from billing.metering.outbox import SettlementRecord
from tests.billing.money import grant, money_totals, new_account, usage_record


async def _entries(pool: asyncpg.Pool, account_id: int) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch(
            "SELECT * FROM ledger_entries WHERE account_id = $1 ORDER BY id", account_id
        )


Settlement = tuple[SettlementRecord, int]


def _settlement(account_id: int, request_id: str, cost: int, charged: int) -> Settlement:
    """A settlement as the poster reads it from the outbox: the record and what was charged."""
    record = usage_record(request_id=request_id, account_id=account_id, cost_millicredits=cost)
    return record, charged


def _batch(settlements: list[Settlement]) -> str:
    """The JSON batch the poster sends ``post_settlements``."""
    rows = [
        outbox.posting_row(record.to_json(), charged_millicredits=charged)
        for record, charged in settlements
    ]
    return "[" + ",".join(rows) + "]"


@dataclass(frozen=True, slots=True)
class _Posted:
    request_id: str
    account_id: int
    posted: bool
    charged_millicredits: int


async def _post_settlements(
    conn: asyncpg.Connection, settlements: list[Settlement]
) -> tuple[list[_Posted], dict[int, PostedBalance]]:
    """The SQL function the poster calls, with its answer per settlement (the poster sums
    it per account): what each settlement did, and each account's balance after."""
    rows = await conn.fetch("SELECT * FROM post_settlements($1::jsonb)", _batch(settlements))
    return (
        [_Posted(r[0], r[1], r[2], r[3]) for r in rows],
        {r[1]: PostedBalance(r[4], r[5], r[6]) for r in rows},
    )


# -- post_entry ---------------------------------------------------------------------------


async def test_post_entry_repeated_key_changes_nothing(pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    async with pool.acquire() as conn:
        first = await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="adjustment",
            amount_millicredits=5_000,
            idempotency_key="grant:once",
        )
        second = await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="adjustment",
            amount_millicredits=5_000,
            idempotency_key="grant:once",
        )
        balance = await ledger.posted_balance(conn, account_id)

    assert first.created and not second.created
    assert second.entry == first.entry
    assert balance.balance_millicredits == 5_000
    assert balance.version == first.posted.version == second.posted.version == 1
    assert len(await _entries(pool, account_id)) == 1


async def test_post_entry_concurrent_same_key_posts_once(pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)

    async def post() -> ledger.PostResult:
        async with pool.acquire() as conn:
            return await ledger.post_entry(
                conn,
                account_id=account_id,
                entry_type="purchase",
                amount_millicredits=9_990_000,
                idempotency_key="purchase:cs_test_race",
            )

    results = await asyncio.gather(*(post() for _ in range(10)))

    assert sum(r.created for r in results) == 1
    assert len({r.entry.id for r in results}) == 1
    async with pool.acquire() as conn:
        assert (await ledger.posted_balance(conn, account_id)).balance_millicredits == 9_990_000


async def test_post_entry_below_zero_raises_and_writes_nothing(pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    before = await grant(pool, account_id, 1_000)

    async with pool.acquire() as conn:
        with pytest.raises(NegativeBalanceError) as err:
            await ledger.post_entry(
                conn,
                account_id=account_id,
                entry_type="refund",
                amount_millicredits=-1_001,
                idempotency_key="refund:too-much",
            )
        after = await ledger.posted_balance(conn, account_id)
        key_used = await conn.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE idempotency_key = 'refund:too-much'"
        )

    assert err.value.balance_millicredits == 1_000
    assert err.value.amount_millicredits == -1_001
    assert after == before
    assert key_used == 0


async def test_post_entry_owe_takes_balance_and_records_shortfall(
    pool: asyncpg.Pool,
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 3_000)

    async with pool.acquire() as conn:
        result = await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="refund",
            amount_millicredits=-5_000,
            idempotency_key="refund:partial",
            rule=ledger.PostingRule.OWE,
        )
        again = await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="refund",
            amount_millicredits=-5_000,
            idempotency_key="refund:partial",
            rule=ledger.PostingRule.OWE,
        )
        balance = await ledger.posted_balance(conn, account_id)

    assert result.created
    assert result.entry.amount_millicredits == -3_000
    assert result.entry.balance_after_millicredits == 0
    assert result.shortfall_millicredits == 2_000
    assert balance == result.posted
    assert (balance.balance_millicredits, balance.shortfall_millicredits) == (0, 2_000)
    # The repeat neither takes more nor adds to the shortfall.
    assert not again.created
    assert again.posted == balance


async def test_post_entry_unknown_account_or_type_raises(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(AccountNotFoundError):
            await ledger.post_entry(
                conn,
                account_id=987_654,
                entry_type="adjustment",
                amount_millicredits=1,
                idempotency_key="grant:nobody",
            )
        with pytest.raises(ValueError, match="unknown ledger entry type"):
            await ledger.post_entry(
                conn,
                account_id=987_654,
                entry_type="gift",
                amount_millicredits=1,
                idempotency_key="grant:gift",
            )


async def test_post_entry_balance_after_is_running_balance(pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    amounts = [10_000, -2_500, 7, -7_507, 1_234, 0, -1]
    async with pool.acquire() as conn:
        for i, amount in enumerate(amounts):
            await ledger.post_entry(
                conn,
                account_id=account_id,
                entry_type="adjustment" if amount >= 0 else "reversal",
                amount_millicredits=amount,
                idempotency_key=f"step:{i}",
            )
        balance = await ledger.posted_balance(conn, account_id)
        assert await ledger.ledger_sum_matches_balance(conn, account_id)

    running = 0
    entries = await _entries(pool, account_id)
    for entry, amount in zip(entries, amounts, strict=True):
        running += amount
        assert entry["amount_millicredits"] == amount
        assert entry["balance_after_millicredits"] == running
    assert balance.balance_millicredits == running == 1_233
    assert balance.version == len(amounts)


# -- append-only ledger -------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entries SET amount_millicredits = amount_millicredits + 1",
        "UPDATE ledger_entries SET reference = 'edited'",
        "DELETE FROM ledger_entries",
        # Plain TRUNCATE already stops at purchases' foreign key; CASCADE reaches the trigger.
        "TRUNCATE ledger_entries CASCADE",
    ],
)
async def test_ledger_entries_rewrite_refused_even_for_owner(
    pool: asyncpg.Pool, statement: str
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 1_000)
    before = await _entries(pool, account_id)

    async with pool.acquire() as conn:
        # The tests connect as the superuser, who owns the table: only the trigger stops this.
        assert await conn.fetchval(
            "SELECT pg_get_userbyid(relowner) = current_user FROM pg_class "
            "WHERE relname = 'ledger_entries'"
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(statement)

    assert await _entries(pool, account_id) == before


async def test_app_role_may_read_and_append_ledger_only(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        privileges = {
            privilege: await conn.fetchval(
                "SELECT has_table_privilege('creditgate_app', 'ledger_entries', $1)", privilege
            )
            for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE")
        }
    assert privileges == {
        "SELECT": True,
        "INSERT": True,
        "UPDATE": False,
        "DELETE": False,
        "TRUNCATE": False,
    }


async def test_app_role_update_of_ledger_denied(pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE creditgate_app")
        result = await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="adjustment",
            amount_millicredits=500,
            idempotency_key="grant:as-app",
        )
        assert result.created
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            async with conn.transaction():
                await conn.execute("UPDATE ledger_entries SET amount_millicredits = 10")


async def test_accounts_balance_check_refuses_negative(pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "UPDATE accounts SET balance_millicredits = -1 WHERE id = $1", account_id
            )


# -- post_settlements ---------------------------------------------------------------------


async def test_post_settlements_same_batch_twice_records_once(pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000)
    batch = [_settlement(account_id, f"req-{i}", cost=1_000, charged=1_000) for i in range(3)]

    async with pool.acquire() as conn:
        first, balances = await _post_settlements(conn, batch)
        second, balances_again = await _post_settlements(conn, batch)
        usage_rows = await conn.fetchval("SELECT count(*) FROM usage_events")

    assert [r.posted for r in first] == [True, True, True]
    assert [r.charged_millicredits for r in first] == [1_000, 1_000, 1_000]
    assert [r.posted for r in second] == [False, False, False]
    assert [r.charged_millicredits for r in second] == [0, 0, 0]
    assert balances[account_id].balance_millicredits == 7_000
    assert balances_again == balances
    assert usage_rows == 3
    deductions = [e for e in await _entries(pool, account_id) if e["entry_type"] == "deduction"]
    assert sorted(e["idempotency_key"] for e in deductions) == [
        "usage:req-0",
        "usage:req-1",
        "usage:req-2",
    ]
    assert [e["balance_after_millicredits"] for e in deductions] == [9_000, 8_000, 7_000]


async def test_post_settlements_repeat_within_batch_records_once(pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000)
    item = _settlement(account_id, "req-dup", cost=4_000, charged=4_000)

    async with pool.acquire() as conn:
        results, balances = await _post_settlements(conn, [item, item])

    assert [r.posted for r in results] == [True, False]
    assert balances[account_id].balance_millicredits == 6_000


async def test_post_settlements_charge_capped_at_balance_records_shortfall(
    pool: asyncpg.Pool,
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 2_500)
    batch = [
        _settlement(account_id, "req-a", cost=2_000, charged=2_000),
        # Redis thought the balance covered this one; a refund landed in Postgres since.
        _settlement(account_id, "req-b", cost=1_800, charged=1_500),
        _settlement(account_id, "req-c", cost=300, charged=300),
    ]

    async with pool.acquire() as conn:
        results, balances = await _post_settlements(conn, batch)
        usage = {
            r[0]: (r[1], r[2], r[3])
            for r in await conn.fetch(
                "SELECT request_id, cost_millicredits, charged_millicredits, "
                "shortfall_millicredits FROM usage_events"
            )
        }
        assert await ledger.ledger_sum_matches_balance(conn, account_id)

    assert [r.charged_millicredits for r in results] == [2_000, 500, 0]
    assert usage == {
        "req-a": (2_000, 2_000, 0),
        "req-b": (1_800, 500, 1_300),
        "req-c": (300, 0, 300),
    }
    assert balances[account_id].balance_millicredits == 0
    # A zero charge posts a usage event but no deduction and no version bump.
    assert balances[account_id].version == 3
    assert [e["idempotency_key"] for e in await _entries(pool, account_id)][1:] == [
        "usage:req-a",
        "usage:req-b",
    ]
    charged, deducted = await money_totals(pool)
    assert charged == -deducted == 2_500


async def test_post_settlements_by_account_sums_what_each_account_got(
    pool: asyncpg.Pool,
) -> None:
    """The poster's per-account answer: counts, charged sum and final balance per account
    (a repeat, a cap and two accounts)."""
    rich, poor = await new_account(pool), await new_account(pool)
    await grant(pool, rich, 10_000)
    await grant(pool, poor, 2_500)
    async with pool.acquire() as conn:
        await _post_settlements(conn, [_settlement(rich, "req-seen", 100, 100)])
        batch = [
            _settlement(rich, "req-seen", cost=100, charged=100),  # posted before: a repeat
            _settlement(poor, "req-p1", cost=2_000, charged=2_000),
            _settlement(rich, "req-r1", cost=700, charged=700),
            _settlement(poor, "req-p2", cost=1_800, charged=1_500),  # capped at 500
            _settlement(rich, "req-r1", cost=700, charged=700),  # a repeat within the batch
        ]
        postings = await posting.post_settlements(conn, _batch(batch))
        balances = {a: await ledger.posted_balance(conn, a) for a in (rich, poor)}

    assert {p.account_id: p for p in postings} == {
        rich: posting.AccountPosting(rich, 1, 2, 700, balances[rich]),
        poor: posting.AccountPosting(poor, 2, 0, 2_500, balances[poor]),
    }
    assert balances[rich].balance_millicredits == 10_000 - 100 - 700
    assert balances[poor].balance_millicredits == 0


async def test_post_settlements_usage_charged_equals_deductions(pool: asyncpg.Pool) -> None:
    accounts = [await new_account(pool) for _ in range(3)]
    for account_id, amount in zip(accounts, (5_000, 800, 0), strict=True):
        if amount:
            await grant(pool, account_id, amount)
    batch = [
        _settlement(accounts[i % 3], f"req-{i}", cost=700 + 13 * i, charged=700 + 13 * i)
        for i in range(12)
    ]

    async with pool.acquire() as conn:
        results, balances = await _post_settlements(conn, batch)
        for account_id in accounts:
            assert await ledger.ledger_sum_matches_balance(conn, account_id)

    charged, deducted = await money_totals(pool)
    assert charged == -deducted == sum(r.charged_millicredits for r in results)
    assert all(b.balance_millicredits >= 0 for b in balances.values())
    assert balances[accounts[2]].balance_millicredits == 0


async def test_post_settlements_unknown_account_posts_nothing(pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 5_000)
    batch = [
        _settlement(account_id, "req-ok", cost=100, charged=100),
        _settlement(987_654, "req-ghost", cost=100, charged=100),
    ]
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.NoDataFoundError, match="unknown account 987654"):
            await _post_settlements(conn, batch)
        assert await conn.fetchval("SELECT count(*) FROM usage_events") == 0
        assert (await ledger.posted_balance(conn, account_id)).balance_millicredits == 5_000


@pytest.mark.parametrize(
    ("field", "named"), [("api_key_id", "API key 987654"), ("rate_card_id", "rate card 987654")]
)
async def test_post_settlements_unknown_key_or_rate_card_posts_nothing(
    pool: asyncpg.Pool, field: str, named: str
) -> None:
    """usage_events' references are checked per statement (a trigger), not by foreign
    keys; a batch naming a key or rate card that does not exist is refused whole, with the
    error a foreign key raised."""
    account_id = await new_account(pool)
    await grant(pool, account_id, 5_000)
    record, charged = _settlement(account_id, "req-ghost-ref", cost=100, charged=100)
    ghost = (record._replace(**{field: 987_654}), charged)
    batch = [_settlement(account_id, "req-fine", cost=100, charged=100), ghost]
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.ForeignKeyViolationError, match=rf"unknown {named}$"):
            await _post_settlements(conn, batch)
        assert await conn.fetchval("SELECT count(*) FROM usage_events") == 0
        assert (await ledger.posted_balance(conn, account_id)).balance_millicredits == 5_000


async def test_usage_events_references_checked_for_every_writer(pool: asyncpg.Pool) -> None:
    """Direct INSERTs and UPDATEs (not only the settlement function) are checked too."""
    account_id = await new_account(pool)
    async with pool.acquire() as conn:
        await rate_cards.seed_rate_cards(conn)
        card_id = await conn.fetchval("SELECT min(id) FROM rate_cards")
        assert card_id is not None
        insert = """INSERT INTO usage_events (request_id, account_id, api_key_id, model,
                        endpoint, rate_card_id, input_millicredits_per_1k_tokens,
                        cached_input_millicredits_per_1k_tokens,
                        output_millicredits_per_1k_tokens, rounding_mode, cost_millicredits,
                        charged_millicredits, usage_source, status, started_at, finished_at)
                    VALUES ($1, $2, NULL, 'gpt-4o-mini', 'chat.completions', $3, 1, 1, 1,
                            'exact', 0, 0, 'upstream', 'completed', now(), now())"""
        await conn.execute(insert, "req-direct-ok", account_id, card_id)
        with pytest.raises(asyncpg.ForeignKeyViolationError, match=r"unknown account 987654$"):
            await conn.execute(insert, "req-direct-ghost", 987_654, card_id)
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="unknown rate card"):
            await conn.execute(
                "UPDATE usage_events SET rate_card_id = -1 WHERE request_id = 'req-direct-ok'"
            )
        assert (
            await conn.fetchval(
                "SELECT rate_card_id FROM usage_events WHERE request_id = 'req-direct-ok'"
            )
            == card_id
        )
        assert not await conn.fetchval(
            "SELECT exists(SELECT 1 FROM usage_events WHERE request_id = 'req-direct-ghost')"
        )


@pytest.mark.parametrize("table", ["accounts", "api_keys", "rate_cards"])
async def test_referenced_rows_are_never_deleted_even_by_owner(
    pool: asyncpg.Pool, table: str
) -> None:
    """What usage and ledger rows refer to cannot disappear (keys are revoked, rate cards
    superseded): DELETE and TRUNCATE are refused for every role, the owner included."""
    account_id = await new_account(pool)
    async with pool.acquire() as conn:
        await api_keys.create_api_key(conn, account_id)
        await rate_cards.seed_rate_cards(conn)
        count = f"SELECT count(*) FROM {table}"
        before = await conn.fetchval(count)
        assert before > 0
        for statement in (f"DELETE FROM {table}", f"TRUNCATE {table} CASCADE"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="never deleted"):
                await conn.execute(statement)
        assert await conn.fetchval(count) == before
        assert not await conn.fetchval(
            "SELECT has_table_privilege('creditgate_app', $1, 'DELETE')", table
        )


def _sequential_reference(
    balances: dict[int, int], recorded: set[str], batch: list[Settlement]
) -> list[tuple[str, bool, int]]:
    """The rule written as a loop, one settlement at a time in batch order: what each
    settlement posts; updates ``balances`` and ``recorded``."""
    out = []
    for record, charged in batch:
        request_id, account_id = record.request_id, record.account_id
        if request_id in recorded:
            out.append((request_id, False, 0))
            continue
        recorded.add(request_id)
        posted = max(min(charged, balances[account_id]), 0)
        balances[account_id] -= posted
        out.append((request_id, True, posted))
    return out


async def test_post_settlements_matches_the_sequential_rule_on_random_batches(
    pool: asyncpg.Pool,
) -> None:
    """Batches over several accounts, with repeats within and across batches and charges
    that run balances down to 0: the set-based function posts exactly what a loop would."""
    rng = random.Random(20261122)
    accounts = [await new_account(pool) for _ in range(3)]
    balances = {a: rng.choice([0, 2_500, 10_000]) for a in accounts}
    for account_id, credits in balances.items():
        if credits:
            await grant(pool, account_id, credits)
    recorded: set[str] = set()
    counter = 0
    for _ in range(25):
        batch = []
        for _ in range(rng.randint(1, 12)):
            if recorded and rng.random() < 0.15:
                request_id = rng.choice(sorted(recorded))  # already in Postgres
                account_id = int(request_id.split("-")[1])
            elif batch and rng.random() < 0.1:
                request_id = batch[-1][0].request_id  # repeated within the batch
                account_id = batch[-1][0].account_id
            else:
                counter += 1
                account_id = rng.choice(accounts)
                request_id = f"r-{account_id}-{counter}"
            charged = rng.choice([0, 1, 999, 1_000, 3_000])
            batch.append(_settlement(account_id, request_id, cost=charged, charged=charged))
        expected = _sequential_reference(balances, recorded, batch)
        async with pool.acquire() as conn:
            results, posted = await _post_settlements(conn, batch)
        by_request: dict[str, list[tuple[bool, int]]] = {}
        for r in results:
            by_request.setdefault(r.request_id, []).append((r.posted, r.charged_millicredits))
        for request_id, was_recorded, amount in expected:
            assert (was_recorded, amount) in by_request[request_id]
        assert sorted(r.posted for r in results) == sorted(e[1] for e in expected)
        for account_id in {record.account_id for record, _ in batch}:
            assert posted[account_id].balance_millicredits == balances[account_id]
    for account_id in accounts:
        async with pool.acquire() as conn:
            assert await ledger.ledger_sum_matches_balance(conn, account_id)
        chain = [e["balance_after_millicredits"] for e in await _entries(pool, account_id)]
        amounts = [e["amount_millicredits"] for e in await _entries(pool, account_id)]
        running = 0
        for amount, after in zip(amounts, chain, strict=True):
            running += amount
            assert after == running  # entries in id order form one running balance


# -- post_ledger_entries (the one writer), many entries per call --------------------------

_POST_MANY_SQL = """SELECT out_created, out_amount_millicredits, out_uncovered_millicredits
  FROM post_ledger_entries($1::bigint[], $2::text[], $3::bigint[], $4::text[], '{}', '{}',
                           $5::text[])"""


async def test_post_ledger_entries_matches_the_sequential_rule_with_credits_and_debits(
    pool: asyncpg.Pool,
) -> None:
    """Credits and debits of two accounts interleaved in one call, debits under 'owe' or
    'cap', repeated keys: what each entry takes, each balance and shortfall, and the
    balance_after chain are what posting one entry at a time would give."""
    rng = random.Random(20261202)
    accounts = [await new_account(pool) for _ in range(2)]
    balances = dict.fromkeys(accounts, 0)
    shortfalls = dict.fromkeys(accounts, 0)
    seen: set[str] = set()
    for call in range(20):
        entries = []
        for i in range(rng.randint(1, 10)):
            account_id = rng.choice(accounts)
            amount = rng.choice([-3_000, -700, -1, 0, 1, 500, 2_000])
            rule = "whole" if amount >= 0 else rng.choice(["owe", "cap"])
            if entries and rng.random() < 0.1:
                key = entries[-1][2]  # repeated within the call
            elif seen and rng.random() < 0.15:
                key = rng.choice(sorted(seen))  # posted by an earlier call
            else:
                key = f"k{call}-{i}"
            entries.append((account_id, amount, key, rule))
        expected = []
        in_call: set[str] = set()  # the first of a key in a call is the one that counts
        for account_id, amount, key, rule in entries:
            if key in seen or key in in_call:
                expected.append((False, None, 0))
                continue
            in_call.add(key)
            taken = max(amount, -balances[account_id])
            uncovered = taken - amount
            balances[account_id] += taken
            if rule == "owe":
                shortfalls[account_id] += uncovered
            written = not (rule == "cap" and taken == 0)
            if written:
                seen.add(key)
            expected.append((written, taken, uncovered))
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                _POST_MANY_SQL,
                [e[0] for e in entries],
                ["adjustment"] * len(entries),
                [e[1] for e in entries],
                [e[2] for e in entries],
                [e[3] for e in entries],
            )
        for row, (written, taken, uncovered) in zip(rows, expected, strict=True):
            assert (row[0], row[2]) == (written, uncovered)
            if taken is not None:
                assert row[1] == taken
    for account_id in accounts:
        async with pool.acquire() as conn:
            posted = await ledger.posted_balance(conn, account_id)
            assert await ledger.ledger_sum_matches_balance(conn, account_id)
        assert (posted.balance_millicredits, posted.shortfall_millicredits) == (
            balances[account_id],
            shortfalls[account_id],
        )
        running = 0
        for entry in await _entries(pool, account_id):
            running += entry["amount_millicredits"]
            assert entry["balance_after_millicredits"] == running


async def test_post_ledger_entries_whole_debit_past_the_balance_refuses_the_call(
    pool: asyncpg.Pool,
) -> None:
    account_id = await new_account(pool)
    before = await grant(pool, account_id, 1_000)
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError) as err:
            await conn.fetch(
                _POST_MANY_SQL,
                [account_id, account_id],
                ["adjustment", "reversal"],
                [500, -1_501],
                ["credit-first", "then-too-much"],
                ["whole", "whole"],
            )
        assert err.value.constraint_name == "ledger_balance_never_below_zero"
        assert await ledger.posted_balance(conn, account_id) == before
    assert len(await _entries(pool, account_id)) == 1
