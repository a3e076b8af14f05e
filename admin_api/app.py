"""The admin service's aiohttp application: health, the Stripe webhook and the admin API
(``/admin/v1/``, ``admin_api.framework``).

Runs beside the gateway on ``ADMIN_PORT`` (default 8081); ``creditgate serve`` starts both.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry

from admin_api import (
    accounts,
    audit_log,
    flags,
    keys,
    ledger_usage,
    packages,
    portal_sessions,
    rate_cards,
    reconciliation,
    tokens,
)
from admin_api.framework import AdminRouter, install
from admin_api.money_metrics import install_fleet_gauges
from admin_api.openapi import add_openapi_route
from admin_api.stripe_webhook import add_webhook_routes
from billing.purchases.money_events import PurchaseStats
from runtime import appkeys
from runtime.errors import make_error_middleware
from runtime.resources import control_ctx, postgres_ctx, redis_ctx
from runtime.settings import Settings
from runtime.supervision import TaskRestarts

#: Every router of the admin API (one per route module).
ROUTERS: tuple[AdminRouter, ...] = (
    tokens.router,
    audit_log.router,
    flags.router,
    rate_cards.router,
    packages.router,
    accounts.router,
    keys.router,
    ledger_usage.router,
    portal_sessions.router,
    reconciliation.router,
)


def create_admin_app(
    settings: Settings, routers: Sequence[AdminRouter] = ROUTERS
) -> web.Application:
    """The admin application (webhook at ``POST /stripe/webhook``, the admin API under
    ``/admin/v1/``: ``routers``, by default all of them).

    It makes the process's ``TaskRestarts`` and ``PurchaseStats`` (``appkeys``) and exports
    them; ``creditgate serve`` hands them to the gateway app (``create_app``)."""
    app = web.Application(
        client_max_size=1024 * 1024,
        middlewares=[make_error_middleware(settings.public_base_url + "/credits")],
    )
    app[appkeys.SETTINGS] = settings
    app[appkeys.METRICS] = registry = CollectorRegistry()
    app[appkeys.TASK_RESTARTS] = restarts = TaskRestarts()
    registry.register(restarts.collector())
    app[appkeys.PURCHASE_STATS] = PurchaseStats()
    app.cleanup_ctx.extend([postgres_ctx, redis_ctx, control_ctx])
    app.router.add_get("/healthz", _healthz)
    add_webhook_routes(app)
    install_fleet_gauges(app)
    install(app, routers)
    add_openapi_route(app)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
