"""Refunds and disputes as reversal entries, and Stripe events in any order, against a real
Postgres (Stripe objects from ``devtools.stripe_sim``)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.purchases.purchase_ledger import share_millicredits
from billing.purchases.purchase_records import (
    apply_charge,
    apply_checkout_session,
    apply_dispute,
    apply_refund,
    get_purchase,
)
from billing.purchases.stripe_events import process_event
from tests.billing.purchase_world import ENTERPRISE_MC, PROFESSIONAL_MC, STARTER_MC, World

# -- refunds ----------------------------------------------------------------------------


async def _paid(world: World, code: str = "starter", credits: int = 0) -> tuple[int, str]:
    account = await world.account(credits)
    _, session_id = await world.checkout(account, code)
    await world.apply(apply_checkout_session, world.stripe.pay(session_id))
    return account, session_id


async def test_full_refund_reverses_the_whole_purchase(world: World) -> None:
    account, session_id = await _paid(world, "enterprise")

    update = await world.apply(apply_refund, world.stripe.refund(session_id))

    [reversal] = update.entries
    assert reversal.entry_type == "reversal"
    assert reversal.amount_millicredits == -ENTERPRISE_MC
    purchase_entry = (await world.entries(account))[0]
    assert reversal.reverses_entry_id == purchase_entry["id"]
    assert (await world.balance(account)).balance_millicredits == 0
    await world.assert_books_balance(account)


async def test_partial_refund_reverses_its_share(world: World) -> None:
    account, session_id = await _paid(world, "professional")

    update = await world.apply(apply_refund, world.stripe.refund(session_id, 2500))

    expected = PROFESSIONAL_MC * 2500 // 4999
    assert [e.amount_millicredits for e in update.entries] == [-expected]
    assert (await world.balance(account)).balance_millicredits == PROFESSIONAL_MC - expected
    await world.assert_books_balance(account)


async def test_partial_refunds_adding_up_to_full_reverse_within_rounding(world: World) -> None:
    account, session_id = await _paid(world, "professional")

    for amount in (1000, 1999, 2000):
        await world.apply(apply_refund, world.stripe.refund(session_id, amount))

    left = (await world.balance(account)).balance_millicredits
    assert 0 <= left < 3  # floor per refund: under 1 millicredit each, in the user's favour
    await world.assert_books_balance(account)


def test_share_millicredits_bounds() -> None:
    assert share_millicredits(STARTER_MC, 999, 999) == STARTER_MC
    assert share_millicredits(STARTER_MC, 5000, 999) == STARTER_MC
    assert share_millicredits(STARTER_MC, 0, 999) == 0
    assert share_millicredits(PROFESSIONAL_MC, 1, 4999) == PROFESSIONAL_MC // 4999


async def test_same_refund_through_several_events_counts_once(world: World) -> None:
    account, session_id = await _paid(world)
    refund = world.stripe.refund(session_id, 500)
    charge = world.stripe.charge_of(session_id)
    charge_with_list = {
        **charge,
        "refunds": {"object": "list", "data": [refund], "has_more": False},
    }

    await world.apply(apply_refund, refund)
    await world.apply(apply_charge, charge_with_list)
    await world.apply(apply_refund, {**refund, "status": "succeeded"})

    reversals = [e for e in await world.entries(account) if e["entry_type"] == "reversal"]
    assert [r["amount_millicredits"] for r in reversals] == [-(STARTER_MC * 500 // 999)]


async def test_charge_listing_a_new_and_a_known_refund_reports_the_new_balance(
    world: World,
) -> None:
    account, session_id = await _paid(world)
    known = world.stripe.refund(session_id, 100)
    await world.apply(apply_refund, known)
    new = world.stripe.refund(session_id, 200)
    charge = world.stripe.charge_of(session_id)

    update = await world.apply(
        apply_charge, {**charge, "refunds": {"data": [new, known], "has_more": False}}
    )

    assert [e.idempotency_key for e in update.entries] == [f"refund:{new['id']}"]
    assert update.posted == await world.balance(account)


async def test_refund_before_checkout_event_applies_on_fulfilment(world: World) -> None:
    account = await world.account()
    _, session_id = await world.checkout(account)
    paid = world.stripe.pay(session_id)
    refund = world.stripe.refund(session_id)

    early = await world.apply(apply_refund, refund)
    assert early.purchase is None

    update = await world.apply(apply_checkout_session, paid)
    assert [e.amount_millicredits for e in update.entries] == [STARTER_MC, -STARTER_MC]
    assert (await world.balance(account)).balance_millicredits == 0


async def test_failed_refund_gives_the_credits_back(world: World) -> None:
    account, session_id = await _paid(world)
    refund = world.stripe.refund(session_id)
    await world.apply(apply_refund, refund)

    failed = world.stripe.update_refund(refund["id"], "failed")
    update = await world.apply(apply_refund, failed)
    late_pending = await world.apply(apply_refund, refund)  # an older event, delivered late

    assert [e.amount_millicredits for e in update.entries] == [STARTER_MC]
    assert update.entries[0].idempotency_key == f"refund:{refund['id']}:reinstated"
    assert late_pending.entries == []
    assert (await world.balance(account)).balance_millicredits == STARTER_MC


async def test_refund_after_credits_spent_leaves_a_shortfall(world: World) -> None:
    account, session_id = await _paid(world)
    await world.spend(account, 9_000_000, "usage:spent")

    update = await world.apply(apply_refund, world.stripe.refund(session_id))

    [reversal] = update.entries
    assert reversal.amount_millicredits == -990_000  # all that was left
    posted = await world.balance(account)
    assert (posted.balance_millicredits, posted.shortfall_millicredits) == (0, 9_000_000)
    row = await world.pool.fetchrow("SELECT * FROM purchase_refunds")
    assert (row["reversal_millicredits"], row["shortfall_millicredits"]) == (STARTER_MC, 9_000_000)
    await world.assert_books_balance(account)


async def test_next_purchase_pays_the_shortfall_first(world: World) -> None:
    account, session_id = await _paid(world)
    await world.spend(account, STARTER_MC, "usage:all")
    await world.apply(apply_refund, world.stripe.refund(session_id))
    assert (await world.balance(account)).shortfall_millicredits == STARTER_MC

    _, second = await world.checkout(account, "professional")
    update = await world.apply(apply_checkout_session, world.stripe.pay(second))

    kinds = [(e.entry_type, e.amount_millicredits) for e in update.entries]
    assert kinds == [("purchase", PROFESSIONAL_MC), ("adjustment", -STARTER_MC)]
    assert update.entries[1].idempotency_key == f"shortfall:purchase:{second}"
    posted = await world.balance(account)
    assert posted.balance_millicredits == PROFESSIONAL_MC - STARTER_MC
    assert posted.shortfall_millicredits == 0
    assert update.posted == posted
    await world.assert_books_balance(account)


# -- disputes ---------------------------------------------------------------------------


async def test_lost_dispute_keeps_the_credits_reversed(world: World) -> None:
    account, session_id = await _paid(world, "professional")
    dispute = world.stripe.dispute(session_id)

    opened = await world.apply(apply_dispute, dispute)
    closed = await world.apply(apply_dispute, world.stripe.close_dispute(dispute["id"], won=False))

    assert [e.amount_millicredits for e in opened.entries] == [-PROFESSIONAL_MC]
    assert opened.entries[0].idempotency_key == f"dispute:{dispute['id']}:opened"
    assert closed.entries == []
    assert (await world.balance(account)).balance_millicredits == 0
    await world.assert_books_balance(account)


async def test_won_dispute_restores_what_was_held(world: World) -> None:
    account, session_id = await _paid(world)
    dispute = world.stripe.dispute(session_id)
    await world.apply(apply_dispute, dispute)

    won = await world.apply(apply_dispute, world.stripe.close_dispute(dispute["id"], won=True))
    reopened = await world.apply(apply_dispute, dispute)  # a late "needs_response" event

    assert [e.amount_millicredits for e in won.entries] == [STARTER_MC]
    assert won.entries[0].idempotency_key == f"dispute:{dispute['id']}:won"
    assert reopened.entries == []
    assert (await world.balance(account)).balance_millicredits == STARTER_MC
    await world.assert_books_balance(account)


async def test_won_dispute_after_spending_clears_the_shortfall(world: World) -> None:
    account, session_id = await _paid(world)
    await world.spend(account, 9_000_000, "usage:most")
    dispute = world.stripe.dispute(session_id)
    await world.apply(apply_dispute, dispute)
    held = await world.balance(account)
    assert (held.balance_millicredits, held.shortfall_millicredits) == (0, 9_000_000)

    await world.apply(apply_dispute, world.stripe.close_dispute(dispute["id"], won=True))

    posted = await world.balance(account)
    assert (posted.balance_millicredits, posted.shortfall_millicredits) == (990_000, 0)
    await world.assert_books_balance(account)


async def test_dispute_decided_before_it_is_reported_open_ends_the_same(world: World) -> None:
    account, session_id = await _paid(world)
    dispute = world.stripe.dispute(session_id)
    won = world.stripe.close_dispute(dispute["id"], won=True)

    await world.apply(apply_dispute, won)
    await world.apply(apply_dispute, dispute)

    keys = [e["idempotency_key"] for e in await world.entries(account)]
    assert keys == [
        f"purchase:{session_id}",
        f"dispute:{dispute['id']}:opened",
        f"dispute:{dispute['id']}:won",
    ]
    assert (await world.balance(account)).balance_millicredits == STARTER_MC


# -- events in any order ----------------------------------------------------------------


def _scenario(world: World, session_id: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Stripe's events for a paid purchase with a partial refund that later failed, a second
    partial refund seen through two events, and a dispute that was lost; plus a map from
    the Stripe ids to role names for comparing ledgers across scenarios."""
    stripe = world.stripe
    paid = stripe.pay(session_id)
    first = stripe.refund(session_id, 300)
    first_failed = stripe.update_refund(first["id"], "failed")
    second = stripe.refund(session_id, 200)
    charge = stripe.charge_of(session_id)
    dispute = stripe.dispute(session_id, amount=499)
    lost = stripe.close_dispute(dispute["id"], won=False)
    charge_listed = {**charge, "refunds": {"data": [first_failed, second], "has_more": False}}
    events = [
        stripe.event("checkout.session.completed", paid),
        stripe.event("refund.created", first),
        stripe.event("refund.updated", first_failed),
        stripe.event("refund.created", second),
        stripe.event("charge.refunded", charge_listed),
        stripe.event("charge.dispute.created", dispute),
        stripe.event("charge.dispute.closed", lost),
    ]
    roles = {session_id: "CS", first["id"]: "RE1", second["id"]: "RE2", dispute["id"]: "DU"}
    return events, roles


