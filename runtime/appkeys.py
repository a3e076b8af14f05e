"""Typed application state that both services use (``web.AppKey``s).

The gateway's own state (authenticator, tokenizer, rate cards, upstream client) is declared in
``gateway.appkeys``; the admin service's in ``admin_api``. No string keys anywhere.
"""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from billing.metering.holds import HoldStore
from billing.metering.rate_limit import RateLimiter
from billing.purchases.money_events import PurchaseStats
from billing.purchases.stripe_client import StripeClient
from billing.purchases.stripe_events import WebhookStats
from runtime.control import ControlListener
from runtime.settings import Settings
from runtime.supervision import TaskRestarts

SETTINGS = web.AppKey("settings", Settings)
DB_POOL = web.AppKey("db_pool", asyncpg.Pool)
# Read traffic's pool (the Credits page's lists, exports, statements): read-only, custom
# plans, on DATABASE_REPLICA_URL when set, else DATABASE_URL. The money path never reads here.
READ_POOL = web.AppKey("read_pool", asyncpg.Pool)
REDIS = web.AppKey("redis", aioredis.Redis)
HOLDS = web.AppKey("holds", HoldStore)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
# Set only when STRIPE_API_KEY is configured (``runtime.resources.stripe_ctx``).
STRIPE = web.AppKey("stripe", StripeClient)
STRIPE_WEBHOOK_STATS = web.AppKey("stripe_webhook_stats", WebhookStats)
# The live flags (``CONTROL.flags``) and the control events' listener (``control_ctx``).
CONTROL = web.AppKey("control", ControlListener)
# The application's own Prometheus registry (never prometheus_client's global one): each app
# registers its metrics here; ``creditgate serve`` exports every app's registry on METRICS_PORT.
METRICS = web.AppKey("metrics", CollectorRegistry)
# One per process, shared by both apps (``creditgate serve`` hands the admin app's to the
# gateway; an app run alone makes its own), exported by one registry only:
# purchases fulfilled by the webhook or the success return (the admin app exports them) ...
PURCHASE_STATS = web.AppKey("purchase_stats", PurchaseStats)
# ... and restarts of every supervised background loop, both apps' (the app that made it).
TASK_RESTARTS = web.AppKey("task_restarts", TaskRestarts)
