"""Network faults between the gateway and Redis or PostgreSQL, through ``FaultProxy``:
added latency, a blackhole, reset connections."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.stack import FaultStack
from tests.faults.tcp_proxy import FaultProxy
from tests.faults.traffic import Traffic
from tests.faults.verdict import assert_verdict

# Bounded: a failing case waits out its verdict's timeouts (recovery 60 s, settling 30 s).
pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

_FAULT_S = 3.0


def _proxy(stack: FaultStack, target: str) -> FaultProxy:
    return stack.redis_proxy if target == "redis" else stack.pg_proxy


async def _lift_after(proxy: FaultProxy, seconds: float) -> float:
    await asyncio.sleep(seconds)
    proxy.set_mode("pass")
    return time.monotonic()


@pytest.mark.parametrize("target", ["redis", "postgres"])
async def test_latency(stack: FaultStack, traffic: Traffic, target: str) -> None:
    await asyncio.sleep(1.0)
    proxy = _proxy(stack, target)
    proxy.set_mode("latency", latency_s=0.05)
    ended = await _lift_after(proxy, _FAULT_S)
    await assert_verdict(stack, traffic, case=f"{target}: 50 ms latency", fault_ended_at=ended)


@pytest.mark.parametrize("target", ["redis", "postgres"])
async def test_blackhole(stack: FaultStack, traffic: Traffic, target: str) -> None:
    await asyncio.sleep(1.0)
    proxy = _proxy(stack, target)
    proxy.set_mode("blackhole")
    ended = await _lift_after(proxy, _FAULT_S)
    await assert_verdict(stack, traffic, case=f"{target}: 3 s blackhole", fault_ended_at=ended)


@pytest.mark.parametrize("target", ["redis", "postgres"])
async def test_reset_connections(stack: FaultStack, traffic: Traffic, target: str) -> None:
    await asyncio.sleep(1.0)
    proxy = _proxy(stack, target)
    for _ in range(3):  # open connections reset, new ones reset on accept, for a while
        proxy.set_mode("reset")
        await asyncio.sleep(0.3)
        proxy.set_mode("pass")
        await asyncio.sleep(0.5)
    ended = time.monotonic()
    await assert_verdict(stack, traffic, case=f"{target}: connections reset", fault_ended_at=ended)
