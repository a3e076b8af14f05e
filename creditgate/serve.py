"""Run the gateway and the admin service in one process (uvloop when available); with
``WORKERS`` > 1, in each of the worker processes of ``creditgate.workers``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator, Mapping
from functools import partial

from aiohttp import web
from prometheus_client import ProcessCollector

from admin_api.app import create_admin_app
from billing.reconciliation import DailyReconciliation
from gateway import appkeys as gateway_keys
from gateway.app import create_app
from gateway.request_end import ACCESS_LOGGER
from runtime import appkeys
from runtime.http_protocol import EdgeAppRunner, EdgeServer, edge_runner, ensure_descriptor_budget
from runtime.metrics import (
    CounterReading,
    LabelledReading,
    create_metrics_app,
    metrics_registry,
)
from runtime.redaction import install_redacting_filter
from runtime.settings import Settings
from runtime.supervision import cancel_and_wait, supervise

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


def process_counters(gateway: web.Application) -> list[CounterReading]:
    """The counters ``/metrics`` exports, read from the gateway's stats objects."""
    usage = gateway[gateway_keys.USAGE_STATS]
    poster = gateway[gateway_keys.POSTER_STATS]
    return [
        CounterReading(
            "creditgate_usage_clamped",
            "Upstream usage reports above what the request could produce, charged at the bound.",
            lambda: usage.clamped,
        ),
        CounterReading(
            "creditgate_usage_unusable",
            "Upstream usage reports not usable at all, charged at our own token count.",
            lambda: usage.unusable,
        ),
        CounterReading(
            "creditgate_settlements_dead_lettered",
            "Outbox entries Postgres refused or that could not be read, moved to "
            "settlement_dead_letters (creditgate outbox dead-letters).",
            lambda: poster.dead_lettered,
        ),
        CounterReading(
            "creditgate_rate_limit_failed_open",
            "Requests of keys with a requests-per-minute limit let through unchecked: Redis "
            "could not be asked.",
            partial(_rate_limit_failed_open, gateway),
        ),
    ]


def _rate_limit_failed_open(gateway: web.Application) -> int:
    limiter = gateway.get(appkeys.RATE_LIMITER)
    return 0 if limiter is None else limiter.failed_open


def edge_readings(runners: Mapping[str, EdgeAppRunner]) -> list[LabelledReading]:
    """The edge's connection counters ``/metrics`` exports, per service (``runners``' keys:
    ``gateway``, ``admin``), read from each runner's ``EdgeServer`` once it is set up."""

    def servers() -> Iterator[tuple[str, EdgeServer]]:
        for service, runner in runners.items():
            if isinstance(runner.server, EdgeServer):
                yield service, runner.server

    def timed_out() -> dict[str, int]:
        totals = {"header": 0, "body": 0}
        for _, server in servers():
            for stage, count in server.timed_out_connections.items():
                totals[stage] += count
        return totals

    return [
        LabelledReading(
            "creditgate_http_connections_open",
            "Client connections open now.",
            "service",
            lambda: {service: server.open_connections for service, server in servers()},
            gauge=True,
        ),
        LabelledReading(
            "creditgate_http_connections_refused",
            "Connections closed as soon as accepted: HTTP_MAX_CONNECTIONS reached.",
            "service",
            lambda: {service: server.refused_connections for service, server in servers()},
        ),
        LabelledReading(
            "creditgate_http_connections_timed_out",
            "Connections closed by the header (HTTP_HEADER_TIMEOUT_S) or body "
            "(HTTP_BODY_TIMEOUT_S) deadline.",
            "stage",
            timed_out,
        ),
    ]


#: Seconds the admin service's in-flight requests get at shutdown (at most SHUTDOWN_TIMEOUT_S).
ADMIN_SHUTDOWN_TIMEOUT_S = 10.0


def ready_line(settings: Settings) -> str:
    """The line ``creditgate serve`` prints on stdout once it serves (tests and scripts wait
    for ``READY``); with workers, the parent prints it once every worker serves."""
    return (
        f"READY gateway=http://{settings.host}:{settings.port} "
        f"admin=http://{settings.admin_host}:{settings.admin_port} workers={settings.workers}"
    )


def _print_ready_line(settings: Settings) -> None:
    print(ready_line(settings), flush=True)


