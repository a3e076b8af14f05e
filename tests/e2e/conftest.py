"""Fixtures for the gateway tests: the simulated upstream and an in-process gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.simulator import Simulator
from tests.harness import GatewayHarness, seed_database, test_settings


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator() as simulator:
        yield simulator


@pytest.fixture
async def make_gateway(database_url: str, redis_url: str, sim: Simulator):
    """Factory: ``await make_gateway(**settings_overrides)`` starts a gateway."""
    await seed_database(database_url)
    started: list[GatewayHarness] = []

    async def make(**overrides) -> GatewayHarness:
        settings = test_settings(database_url, redis_url, sim.base_url, **overrides)
        harness = await GatewayHarness(settings, sim).start()
        started.append(harness)
        return harness

    yield make
    for harness in started:
        await harness.stop()


@pytest.fixture
async def gw(make_gateway) -> GatewayHarness:
    return await make_gateway()
