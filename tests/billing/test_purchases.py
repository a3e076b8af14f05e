"""Packages, purchases and fulfilment against a real Postgres.

Stripe objects come from ``devtools.stripe_sim`` (Stripe's shapes, built in-process here; the
HTTP stand-in is exercised in the webhook and end-to-end tests). Refunds, disputes and event
order: ``test_purchase_reversals.py``.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from billing.purchases.packages import (
    DEFAULT_PACKAGES,
    UnknownPackageError,
    get_package,
    list_packages,
    price_per_1k_credits,
    savings_percent,
)
from billing.purchases.purchase_records import apply_checkout_session, get_purchase
from tests.billing.purchase_world import ENTERPRISE_MC, PROFESSIONAL_MC, STARTER_MC, World

# -- packages ---------------------------------------------------------------------------


async def test_packages_migration_seeds_the_design_catalogue(pool: asyncpg.Pool) -> None:
    packages = await list_packages(pool)
    assert [(p.code, p.price_minor_units, p.currency) for p in packages] == [
        ("starter", 999, "usd"),
        ("professional", 4999, "usd"),
        ("enterprise", 9999, "usd"),
    ]
    assert [p.total_millicredits for p in packages] == [STARTER_MC, PROFESSIONAL_MC, ENTERPRISE_MC]
    assert [p.bonus_millicredits for p in packages] == [0, 2_500_000, 10_000_000]
    assert [p.badge for p in packages] == [None, None, "Best value"]
    for spec, stored in zip(DEFAULT_PACKAGES, packages, strict=True):
        assert (spec.code, spec.total_millicredits, spec.badge) == (
            stored.code,
            stored.total_millicredits,
            stored.badge,
        )


async def test_get_package_unknown_or_inactive_raises(pool: asyncpg.Pool) -> None:
    with pytest.raises(UnknownPackageError):
        await get_package(pool, "platinum")
    await pool.execute("UPDATE packages SET active = false WHERE code = 'starter'")
    with pytest.raises(UnknownPackageError):
        await get_package(pool, "starter")
    assert [p.code for p in await list_packages(pool)] == ["professional", "enterprise"]


async def test_package_total_must_equal_base_plus_bonus(pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("UPDATE packages SET total_millicredits = 1 WHERE code = 'starter'")


async def test_price_per_1k_credits_and_savings(pool: asyncpg.Pool) -> None:
    starter, professional, enterprise = await list_packages(pool)
    assert str(price_per_1k_credits(starter)) == "1.0000"
    assert str(price_per_1k_credits(enterprise)) == "0.9091"
    assert str(savings_percent(starter, starter)) == "0.0"
    assert str(savings_percent(professional, starter)) == "4.8"
    assert str(savings_percent(enterprise, starter)) == "9.1"


# -- fulfilment -------------------------------------------------------------------------


async def test_apply_paid_session_grants_package_once(world: World) -> None:
    account = await world.account()
    purchase, session_id = await world.checkout(account, "professional")
    session = world.stripe.pay(session_id)

    first = await world.apply(apply_checkout_session, session)
    again = await world.apply(apply_checkout_session, session)

    assert [e.amount_millicredits for e in first.entries] == [PROFESSIONAL_MC]
    assert first.entries[0].idempotency_key == f"purchase:{session_id}"
    assert first.posted.balance_millicredits == PROFESSIONAL_MC
    assert again.entries == [] and again.posted is None
    stored = await get_purchase(world.pool, purchase.public_id)
    assert stored.status == "paid"
    assert stored.payment_intent_id == session["payment_intent"]
    assert stored.purchase_entry_id == first.entries[0].id
    assert stored.amount_paid_minor_units == 4999
    assert (await world.balance(account)).balance_millicredits == PROFESSIONAL_MC


async def test_apply_paid_session_50_times_concurrently_grants_once(world: World) -> None:
    account = await world.account()
    _, session_id = await world.checkout(account, "enterprise")
    session = world.stripe.pay(session_id)

    results = await asyncio.gather(
        *(world.apply(apply_checkout_session, session) for _ in range(50))
    )

    assert sum(len(r.entries) for r in results) == 1
    assert (await world.balance(account)).balance_millicredits == ENTERPRISE_MC
    assert len(await world.entries(account)) == 1


async def test_expanded_session_keeps_charge_and_receipt(world: World) -> None:
    account = await world.account()
    purchase, session_id = await world.checkout(account)
    session = world.stripe.pay(session_id)
    charge = world.stripe.charge_of(session_id)
    pi = dict(world.stripe.payment_intents[session["payment_intent"]], latest_charge=charge)

    await world.apply(apply_checkout_session, {**session, "payment_intent": pi})

    stored = await get_purchase(world.pool, purchase.public_id)
    assert (stored.charge_id, stored.receipt_url) == (charge["id"], charge["receipt_url"])


async def test_async_payment_is_processing_until_it_succeeds(world: World) -> None:
    account = await world.account()
    _, session_id = await world.checkout(account)
    completed = world.stripe.pay(session_id, asynchronous=True)

    update = await world.apply(apply_checkout_session, completed)
    assert update.purchase.status == "processing" and update.entries == []

    succeeded = world.stripe.settle_async(session_id, succeeded=True)
    update = await world.apply(apply_checkout_session, succeeded)
    assert update.purchase.status == "paid"
    assert (await world.balance(account)).balance_millicredits == STARTER_MC


async def test_async_payment_failed_grants_nothing_whatever_the_order(world: World) -> None:
    account = await world.account()
    _, session_id = await world.checkout(account)
    completed = world.stripe.pay(session_id, asynchronous=True)
    failed = world.stripe.settle_async(session_id, succeeded=False)

    await world.apply(apply_checkout_session, failed, async_payment_failed=True)
    update = await world.apply(apply_checkout_session, completed)

    assert update.purchase.status == "failed"
    assert update.purchase.failure_reason == "async_payment_failed"
    assert await world.entries(account) == []


async def test_failure_reported_after_payment_keeps_the_purchase_paid(world: World) -> None:
    account = await world.account()
    _, session_id = await world.checkout(account)
    paid = world.stripe.pay(session_id)
    await world.apply(apply_checkout_session, paid)

    update = await world.apply(apply_checkout_session, paid, async_payment_failed=True)
    expired = await world.apply(apply_checkout_session, {**paid, "status": "expired"})

    assert update.purchase.status == expired.purchase.status == "paid"
    assert (await world.balance(account)).balance_millicredits == STARTER_MC


async def test_expired_session_grants_nothing(world: World) -> None:
    account = await world.account()
    _, session_id = await world.checkout(account)

    update = await world.apply(apply_checkout_session, world.stripe.expire(session_id))

    assert update.purchase.status == "expired"
    assert await world.entries(account) == []


async def test_session_with_other_amount_needs_review_and_grants_nothing(world: World) -> None:
    account = await world.account()
    _, session_id = await world.checkout(account)
    session = world.stripe.pay(session_id)

    update = await world.apply(apply_checkout_session, {**session, "amount_total": 1})

    assert update.purchase.status == "needs_review"
    assert "amount_total" in update.rejected
    assert await world.entries(account) == []


async def test_session_without_payment_collected_needs_review(world: World) -> None:
    account = await world.account()
    _, session_id = await world.checkout(account)
    session = world.stripe.pay(session_id)
    free = {**session, "payment_status": "no_payment_required", "amount_total": 0}

    update = await world.apply(apply_checkout_session, free)

    assert update.purchase.status == "needs_review"
    assert await world.entries(account) == []


async def test_session_not_ours_is_ignored(world: World) -> None:
    account = await world.account()
    _, session_id = await world.checkout(account)
    session = world.stripe.pay(session_id)
    foreign = {**session, "id": "cs_test_foreign", "metadata": {}}

    update = await world.apply(apply_checkout_session, foreign)

    assert update.purchase is None
    assert await world.entries(account) == []
