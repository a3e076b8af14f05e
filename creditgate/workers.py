"""``creditgate serve`` with ``WORKERS`` > 1: one parent process and its worker processes.

Every worker is a whole ``creditgate serve`` (``creditgate.serve.run_services``: the gateway,
the admin service, its own ``/metrics``), and all of them bind the gateway's and the admin
service's ports with ``SO_REUSEPORT``: the kernel spreads new connections over the workers.
Worker ``i`` serves ``/metrics`` on ``METRICS_PORT + i`` (counters are per process; each worker
is its own scrape target).

The parent serves nothing. It:

- checks Redis's eviction policy once (``runtime.resources.check_eviction_policy``; each
  worker checks again as any gateway process does), so a refused Redis is one error;
- starts the workers with multiprocessing's *spawn* (a fresh interpreter each: no event
  loop, pool or socket is inherited from the parent) and prints ``READY`` once all of them
  are ready; a worker that fails before it is ready at start-up stops the fleet
  (``WorkerStartupError``, exit status 1);
- restarts a worker that dies (logged; after a worker that died within
  ``RESTART_STABLE_S`` of its start, the delay doubles from ``RESTART_BACKOFF_S`` up to
  ``MAX_RESTART_BACKOFF_S``);
- on SIGTERM or SIGINT sends SIGTERM to every worker (each stops accepting, lets in-flight
  requests and streams finish within ``SHUTDOWN_TIMEOUT_S``, settles and drains as a single
  process does, and exits), waits up to ``SHUTDOWN_TIMEOUT_S + SHUTDOWN_MARGIN_S``, then
  kills what is left.

A worker whose parent dies (even by SIGKILL) stops as on SIGTERM: it watches the parent's
sentinel (``multiprocessing.parent_process()``).

Source: the pre-fork model of gunicorn's arbiter and nginx's master process, with
``SO_REUSEPORT`` (Linux 3.9+) instead of a shared listening socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

import redis.asyncio as aioredis

from creditgate.serve import ready_line, run_event_loop, run_services
from runtime.json_logs import install_json_logging
from runtime.redaction import install_redacting_filter
from runtime.resources import check_eviction_policy
from runtime.settings import Settings

log = logging.getLogger(__name__)

#: Seconds a worker must have run for its death to count as "not at once" (no backoff).
RESTART_STABLE_S = 10.0
#: Delay before restarting a worker that died at once; doubled for each such death in a row.
RESTART_BACKOFF_S = 0.5
MAX_RESTART_BACKOFF_S = 30.0
#: Seconds the parent waits beyond ``SHUTDOWN_TIMEOUT_S`` for the workers' settling and
#: draining after the in-flight requests (the settlement rescue's 5 s, the poster's 5 s,
#: the admin service's own in-flight requests) before it kills them.
SHUTDOWN_MARGIN_S = 20.0
#: Seconds a worker gets to become ready at start-up before the fleet gives up.
READY_TIMEOUT_S = 120.0


class WorkerStartupError(ChildProcessError):
    """A worker could not start serving when the fleet started (its error, or its exit);
    an ``OSError``, so ``creditgate serve`` prints it as one JSON error and exits 1."""


@dataclass(eq=False)
class WorkerSlot:
    """Worker ``index`` of the fleet: its current process and restart bookkeeping."""

    index: int
    process: BaseProcess | None = None
    channel: Connection | None = None
    started_at: float = 0.0
    ready: bool = False
    quick_deaths: int = 0
    restart_at: float | None = None


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: ``METRICS_PORT + index`` (0 stays 0: no ``/metrics``)."""
    if not settings.metrics_port:
        return settings
    return dataclasses.replace(settings, metrics_port=settings.metrics_port + index)


def run_worker(settings: Settings, index: int, channel: Connection) -> None:
    """A worker process's entry point (spawned): serve until SIGTERM/SIGINT or the parent's
    death; tell the parent ``("ready", pid)`` once serving, or ``("failed", text)`` when
    start-up failed (then exit status 1, no traceback: the parent reports it)."""
    install_json_logging(logging.INFO)
    install_redacting_filter()
    told_ready = False

    def ready() -> None:
        nonlocal told_ready
        channel.send(("ready", os.getpid()))
        told_ready = True

    try:
        run_event_loop(_serve_in_worker(worker_settings(settings, index), ready))
    except Exception as exc:
        if told_ready:  # the parent restarts it
            log.exception("worker %d stopped on an error", index)
            raise SystemExit(1) from None
        with contextlib.suppress(OSError):
            channel.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


async def _serve_in_worker(settings: Settings, ready: Callable[[], None]) -> None:
    """``run_services`` on the shared ports, stopping also when the parent dies."""
    stop = asyncio.Event()
    parent = multiprocessing.parent_process()
    if parent is not None:
        loop = asyncio.get_running_loop()

        def parent_died() -> None:
            loop.remove_reader(parent.sentinel)  # readable from now on: watch it once
            log.warning("the parent process died; stopping")
            stop.set()

        loop.add_reader(parent.sentinel, parent_died)
    await run_services(settings, stop, ready=ready, reuse_port=True)


