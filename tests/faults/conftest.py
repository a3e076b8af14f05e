"""Fixtures of the fault suite: a migrated PostgreSQL template per session and, per case, a
``FaultStack`` of its own (servers it may kill), stopped whatever happens."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.stack import FaultStack, PostgresTemplate
from tests.faults.traffic import Traffic
from tests.faults.verdict import RECOVERY_TIMES

StackFactory = Callable[..., Awaitable[FaultStack]]


@pytest.fixture(scope="session")
def pg_template() -> Iterator[PostgresTemplate]:
    with tempfile.TemporaryDirectory(prefix="cg-fault-tpl-", ignore_cleanup_errors=True) as tmp:
        yield PostgresTemplate(Path(tmp)).build()


@pytest.fixture
async def make_stack(pg_template: PostgresTemplate) -> AsyncIterator[StackFactory]:
    """``await make_stack(**env)``: a started stack whose gateway has ``env`` on top of the
    suite's short settings."""
    stacks: list[FaultStack] = []

    async def make(**settings: str) -> FaultStack:
        stack = FaultStack(pg_template, **settings)
        stacks.append(stack)
        return await stack.__aenter__()

    try:
        yield make
    finally:
        for stack in stacks:
            await stack.__aexit__(None, None, None)


@pytest.fixture
async def stack(make_stack: StackFactory) -> FaultStack:
    return await make_stack()


@pytest.fixture
async def traffic(stack: FaultStack) -> AsyncIterator[Traffic]:
    """Started background traffic on ``stack``; stopped and closed after the case."""
    running = await Traffic(stack).start()
    try:
        yield running
    finally:
        await running.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RECOVERY_TIMES:
        terminalreporter.section("fault suite: time to serve again after the fault")
        for case, seconds in RECOVERY_TIMES:
            terminalreporter.write_line(f"{case:60s} {seconds:6.2f} s")