async def _ledger_shape(world: World, account: int, roles: dict[str, str]) -> list[tuple]:
    shape = []
    for entry in await world.entries(account):
        key = entry["idempotency_key"]
        for stripe_id, role in roles.items():
            key = key.replace(stripe_id, role)
        shape.append((entry["entry_type"], entry["amount_millicredits"], key))
    return sorted(shape)


async def _run_scenario(world: World, order: list[int] | None) -> tuple[list[tuple], Any]:
    account = await world.account()
    purchase, session_id = await world.checkout(account, "professional")
    events, roles = _scenario(world, session_id)
    if order is not None:
        events = [events[i] for i in order]
    for event in events:
        await process_event(world.pool, None, event)
        await world.assert_books_balance(account)
    final = await get_purchase(world.pool, purchase.public_id)
    return await _ledger_shape(world, account, roles), (final.status, await world.balance(account))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(order=st.permutations(range(7)))
async def test_events_in_any_order_end_in_the_same_ledger(world: World, order: list[int]) -> None:
    in_order = await _run_scenario(world, None)
    shuffled = await _run_scenario(world, list(order))
    assert shuffled[0] == in_order[0]
    status, posted = shuffled[1]
    assert status == in_order[1][0] == "paid"
    assert posted.balance_millicredits == in_order[1][1].balance_millicredits


