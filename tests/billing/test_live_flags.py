"""billing.live_flags: the definitions, the snapshot, the rollout hash and the flags table."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
import pytest

from billing import live_flags
from billing.audit import Actor
from billing.control import CONTROL_CHANNEL
from billing.live_flags import (
    DEFINITIONS,
    Billing,
    ChargingPausedMode,
    FlagValueError,
    LiveFlags,
    UnknownFlagError,
    in_rollout,
)
from billing.metering.pricing import RoundingMode

ADMIN = Actor(kind="cli", name="cli")


def test_definitions_are_the_runbooks_seven_names_each_a_liveflags_attribute():
    assert [d.name for d in DEFINITIONS] == [
        "billing.purchase_enabled",
        "billing.charging_enabled",
        "billing.charging_paused_mode",
        "billing.rounding_mode",
        "billing.model_allowlist",
        "billing.low_balance_threshold_credits",
        "billing.charging_rollout_percent",
    ]
    defaults = LiveFlags()
    for flag in DEFINITIONS:
        assert defaults.value(flag) == flag.default
        assert flag.description and flag.kind.json_schema


def test_defaults_match_the_issue():
    flags = LiveFlags()
    assert flags.charging_paused_mode is ChargingPausedMode.FREE
    assert flags.low_balance_threshold_credits == 500
    assert flags.charging_rollout_percent == 100


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("billing.purchase_enabled", False, False),
        ("billing.charging_paused_mode", "block", ChargingPausedMode.BLOCK),
        ("billing.rounding_mode", "ceil", RoundingMode.CEIL),
        ("billing.model_allowlist", [" gpt-4o ", "gpt-4o-mini"], {"gpt-4o", "gpt-4o-mini"}),
        ("billing.model_allowlist", [], frozenset()),
        ("billing.low_balance_threshold_credits", 0, 0),
        ("billing.charging_rollout_percent", 100, 100),
    ],
)
def test_from_json_accepts_valid_values(name, value, expected):
    assert live_flags.definition(name).from_json(value) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("billing.purchase_enabled", "false"),
        ("billing.charging_enabled", 1),
        ("billing.charging_paused_mode", "BLOCK"),
        ("billing.rounding_mode", "floor"),
        ("billing.model_allowlist", "gpt-4o"),
        ("billing.model_allowlist", ["gpt-4o", ""]),
        ("billing.model_allowlist", [3]),
        ("billing.low_balance_threshold_credits", -1),
        ("billing.low_balance_threshold_credits", 2.5),
        ("billing.charging_rollout_percent", 101),
        ("billing.charging_rollout_percent", True),
        ("billing.charging_rollout_percent", None),
    ],
)
def test_from_json_refuses_invalid_values_naming_the_flag(name, value):
    with pytest.raises(FlagValueError) as info:
        live_flags.definition(name).from_json(value)
    assert info.value.name == name
    assert info.value.reason.startswith("must be")


def test_unknown_flag_name_raises():
    with pytest.raises(UnknownFlagError):
        live_flags.definition("billing.nope")


def test_with_overrides_applies_rows_and_ignores_bad_ones():
    initial = LiveFlags(charging_rollout_percent=50)
    flags = initial.with_overrides(
        {
            "billing.charging_enabled": False,
            "billing.rounding_mode": "sideways",  # not accepted: initial stays
            "billing.unknown": 1,
            "billing.model_allowlist": ["gpt-4o"],
        }
    )
    assert flags.charging_enabled is False
    assert flags.rounding_mode is RoundingMode.EXACT
    assert flags.model_allowlist == frozenset({"gpt-4o"})
    assert flags.charging_rollout_percent == 50
    assert initial.charging_enabled is True  # snapshots are immutable


def test_billing_for_charging_off_is_free_or_blocked_by_mode():
    assert LiveFlags(charging_enabled=False).billing_for(7) is Billing.UNCHARGED
    blocked = LiveFlags(charging_enabled=False, charging_paused_mode=ChargingPausedMode.BLOCK)
    assert blocked.billing_for(7) is Billing.BLOCKED
    assert LiveFlags().billing_for(7) is Billing.CHARGED


def test_billing_for_rollout_zero_and_hundred():
    assert all(
        LiveFlags(charging_rollout_percent=0).billing_for(a) is Billing.UNCHARGED
        for a in range(1, 200)
    )
    assert all(
        LiveFlags(charging_rollout_percent=100).billing_for(a) is Billing.CHARGED
        for a in range(1, 200)
    )


def test_rollout_hash_is_stable_and_close_to_the_percent():
    # Stable across processes and releases: CRC-32 of the decimal id (not the salted hash()).
    # Buckets of ids 1, 2, 3, 42, 1000: 83, 37, 11, 88, 35.
    assert [in_rollout(a, 36) for a in (1, 2, 3, 42, 1000)] == [False, False, True, False, True]
    assert [in_rollout(a, 84) for a in (1, 2, 3, 42, 1000)] == [True, True, True, False, True]
    accounts = range(1, 20_001)
    for percent in (5, 25, 50):
        share = sum(in_rollout(a, percent) for a in accounts) / len(accounts)
        assert abs(share - percent / 100) < 0.02, (percent, share)


def test_rollout_raising_the_percent_only_adds_accounts():
    for account_id in range(1, 500):
        for percent in range(100):
            assert in_rollout(account_id, percent) <= in_rollout(account_id, percent + 1)


# -- the flags table --------------------------------------------------------------------


async def _audit(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT action, target_type, target_id, before, after FROM audit_log ORDER BY id"
    )


async def test_set_flag_overrides_audits_and_notifies(pool: asyncpg.Pool, database_url: str):
    events: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(CONTROL_CHANNEL, lambda *args: events.put_nowait(args[3]))
    try:
        async with pool.acquire() as conn:
            state = await live_flags.set_flag(
                conn, ADMIN, "billing.charging_rollout_percent", 25, LiveFlags()
            )
        assert (state.value, state.initial_value, state.source) == (25, 100, "database")
        assert state.updated_by == "cli"
        assert orjson.loads(await asyncio.wait_for(events.get(), 5)) == {"kind": "flags"}
    finally:
        await listener.close()
    flags = await live_flags.load_flags(pool, LiveFlags())
    assert flags.charging_rollout_percent == 25
    [row] = await _audit(pool)
    assert (row["action"], row["target_type"], row["target_id"]) == (
        "flag.set",
        "flag",
        "billing.charging_rollout_percent",
    )
    assert orjson.loads(row["before"]) == {"value": 100, "source": "environment"}
    assert orjson.loads(row["after"]) == {"value": 25, "source": "database"}


async def test_reset_flag_deletes_the_row_back_to_the_initial_value(pool: asyncpg.Pool):
    initial = LiveFlags(rounding_mode=RoundingMode.CEIL)
    async with pool.acquire() as conn:
        await live_flags.set_flag(conn, ADMIN, "billing.rounding_mode", "exact", initial)
        state = await live_flags.reset_flag(conn, ADMIN, "billing.rounding_mode", initial)
    assert (state.value, state.source, state.updated_at) == ("ceil", "environment", None)
    assert await pool.fetchval("SELECT count(*) FROM flags") == 0
    assert (await live_flags.load_flags(pool, initial)).rounding_mode is RoundingMode.CEIL
    rows = await _audit(pool)
    assert [r["action"] for r in rows] == ["flag.set", "flag.reset"]
    assert orjson.loads(rows[1]["before"]) == {"value": "exact", "source": "database"}
    assert orjson.loads(rows[1]["after"]) == {"value": "ceil", "source": "environment"}


async def test_set_flag_refuses_a_bad_value_and_changes_nothing(pool: asyncpg.Pool):
    async with pool.acquire() as conn:
        with pytest.raises(FlagValueError):
            await live_flags.set_flag(conn, ADMIN, "billing.rounding_mode", "up", LiveFlags())
        with pytest.raises(UnknownFlagError):
            await live_flags.set_flag(conn, ADMIN, "billing.nope", True, LiveFlags())
    assert await pool.fetchval("SELECT count(*) FROM flags") == 0
    assert await _audit(pool) == []


async def test_flag_states_list_every_flag_with_its_source(pool: asyncpg.Pool):
    async with pool.acquire() as conn:
        await live_flags.set_flag(conn, ADMIN, "billing.model_allowlist", ["b", "a"], LiveFlags())
    states = {s.name: s for s in await live_flags.flag_states(pool, LiveFlags())}
    assert list(states) == [d.name for d in DEFINITIONS]
    assert states["billing.model_allowlist"].value == ["a", "b"]
    assert states["billing.model_allowlist"].source == "database"
    assert states["billing.charging_enabled"].source == "environment"


async def test_application_role_may_reset_a_flag(pool: asyncpg.Pool):
    assert await pool.fetchval("SELECT has_table_privilege('creditgate_app', 'flags', 'DELETE')")
