"""The gateway SIGKILLed under paid traffic: mid-stream, and right after a delivery."""

from __future__ import annotations

import asyncio
import time

import pytest

from devtools.simulator import Scenario
from tests.faults.stack import FaultStack
from tests.faults.traffic import DEFAULT_SCENARIO, Traffic
from tests.faults.verdict import assert_verdict

# Bounded: a failing case waits out its verdict's timeouts (recovery 60 s, settling 30 s).
pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


async def test_gateway_sigkill_mid_stream(stack: FaultStack, traffic: Traffic) -> None:
    await asyncio.sleep(1.0)
    # Slow answers from now on: every request in flight is mid-answer when the kill comes.
    stack.sim.set_default(Scenario(chunks=10, delay_s=0.1))
    await asyncio.sleep(1.5)
    in_flight = sum(1 for r in stack.sim.requests if r.outcome == "pending")
    stack.gateway.kill()
    ended = time.monotonic()  # recovery includes the new process's start
    assert in_flight > 0, "no answer was in flight at the kill"
    stack.sim.set_default(DEFAULT_SCENARIO)
    await stack.gateway.start()  # a new process: the old one's holds expire
    await assert_verdict(stack, traffic, case="gateway SIGKILL mid-stream", fault_ended_at=ended)


async def test_gateway_sigkill_after_delivery(stack: FaultStack, traffic: Traffic) -> None:
    await asyncio.sleep(1.0)
    traffic.delivered.clear()
    await asyncio.wait_for(traffic.delivered.wait(), 10)  # kill right after a delivery
    stack.gateway.kill()
    ended = time.monotonic()
    await stack.gateway.start()
    await assert_verdict(
        stack, traffic, case="gateway SIGKILL after delivery", fault_ended_at=ended
    )
