"""Package versions: editing, activating, seeding and buying across an edit, against a real
Postgres (checkout objects from ``tests.billing.purchase_world``)."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
import pytest

from billing.audit import CLI_ACTOR
from billing.control import CONTROL_CHANNEL
from billing.purchases.packages import (
    DuplicatePackageError,
    PackageSpec,
    UnknownPackageError,
    create_package,
    edit_package,
    get_package,
    list_packages,
    package_versions,
    seed_packages,
    set_package_active,
)
from billing.purchases.purchase_records import apply_checkout_session, get_purchase
from tests.billing.purchase_world import STARTER_MC, World


async def edit(pool: asyncpg.Pool, code: str, **changes):
    async with pool.acquire() as conn:
        return await edit_package(conn, CLI_ACTOR, code, changes)


async def audit_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM audit_log ORDER BY id")


async def test_price_edit_makes_a_new_version_and_supersedes_the_old(pool: asyncpg.Pool) -> None:
    v1 = await get_package(pool, "starter")

    v2 = await edit(pool, "starter", price_minor_units=1_099, base_millicredits=11_000_000)

    assert (v2.code, v2.version, v2.price_minor_units, v2.total_millicredits) == (
        "starter",
        2,
        1_099,
        11_000_000,
    )
    assert v2.id != v1.id and v2.superseded_at is None
    assert (v2.name, v2.sort_order, v2.currency) == (v1.name, v1.sort_order, v1.currency)
    assert await get_package(pool, "starter") == v2
    versions = await package_versions(pool, "starter")
    assert [p.version for p in versions] == [2, 1]
    assert versions[1].price_minor_units == 999 and versions[1].superseded_at is not None
    assert [p.code for p in await list_packages(pool)] == ["starter", "professional", "enterprise"]
    await edit(pool, "starter", sort_order=99)  # in place: the old version keeps its 10
    history = await list_packages(pool, include_history=True)
    assert [(p.code, p.version) for p in history] == [
        ("professional", 1),
        ("enterprise", 1),
        ("starter", 2),
        ("starter", 1),
    ]
    row, _ = await audit_rows(pool)
    assert (row["action"], row["target_type"], row["target_id"]) == (
        "package.edit",
        "package",
        "starter",
    )
    assert orjson.loads(row["before"])["version"] == 1
    assert orjson.loads(row["after"])["version"] == 2


async def test_cosmetic_edit_changes_the_current_version_in_place(pool: asyncpg.Pool) -> None:
    v1 = await get_package(pool, "starter")

    edited = await edit(
        pool, "starter", name="Starter+", badge="New", tagline="Try it", sort_order=5
    )
    # A versioned field given its current value is no change.
    same = await edit(pool, "starter", price_minor_units=999, badge=None)

    assert (edited.id, edited.version) == (v1.id, 1)
    assert (edited.name, edited.badge, edited.tagline, edited.sort_order) == (
        "Starter+",
        "New",
        "Try it",
        5,
    )
    assert (same.id, same.badge, same.price_minor_units) == (v1.id, None, 999)
    assert len(await package_versions(pool, "starter")) == 1
    assert len(await audit_rows(pool)) == 2


async def test_stripe_price_id_change_makes_a_new_version(pool: asyncpg.Pool) -> None:
    v2 = await edit(pool, "enterprise", stripe_price_id="price_new")
    assert (v2.version, v2.stripe_price_id, v2.badge) == (2, "price_new", "Best value")


async def test_concurrent_edits_make_successive_versions(pool: asyncpg.Pool) -> None:
    edits = await asyncio.gather(
        *(edit(pool, "professional", price_minor_units=5_000 + i) for i in range(5))
    )

    assert sorted(p.version for p in edits) == [2, 3, 4, 5, 6]
    versions = await package_versions(pool, "professional")
    assert [p.superseded_at is None for p in versions] == [True] + [False] * 5
    assert len(await audit_rows(pool)) == 5


async def test_edit_of_an_unknown_package_or_field_is_refused(pool: asyncpg.Pool) -> None:
    with pytest.raises(UnknownPackageError):
        await edit(pool, "platinum", name="x")
    with pytest.raises(ValueError, match="not editable"):
        await edit(pool, "starter", total_millicredits=1)
    with pytest.raises(UnknownPackageError):
        await package_versions(pool, "platinum")
    assert await audit_rows(pool) == []


async def test_create_then_duplicate_code_conflicts(pool: asyncpg.Pool) -> None:
    spec = PackageSpec("team", "Team", 19_900, "usd", 200_000_000, 20_000_000, 25, tagline="x")
    events: asyncio.Queue[str] = asyncio.Queue()

    def heard(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        events.put_nowait(payload)

    async with pool.acquire() as listening:
        await listening.add_listener(CONTROL_CHANNEL, heard)
        async with pool.acquire() as conn:
            created = await create_package(conn, CLI_ACTOR, spec)
            with pytest.raises(DuplicatePackageError):
                await create_package(conn, CLI_ACTOR, spec)
        payload = await asyncio.wait_for(events.get(), timeout=10)
        await listening.remove_listener(CONTROL_CHANNEL, heard)

    assert orjson.loads(payload) == {"kind": "packages"}
    assert (created.version, created.total_millicredits, created.tagline) == (1, 220_000_000, "x")
    assert [p.code for p in await list_packages(pool)][-2:] == ["team", "enterprise"]
    [row] = await audit_rows(pool)
    assert (row["action"], row["before"]) == ("package.create", None)


async def test_deactivated_package_cannot_be_bought_and_is_not_listed(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        off = await set_package_active(conn, CLI_ACTOR, "starter", active=False)
        assert (off.active, off.version) == (False, 1)
        with pytest.raises(UnknownPackageError):
            await get_package(conn, "starter")
        assert "starter" not in [p.code for p in await list_packages(conn)]
        assert "starter" in [p.code for p in await list_packages(conn, include_inactive=True)]
        on = await set_package_active(conn, CLI_ACTOR, "starter", active=True)
    assert on.active and (await get_package(pool, "starter")).id == on.id
    actions = [r["action"] for r in await audit_rows(pool)]
    assert actions == ["package.deactivate", "package.activate"]


async def test_seed_leaves_an_existing_package_alone(pool: asyncpg.Pool) -> None:
    edited = await edit(pool, "starter", price_minor_units=1_299, stripe_price_id="price_123")

    async with pool.acquire() as conn:
        seeded = await seed_packages(conn)
        again = await seed_packages(conn)

    assert seeded == again
    assert await get_package(pool, "starter") == edited
    assert [p.price_minor_units for p in await package_versions(pool, "starter")] == [1_299, 999]
    assert [p.code for p in seeded] == ["starter", "professional", "enterprise"]


async def test_seed_inserts_a_missing_default_package(pool: asyncpg.Pool) -> None:
    await pool.execute("DELETE FROM packages WHERE code = 'enterprise'")

    async with pool.acquire() as conn:
        seeded = await seed_packages(conn)

    assert (seeded[-1].code, seeded[-1].version, seeded[-1].total_millicredits) == (
        "enterprise",
        1,
        109_990_000,
    )


async def test_purchase_before_an_edit_keeps_its_version_and_is_fulfilled_as_bought(
    world: World,
) -> None:
    account = await world.account()
    purchase, session_id = await world.checkout(account, "starter")
    bought = await get_package(world.pool, "starter")

    newer = await edit(world.pool, "starter", price_minor_units=1_999, bonus_millicredits=1_000)
    update = await world.apply(apply_checkout_session, world.stripe.pay(session_id))

    stored = await get_purchase(world.pool, purchase.public_id)
    assert (stored.package_id, stored.price_minor_units, stored.total_millicredits) == (
        bought.id,
        999,
        STARTER_MC,
    )
    assert stored.package_id != newer.id
    assert update.purchase.status == "paid"
    assert [e.amount_millicredits for e in update.entries] == [STARTER_MC]
    assert (await world.balance(account)).balance_millicredits == STARTER_MC
    # The next buyer gets the new version.
    later, _ = await world.checkout(await world.account(), "starter")
    assert (later.package_id, later.price_minor_units) == (newer.id, 1_999)
