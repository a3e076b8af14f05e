"""Redis faults under paid traffic: killed and restarted empty, paused, shut down with AOF."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.stack import FaultStack
from tests.faults.traffic import Traffic
from tests.faults.verdict import assert_verdict

# Bounded: a failing case waits out its verdict's timeouts (recovery 60 s, settling 30 s).
pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


async def test_no_fault_baseline(stack: FaultStack, traffic: Traffic) -> None:
    await asyncio.sleep(1.0)
    await assert_verdict(stack, traffic, case="baseline", fault_ended_at=time.monotonic())


async def test_redis_killed_and_restarted_empty(stack: FaultStack, traffic: Traffic) -> None:
    await asyncio.sleep(1.0)
    await stack.kill_redis(keep_data=False)
    await asyncio.sleep(1.0)
    await stack.start_redis_again()
    ended = time.monotonic()
    await assert_verdict(stack, traffic, case="redis killed, restarted empty", fault_ended_at=ended)


@pytest.mark.parametrize("pause_s", [3, 5, 12])
async def test_redis_paused(stack: FaultStack, traffic: Traffic, pause_s: int) -> None:
    await asyncio.sleep(1.0)
    # CLIENT PAUSE ALL, as Redis's own FAILOVER does: every client's commands wait.
    await stack.redis_command("CLIENT", "PAUSE", str(pause_s * 1000), "ALL")
    await asyncio.sleep(pause_s)
    ended = time.monotonic()
    await assert_verdict(stack, traffic, case=f"redis paused {pause_s} s", fault_ended_at=ended)


async def test_redis_shutdown_nosave_with_aof(stack: FaultStack, traffic: Traffic) -> None:
    await asyncio.sleep(1.0)
    await stack.shutdown_redis_nosave()
    await asyncio.sleep(0.5)
    await stack.start_redis_again()
    ended = time.monotonic()
    await assert_verdict(
        stack, traffic, case="redis SHUTDOWN NOSAVE with AOF", fault_ended_at=ended
    )
