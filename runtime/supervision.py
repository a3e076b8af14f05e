"""Supervised background work: a loop that fails is logged and started again, never lost.

``supervise(name, run)`` runs ``run()`` until it is cancelled. Whatever ends ``run()`` other
than a cancellation (an exception its own handling did not expect, or a plain return) is
logged with its traceback, and ``run()`` starts again after a capped exponential backoff.
``periodically(interval_s, step)`` is the loop of a task that runs one step every interval.

Source: Erlang/OTP's supervisors ("let it crash", restart with intensity limits), reduced to
one child per supervisor and a backoff instead of a restart limit: a background loop of a
service must come back when its dependency does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from runtime.metrics import LabelledReading, StatsCollector

log = logging.getLogger(__name__)

INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 30.0


@dataclass(slots=True)
class TaskRestarts:
    """How often each supervised loop was restarted (``counts``: loop name -> restarts), for
    ``creditgate_background_task_restarts_total{task}``; one per process
    (``runtime.appkeys.TASK_RESTARTS``, shared by both apps), passed to ``supervise``."""

    counts: dict[str, int] = field(default_factory=dict)

    def count(self, name: str) -> None:
        """One more restart of the loop ``name``."""
        self.counts[name] = self.counts.get(name, 0) + 1

    def collector(self) -> StatsCollector:
        """``creditgate_background_task_restarts_total{task}``, read at scrape time; register
        it on one registry of the process only."""
        return StatsCollector(
            [],
            [
                LabelledReading(
                    "creditgate_background_task_restarts",
                    "Restarts of supervised background loops after they failed.",
                    "task",
                    lambda: dict(self.counts),
                )
            ],
        )


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    initial_backoff_s: float = INITIAL_BACKOFF_S,
    max_backoff_s: float = MAX_BACKOFF_S,
    restarts: TaskRestarts | None = None,
) -> None:
    """Run ``run()`` again and again until cancelled; returns only by raising
    ``asyncio.CancelledError``.

    Args:
        name: the loop's name in the logs (``settlement-poster``, ``hold-sweeper``, ...).
        run: starts the loop; called once at start and once per restart.
        initial_backoff_s: seconds before the first restart; doubled after each failure up
            to ``max_backoff_s``, and back to this once a run lasted ``max_backoff_s`` or more
            (a loop that ran well for a while and then failed restarts promptly).
        restarts: counts each restart under ``name`` (for the metric), when given.
    """
    loop = asyncio.get_running_loop()
    backoff_s = initial_backoff_s
    while True:
        started = loop.time()
        try:
            await run()
        except Exception:  # anything but a cancellation: log it and start again
            log.exception("background loop %s failed; restarting in %.1fs", name, backoff_s)
        else:
            log.error("background loop %s returned; restarting in %.1fs", name, backoff_s)
        if restarts is not None:
            restarts.count(name)
        if loop.time() - started >= max_backoff_s:
            backoff_s = initial_backoff_s
        await asyncio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, max_backoff_s)


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait until it has really stopped.

    The cancel is repeated: on Python 3.11, ``asyncio.wait_for`` (which redis-py and asyncpg
    use when they connect) drops a cancellation that arrives as the awaited operation
    completes (CPython gh-86296), and the task then loops on as if never cancelled; a single
    cancel and ``await task`` hung the shutdown forever.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def periodically(interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
    """Sleep ``interval_s``, run ``step()``, forever. An exception from ``step`` ends the loop
    (for ``supervise`` to log and restart it); a step handles the failures it expects."""
    while True:
        await asyncio.sleep(interval_s)
        await step()
