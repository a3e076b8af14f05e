"""Typed application state shared by the gateway and admin services (``web.AppKey``s)."""

from __future__ import annotations

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from billing.holds import HoldStore
from billing.rate_cards import RateCardBook
from billing.stripe_events import WebhookStats
from billing.stripe_gateway import StripeGateway
from billing.tokens import TokenCounter
from creditgate.settings import Settings
from gateway.auth import KeyAuthenticator

SETTINGS = web.AppKey("settings", Settings)
DB_POOL = web.AppKey("db_pool", asyncpg.Pool)
REDIS = web.AppKey("redis", aioredis.Redis)
HOLDS = web.AppKey("holds", HoldStore)
RATE_CARDS = web.AppKey("rate_cards", RateCardBook)
TOKENS = web.AppKey("tokens", TokenCounter)
AUTH = web.AppKey("auth", KeyAuthenticator)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
UPSTREAM_HEADERS = web.AppKey("upstream_headers", dict)
# Each billed endpoint's upstream URL, parsed once (key: the path below /v1).
UPSTREAM_URLS = web.AppKey("upstream_urls", dict)
# Set only when STRIPE_API_KEY is configured (``gateway.checkout.stripe_ctx``).
STRIPE = web.AppKey("stripe", StripeGateway)
STRIPE_WEBHOOK_STATS = web.AppKey("stripe_webhook_stats", WebhookStats)
