"""runtime.control.ControlListener against real Postgres: events run their reactions, a
connection that cannot be made makes every tick drop cached keys, and Postgres down keeps
the flags in use."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import asyncpg
import pytest

from billing import live_flags
from billing.audit import CLI_ACTOR
from billing.control import ControlKind, notify_control
from billing.live_flags import LiveFlags
from devtools.localservices import free_port
from runtime.control import ControlListener


async def _until(check, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"not within {seconds}s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _running(listener: ControlListener):
    task = asyncio.create_task(listener.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _counting(listener: ControlListener) -> Counter[ControlKind]:
    calls: Counter[ControlKind] = Counter()
    for kind in ControlKind:

        async def reaction(kind: ControlKind = kind) -> None:
            calls[kind] += 1

        listener.react(kind, reaction)
    return calls


async def test_event_runs_its_kinds_reactions(pool: asyncpg.Pool, database_url: str):
    listener = ControlListener(database_url, pool, LiveFlags(), refresh_s=30.0)
    calls = _counting(listener)
    async with _running(listener):
        await _until(lambda: listener.connected and calls[ControlKind.RATE_CARDS] == 1)
        before = Counter(calls)  # the connect ran every kind once
        async with pool.acquire() as conn:
            await notify_control(conn, ControlKind.KEYS, api_key_id=3)
        await _until(lambda: calls[ControlKind.KEYS] == before[ControlKind.KEYS] + 1)
        assert calls[ControlKind.RATE_CARDS] == before[ControlKind.RATE_CARDS]


async def test_flags_event_rereads_the_flags(pool: asyncpg.Pool, database_url: str):
    listener = ControlListener(database_url, pool, LiveFlags(), refresh_s=30.0)
    async with _running(listener):
        await _until(lambda: listener.connected)
        async with pool.acquire() as conn:
            await live_flags.set_flag(
                conn, CLI_ACTOR, "billing.charging_enabled", False, LiveFlags()
            )
        await _until(lambda: listener.flags.charging_enabled is False, seconds=2.0)


async def test_listener_unable_to_connect_drops_cached_keys_every_tick(pool: asyncpg.Pool):
    dead = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    listener = ControlListener(dead, pool, LiveFlags(), refresh_s=0.05, connect_timeout_s=1.0)
    calls = _counting(listener)
    async with pool.acquire() as conn:
        await live_flags.set_flag(conn, CLI_ACTOR, "billing.rounding_mode", "ceil", LiveFlags())
    async with _running(listener):
        await _until(lambda: calls[ControlKind.KEYS] >= 3 and calls[ControlKind.ACCOUNTS] >= 3)
        assert not listener.connected
        # The flags are read through the pool all the same.
        assert listener.flags.rounding_mode.value == "ceil"
        assert calls[ControlKind.RATE_CARDS] == 0


async def test_postgres_down_keeps_the_flags_in_use(database_url: str):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await live_flags.set_flag(
            conn, CLI_ACTOR, "billing.charging_rollout_percent", 30, LiveFlags()
        )
    listener = ControlListener(database_url, pool, LiveFlags(), refresh_s=30.0)
    await listener.refresh_flags()
    assert listener.flags.charging_rollout_percent == 30
    pool.terminate()

    await listener.refresh_flags()  # no error: logged, the flags stay

    assert listener.flags.charging_rollout_percent == 30