class Fleet:
    """The parent of ``WORKERS`` worker processes (see the module's docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots = [WorkerSlot(index) for index in range(settings.workers)]
        self._context = multiprocessing.get_context("spawn")
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()

    def run(self) -> None:
        """Start the workers, print READY, keep them running until SIGTERM/SIGINT, stop them.

        Raises:
            RedisEvictionPolicyError: Redis may evict keys (nothing was started).
            WorkerStartupError: a worker failed before it was ready (the others are stopped).
        """
        asyncio.run(_check_redis(self.settings))
        os.set_blocking(self._wake_w, False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            for slot in self.slots:
                self._start(slot)
            self._wait_until_ready()
            if not self._stopping:
                print(ready_line(self.settings), flush=True)
                self._supervise()
        finally:
            self._stop_all()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _start(self, slot: WorkerSlot) -> None:
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run_worker,
            args=(self.settings, slot.index, sender),
            name=f"creditgate-worker-{slot.index}",
        )
        process.start()
        sender.close()  # the worker holds the only writer: its exit is EOF here
        slot.process, slot.channel = process, receiver
        slot.started_at, slot.ready, slot.restart_at = time.monotonic(), False, None
        log.info("worker %d started (pid %s)", slot.index, process.pid)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._stopping and not all(slot.ready for slot in self.slots):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerStartupError(f"workers not ready within {READY_TIMEOUT_S:.0f} s")
            waiting = [slot for slot in self.slots if not slot.ready]
            self._wait([slot.channel for slot in waiting if slot.channel], remaining)
            for slot in waiting:
                failure = self._read_channel(slot)
                if failure is not None:
                    raise WorkerStartupError(f"worker {slot.index} could not start: {failure}")

    def _read_channel(self, slot: WorkerSlot) -> str | None:
        """Take the worker's message if one is there; returns its failure text, if any."""
        channel = slot.channel
        if channel is None or not channel.poll():
            return None
        try:
            kind, detail = channel.recv()
        except (EOFError, OSError):
            slot.channel = None
            channel.close()
            assert slot.process is not None
            slot.process.join(timeout=5)
            return f"exited with status {slot.process.exitcode} before it was ready"
        if kind == "ready":
            slot.ready = True
            log.info("worker %d ready (pid %s)", slot.index, detail)
            return None
        return str(detail)

    def _supervise(self) -> None:
        while not self._stopping:
            self._wait(self._watched(), self._next_restart_in())
            now = time.monotonic()
            for slot in self.slots:
                if slot.restart_at is not None:
                    if now >= slot.restart_at and not self._stopping:
                        self._start(slot)
                    continue
                if slot.process is not None and not slot.process.is_alive():
                    self._schedule_restart(slot, now)
                elif not slot.ready and (failure := self._read_channel(slot)) is not None:
                    log.error("worker %d could not start: %s", slot.index, failure)

    def _watched(self) -> list[Connection | int]:
        watched: list[Connection | int] = []
        for slot in self.slots:
            if slot.process is not None and slot.restart_at is None:
                watched.append(slot.process.sentinel)
                if not slot.ready and slot.channel is not None:
                    watched.append(slot.channel)
        return watched

    def _next_restart_in(self) -> float | None:
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _schedule_restart(self, slot: WorkerSlot, now: float) -> None:
        assert slot.process is not None
        slot.process.join(timeout=0)
        uptime_s = now - slot.started_at
        slot.quick_deaths = slot.quick_deaths + 1 if uptime_s < RESTART_STABLE_S else 0
        delay_s = (
            0.0
            if slot.quick_deaths == 0
            else min(RESTART_BACKOFF_S * 2 ** (slot.quick_deaths - 1), MAX_RESTART_BACKOFF_S)
        )
        log.error(
            "worker %d (pid %s) died with status %s after %.1f s; restarting in %.1f s",
            slot.index,
            slot.process.pid,
            slot.process.exitcode,
            uptime_s,
            delay_s,
        )
        if slot.channel is not None:
            slot.channel.close()
            slot.channel = None
        slot.restart_at = now + delay_s

    def _wait(self, watched: list[Connection | int], timeout_s: float | None) -> None:
        """Until one of ``watched`` is ready, a signal arrives, or ``timeout_s`` passes."""
        wait([*watched, self._wake_r], timeout_s)
        with contextlib.suppress(BlockingIOError):
            os.set_blocking(self._wake_r, False)
            os.read(self._wake_r, 512)

    def _stop_all(self) -> None:
        """SIGTERM every worker; SIGKILL those still running after the shutdown budget."""
        running = [s for s in self.slots if s.process is not None and s.process.is_alive()]
        for slot in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(_pid(slot), signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + SHUTDOWN_MARGIN_S
        for slot in running:
            assert slot.process is not None
            slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                log.error("worker %d (pid %s) still running: killed", slot.index, _pid(slot))
                slot.process.kill()
                slot.process.join(timeout=5)
            log.info(
                "worker %d (pid %s) exited with status %s",
                slot.index,
                _pid(slot),
                slot.process.exitcode,
            )
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.close()
                slot.channel = None


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _pid(slot: WorkerSlot) -> int:
    assert slot.process is not None and slot.process.pid is not None
    return slot.process.pid


async def _check_redis(settings: Settings) -> None:
    client = aioredis.from_url(
        settings.redis_url, socket_connect_timeout=settings.redis_connect_timeout_s
    )
    try:
        await check_eviction_policy(client)
    finally:
        await client.aclose()


def run_fleet(settings: Settings) -> None:
    """Blocking entry point of ``creditgate serve`` with ``WORKERS`` > 1 (see the module)."""
    Fleet(settings).run()
