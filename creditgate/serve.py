"""Run the gateway and the admin service in one process (uvloop when available)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from admin_api.app import create_admin_app
from creditgate.settings import Settings
from gateway.app import create_app

log = logging.getLogger(__name__)


async def run_services(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve the gateway on ``HOST:PORT`` and the admin app on ``ADMIN_HOST:ADMIN_PORT``
    until ``stop`` is set or SIGINT/SIGTERM arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    # handler_cancellation: a client that disconnects stops its upstream request at once.
    gateway_runner = web.AppRunner(
        create_app(settings), access_log=None, handler_cancellation=True, shutdown_timeout=30
    )
    admin_runner = web.AppRunner(create_admin_app(settings), access_log=None, shutdown_timeout=10)
    await gateway_runner.setup()
    await admin_runner.setup()
    try:
        await web.TCPSite(gateway_runner, settings.host, settings.port, backlog=1024).start()
        await web.TCPSite(admin_runner, settings.admin_host, settings.admin_port).start()
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
    """Blocking entry point of ``creditgate serve``."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(run_services(settings))
    else:
        uvloop.run(run_services(settings))
