"""The admin service's aiohttp application: health, metrics and the Stripe webhook.

Runs beside the gateway on ``ADMIN_PORT`` (default 8081); ``creditgate serve`` starts both.
"""

from __future__ import annotations

from aiohttp import web

from admin_api.stripe_webhook import add_webhook_routes
from runtime import appkeys
from runtime.errors import make_error_middleware
from runtime.resources import control_ctx, postgres_ctx, redis_ctx
from runtime.settings import Settings


def create_admin_app(settings: Settings) -> web.Application:
    """The admin application (webhook at ``POST /stripe/webhook``)."""
    app = web.Application(
        client_max_size=1024 * 1024,
        middlewares=[make_error_middleware(settings.public_base_url + "/credits")],
    )
    app[appkeys.SETTINGS] = settings
    app.cleanup_ctx.extend([postgres_ctx, redis_ctx, control_ctx])
    app.router.add_get("/healthz", _healthz)
    add_webhook_routes(app)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