async def run_services(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    ready: Callable[[], None] | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve the gateway on ``HOST:PORT``, the admin app on ``ADMIN_HOST:ADMIN_PORT`` and
    ``/metrics`` on ``METRICS_HOST:METRICS_PORT`` (``METRICS_HOST`` defaults to ``HOST``; not
    when the port is 0) until ``stop`` is set or SIGINT/SIGTERM arrives; then stop accepting,
    give in-flight requests and streams up to ``SHUTDOWN_TIMEOUT_S`` and settle and drain
    (``gateway.app``).

    Args:
        ready: called once serving (default: print ``ready_line`` on stdout).
        reuse_port: bind the gateway's and admin's ports with ``SO_REUSEPORT``, shared with
            the other workers of the fleet (``creditgate.workers``).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ensure_descriptor_budget(settings)
    if not settings.access_log:
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)
    # handler_cancellation: a client that disconnects stops its upstream request at once.
    # One TaskRestarts and one PurchaseStats for the process: the admin app's (it exports
    # them), handed to the gateway, so no metric family is exported twice.
    admin = create_admin_app(settings)
    gateway = create_app(
        settings,
        restarts=admin[appkeys.TASK_RESTARTS],
        purchases=admin[appkeys.PURCHASE_STATS],
    )
    gateway_runner = edge_runner(
        gateway,
        settings,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=settings.shutdown_timeout_s,
    )
    admin_runner = edge_runner(
        admin,
        settings,
        access_log=None,
        shutdown_timeout=min(ADMIN_SHUTDOWN_TIMEOUT_S, settings.shutdown_timeout_s),
    )
    edges = edge_readings({"gateway": gateway_runner, "admin": admin_runner})
    registry = metrics_registry(
        process_counters(gateway), edges, [gateway[appkeys.METRICS], admin[appkeys.METRICS]]
    )
    # The process's CPU seconds, resident memory and open descriptors (process_*, from /proc).
    ProcessCollector(registry=registry)
    metrics_runner = edge_runner(
        create_metrics_app(registry),
        settings,
        access_log=None,
    )
    await gateway_runner.setup()
    await admin_runner.setup()
    await metrics_runner.setup()
    # The daily reconciliation (billing.reconciliation), on the gateway's pool and Redis
    # client: one process a day runs it (an advisory lock and the day's recorded run).
    reconciliation = DailyReconciliation(gateway[appkeys.DB_POOL], gateway[appkeys.REDIS])
    reconciling = asyncio.create_task(
        supervise(
            "reconciliation",
            reconciliation.run,
            restarts=gateway[appkeys.TASK_RESTARTS],
        ),
        name="reconciliation",
    )
    try:
        await web.TCPSite(
            gateway_runner, settings.host, settings.port, backlog=1024, reuse_port=reuse_port
        ).start()
        await web.TCPSite(
            admin_runner, settings.admin_host, settings.admin_port, reuse_port=reuse_port
        ).start()
        if settings.metrics_port:
            metrics_host = settings.metrics_host or settings.host
            await web.TCPSite(metrics_runner, metrics_host, settings.metrics_port).start()
        tune_gc_for_serving()
        log.info(
            "creditgate serving on http://%s:%d (admin on http://%s:%d, metrics on %s:%s)",
            settings.host,
            settings.port,
            settings.admin_host,
            settings.admin_port,
            settings.metrics_host or settings.host,
            settings.metrics_port or "none",
        )
        if ready is None:
            _print_ready_line(settings)
        else:
            ready()
        await stop.wait()
    finally:
        await cancel_and_wait(reconciling)
        await metrics_runner.cleanup()
        await gateway_runner.cleanup()
        await admin_runner.cleanup()


def serve(settings: Settings) -> None:
    """Blocking entry point of ``creditgate serve``; keys are redacted from its logs.
    ``WORKERS`` > 1: the parent of that many workers (``creditgate.workers``)."""
    install_redacting_filter()
    if settings.workers > 1:
        from creditgate.workers import run_fleet

        run_fleet(settings)
    else:
        run_event_loop(run_services(settings))


def run_event_loop(main: Coroutine[None, None, None]) -> None:
    """Run ``main`` to its end on a new event loop: uvloop's when available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(main)
    else:
        uvloop.run(main)