async def test_scenario_ledger_is_as_documented(world: World) -> None:
    shape, (status, posted) = await _run_scenario(world, None)
    assert status == "paid"
    refund_1 = PROFESSIONAL_MC * 300 // 4999
    refund_2 = PROFESSIONAL_MC * 200 // 4999
    disputed = PROFESSIONAL_MC * 499 // 4999
    assert shape == sorted(
        [
            ("purchase", PROFESSIONAL_MC, "purchase:CS"),
            ("reversal", -refund_1, "refund:RE1"),
            ("reversal", refund_1, "refund:RE1:reinstated"),
            ("reversal", -refund_2, "refund:RE2"),
            ("reversal", -disputed, "dispute:DU:opened"),
        ]
    )
    assert posted.balance_millicredits == PROFESSIONAL_MC - refund_2 - disputed


async def test_repeated_event_changes_nothing(world: World) -> None:
    account = await world.account()
    _, session_id = await world.checkout(account)
    event = world.stripe.event("checkout.session.completed", world.stripe.pay(session_id))

    first = await process_event(world.pool, None, event)
    again = await process_event(world.pool, None, event)

    assert (first.duplicate, first.outcome) == (False, "processed")
    assert (again.duplicate, again.outcome) == (True, "duplicate")
    assert len(await world.entries(account)) == 1
    row = await world.pool.fetchrow("SELECT * FROM stripe_events WHERE event_id = $1", event["id"])
    assert (row["event_type"], row["outcome"], row["object_id"]) == (
        "checkout.session.completed",
        "processed",
        session_id,
    )


async def test_unknown_event_type_is_stored_as_unhandled(world: World) -> None:
    event = world.stripe.event("customer.created", {"id": "cus_test_1", "object": "customer"})

    result = await process_event(world.pool, None, event)

    assert (result.duplicate, result.outcome) == (False, "unhandled")
    assert await world.pool.fetchval("SELECT outcome FROM stripe_events") == "unhandled"


async def test_many_concurrent_accounts_keep_their_books(world: World) -> None:
    accounts = [await world.account() for _ in range(5)]
    sessions = [(await world.checkout(a, "starter"))[1] for a in accounts]
    events = []
    for session_id in sessions:
        events.append(
            world.stripe.event("checkout.session.completed", world.stripe.pay(session_id))
        )
        events.append(world.stripe.event("refund.created", world.stripe.refund(session_id, 333)))
    random.Random(7).shuffle(events)

    await asyncio.gather(*(process_event(world.pool, None, e) for e in events * 3))

    for account in accounts:
        await world.assert_books_balance(account)
        posted = await world.balance(account)
        assert posted.balance_millicredits == STARTER_MC - STARTER_MC * 333 // 999
