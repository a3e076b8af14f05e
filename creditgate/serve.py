"""Run the gateway and the admin service in one process (uvloop when available)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

from aiohttp import web

from admin_api.app import create_admin_app
from gateway.app import create_app
from runtime.http_protocol import edge_runner, ensure_descriptor_budget
from runtime.redaction import install_redacting_filter
from runtime.settings import Settings

log = logging.getLogger(__name__)


# The cyclic collector's generation-0 threshold while serving (CPython's default is 700).
GC_GEN0_THRESHOLD = 7_000


def tune_gc_for_serving() -> None:
    """Keep the cyclic garbage collector off the request path; call once serving has started.

    - ``gc.freeze()``: what is alive then (modules, apps, pools, the tokenizer) lives as long
      as the process, so full collections stop rescanning it.
    - Generation 0 collects every ``GC_GEN0_THRESHOLD`` allocations instead of 700. A request
      allocates hundreds of containers and reference counting frees nearly all of them; at 700
      the collector ran every few requests and rescanned the requests in flight each time.
      Cyclic garbage waits a little longer: a few thousand objects.
    """
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


async def run_services(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve the gateway on ``HOST:PORT`` and the admin app on ``ADMIN_HOST:ADMIN_PORT``
    until ``stop`` is set or SIGINT/SIGTERM arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ensure_descriptor_budget(settings)
    # handler_cancellation: a client that disconnects stops its upstream request at once.
    gateway_runner = edge_runner(
        create_app(settings),
        settings,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=30,
    )
    admin_runner = edge_runner(
        create_admin_app(settings), settings, access_log=None, shutdown_timeout=10
    )
    await gateway_runner.setup()
    await admin_runner.setup()
    try:
        await web.TCPSite(gateway_runner, settings.host, settings.port, backlog=1024).start()
        await web.TCPSite(admin_runner, settings.admin_host, settings.admin_port).start()
        tune_gc_for_serving()
        log.info(
            "creditgate serving on http://%s:%d (admin on http://%s:%d)",
            settings.host,
            settings.port,
            settings.admin_host,
            settings.admin_port,
        )
        print(
            f"READY gateway=http://{settings.host}:{settings.port} "
            f"admin=http://{settings.admin_host}:{settings.admin_port}",
            flush=True,
        )
        await stop.wait()
    finally:
        await gateway_runner.cleanup()
        await admin_runner.cleanup()


def serve(settings: Settings) -> None:
    """Blocking entry point of ``creditgate serve``; keys are redacted from its logs."""
    install_redacting_filter()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(run_services(settings))
    else:
        uvloop.run(run_services(settings))
