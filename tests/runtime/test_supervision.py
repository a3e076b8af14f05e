"""``runtime.supervision``: a background loop that fails is logged and restarted; a
cancellation stops it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from runtime.supervision import periodically, supervise


async def test_supervise_loop_raising_unexpected_errors_is_restarted(caplog) -> None:
    calls = 0
    running = asyncio.Event()

    async def run() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("connection closed under the loop")
        if calls == 2:
            raise KeyError("malformed member")
        running.set()
        await asyncio.Event().wait()

    caplog.set_level(logging.ERROR, logger="runtime.supervision")
    task = asyncio.create_task(supervise("test-loop", run, initial_backoff_s=0.001))
    await asyncio.wait_for(running.wait(), timeout=10)
    assert calls == 3
    failures = [r for r in caplog.records if "test-loop failed" in r.getMessage()]
    assert [type(r.exc_info[1]) for r in failures if r.exc_info] == [RuntimeError, KeyError]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_supervise_loop_that_returns_is_started_again(caplog) -> None:
    calls = 0
    third = asyncio.Event()

    async def run() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            third.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(supervise("returning", run, initial_backoff_s=0.001))
    await asyncio.wait_for(third.wait(), timeout=10)
    assert sum("returning returned" in r.getMessage() for r in caplog.records) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_supervise_cancelled_stops_without_restarting() -> None:
    calls = 0
    started = asyncio.Event()

    async def run() -> None:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise("cancelled", run, initial_backoff_s=0.001))
    await asyncio.wait_for(started.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert calls == 1


async def test_periodically_step_error_ends_the_loop_for_its_supervisor() -> None:
    steps = 0

    async def step() -> None:
        nonlocal steps
        steps += 1
        if steps == 3:
            raise ValueError("bad member")

    with pytest.raises(ValueError, match="bad member"):
        await asyncio.wait_for(periodically(0.001, step), timeout=10)
    assert steps == 3
