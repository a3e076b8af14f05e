"""Operator adjustments and account changes in the billing layer (billing/adjustments.py,
billing/accounts.py, billing/api_keys.py): idempotency, the floor at zero, one audit row."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from billing import accounts, api_keys, ledger
from billing.adjustments import AdjustmentRequest, forgive_shortfall, post_adjustment
from billing.audit import CLI_ACTOR
from billing.errors import (
    DuplicateAccountError,
    IdempotencyKeyReusedError,
    NegativeBalanceError,
    NoShortfallError,
)
from billing.ledger import PostingRule


async def _audit_rows(pool: asyncpg.Pool, action: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM audit_log WHERE action = $1 ORDER BY id", action)


async def _account(pool: asyncpg.Pool, millicredits: int = 0) -> int:
    async with pool.acquire() as conn:
        account = await accounts.create_account(
            conn,
            CLI_ACTOR,
            email=f"a{id(conn)}-{millicredits}@example.com",
            starting_millicredits=millicredits,
        )
    return account.id


async def test_create_account_with_grant_posts_one_entry_and_one_audit_row(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        account = await accounts.create_account(
            conn,
            CLI_ACTOR,
            email="Ann@Example.com",
            external_id="crm-1",
            starting_millicredits=12_500,
        )
        assert await ledger.ledger_sum_matches_balance(conn, account.id)
    assert account.posted.balance_millicredits == 12_500
    [row] = await _audit_rows(pool, "account.create")
    assert (row["target_id"], row["actor_kind"]) == (str(account.id), "cli")


async def test_create_account_duplicate_email_or_external_id_refused(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await accounts.create_account(conn, CLI_ACTOR, email="a@example.com", external_id="x")
        with pytest.raises(DuplicateAccountError) as email:
            await accounts.create_account(conn, CLI_ACTOR, email="a@example.com")
        with pytest.raises(DuplicateAccountError) as external:
            await accounts.create_account(conn, CLI_ACTOR, email="b@example.com", external_id="x")
    assert (email.value.field, external.value.field) == ("email", "external_id")
    assert len(await _audit_rows(pool, "account.create")) == 1


async def test_search_accounts_email_prefix_is_case_insensitive_and_literal(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        for email in ("Bob_1@example.com", "bobx1@example.com", "carol@example.com"):
            await accounts.create_account(conn, CLI_ACTOR, email=email)
    found = await accounts.search_accounts(pool, email_prefix="BOB_")
    assert [a.email for a in found] == ["Bob_1@example.com"]
    everyone = await accounts.search_accounts(pool, limit=2)
    assert [a.email for a in everyone] == ["carol@example.com", "bobx1@example.com"]
    rest = await accounts.search_accounts(pool, before_id=everyone[-1].id)
    assert [a.email for a in rest] == ["Bob_1@example.com"]


async def test_adjustment_same_key_same_request_returns_the_same_entry(
    pool: asyncpg.Pool,
) -> None:
    account_id = await _account(pool)
    request = AdjustmentRequest(account_id, 5_000, "goodwill", "T-1")
    async with pool.acquire() as conn:
        first = await post_adjustment(conn, CLI_ACTOR, request, idempotency_key="k1")
        again = await post_adjustment(conn, CLI_ACTOR, request, idempotency_key="k1")
    assert (first.created, again.created) == (True, False)
    assert again.entry.id == first.entry.id
    assert again.posted.balance_millicredits == 5_000
    assert len(await _audit_rows(pool, "adjustment.create")) == 1


async def test_adjustment_same_key_other_request_is_refused(pool: asyncpg.Pool) -> None:
    account_id = await _account(pool)
    other_account = await _account(pool, 1)
    async with pool.acquire() as conn:
        await post_adjustment(
            conn, CLI_ACTOR, AdjustmentRequest(account_id, 5_000, "goodwill"), idempotency_key="k"
        )
        for changed in (
            AdjustmentRequest(account_id, 6_000, "goodwill"),
            AdjustmentRequest(account_id, 5_000, "other reason"),
            AdjustmentRequest(account_id, 5_000, "goodwill", "T-2"),
            AdjustmentRequest(other_account, 5_000, "goodwill"),
        ):
            with pytest.raises(IdempotencyKeyReusedError):
                await post_adjustment(conn, CLI_ACTOR, changed, idempotency_key="k")
    assert await ledger.posted_balance(pool, account_id) == ledger.PostedBalance(5_000, 1, 0)
    assert (await ledger.posted_balance(pool, other_account)).balance_millicredits == 1


async def test_adjustment_debit_beyond_balance_is_refused_and_writes_nothing(
    pool: asyncpg.Pool,
) -> None:
    account_id = await _account(pool, 1_000)
    async with pool.acquire() as conn:
        with pytest.raises(NegativeBalanceError):
            await post_adjustment(
                conn, CLI_ACTOR, AdjustmentRequest(account_id, -1_001, "x"), idempotency_key="d"
            )
        taken = await post_adjustment(
            conn, CLI_ACTOR, AdjustmentRequest(account_id, -1_000, "x"), idempotency_key="d"
        )
    assert taken.posted.balance_millicredits == 0
    assert len(await _audit_rows(pool, "adjustment.create")) == 1


async def test_adjustment_concurrent_same_key_posts_once(pool: asyncpg.Pool) -> None:
    account_id = await _account(pool)
    request = AdjustmentRequest(account_id, 7_000, "race")

    async def post() -> bool:
        async with pool.acquire() as conn:
            return (await post_adjustment(conn, CLI_ACTOR, request, idempotency_key="r")).created

    results = await asyncio.gather(*(post() for _ in range(5)))
    assert sorted(results) == [False] * 4 + [True]
    assert (await ledger.posted_balance(pool, account_id)).balance_millicredits == 7_000


async def test_forgive_shortfall_clears_it_and_keeps_the_balance(pool: asyncpg.Pool) -> None:
    account_id = await _account(pool, 2_000)
    async with pool.acquire() as conn:
        owed = await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="reversal",
            amount_millicredits=-5_000,
            idempotency_key="refund",
            rule=PostingRule.OWE,
        )
        assert owed.posted.shortfall_millicredits == 3_000
        forgiven = await forgive_shortfall(conn, CLI_ACTOR, account_id, reason="goodwill")
        with pytest.raises(NoShortfallError):
            await forgive_shortfall(conn, CLI_ACTOR, account_id, reason="again")
        assert await ledger.ledger_sum_matches_balance(conn, account_id)
    assert forgiven.forgiven_millicredits == 3_000
    assert (forgiven.posted.balance_millicredits, forgiven.posted.shortfall_millicredits) == (0, 0)
    assert await ledger.posted_balance(pool, account_id) == forgiven.posted
    assert len(await _audit_rows(pool, "account.forgive_shortfall")) == 1


async def test_key_changes_audit_each_time(pool: asyncpg.Pool) -> None:
    account_id = await _account(pool)
    async with pool.acquire() as conn:
        _, record = await api_keys.issue_api_key(conn, CLI_ACTOR, account_id, name="a")
        await api_keys.update_api_key(conn, CLI_ACTOR, record.id, {"requests_per_minute": 5})
        revoked = await api_keys.revoke_api_key_audited(conn, CLI_ACTOR, record.id)
        again = await api_keys.revoke_api_key_audited(conn, CLI_ACTOR, record.id)
    assert revoked.revoked_at is not None
    assert again.revoked_at == revoked.revoked_at
    assert revoked.requests_per_minute == 5
    actions = [r["action"] for r in await pool.fetch("SELECT action FROM audit_log ORDER BY id")]
    assert actions[-4:] == ["key.create", "key.update", "key.revoke", "key.revoke"]
