"""PostgreSQL faults under paid traffic: a crash restart, a 20 s outage, the poster's
connections terminated."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.stack import FaultStack
from tests.faults.traffic import Traffic
from tests.faults.verdict import assert_verdict

# Bounded: a failing case waits out its verdict's timeouts (recovery 60 s, settling 30 s).
pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


async def test_postgres_restarted_immediate(stack: FaultStack, traffic: Traffic) -> None:
    await asyncio.sleep(1.0)
    await stack.stop_postgres("immediate")  # a crash: no checkpoint, recovery on start
    await stack.start_postgres_again()
    ended = time.monotonic()
    await assert_verdict(stack, traffic, case="postgres -m immediate restart", fault_ended_at=ended)


async def test_postgres_stopped_20_s(stack: FaultStack, traffic: Traffic) -> None:
    await asyncio.sleep(1.0)
    await stack.stop_postgres("fast")
    await asyncio.sleep(20)
    await stack.start_postgres_again()
    ended = time.monotonic()
    await assert_verdict(stack, traffic, case="postgres stopped 20 s", fault_ended_at=ended)


async def test_postgres_writer_connections_terminated(stack: FaultStack, traffic: Traffic) -> None:
    await asyncio.sleep(1.0)
    terminated = 0
    for _ in range(5):
        terminated += await stack.terminate_gateway_backends()
        await asyncio.sleep(0.4)
    ended = time.monotonic()
    assert terminated > 0, "no gateway connection was terminated"
    await assert_verdict(
        stack, traffic, case="postgres writer connections terminated", fault_ended_at=ended
    )
