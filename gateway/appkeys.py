"""The gateway's own typed application state (``web.AppKey``s); shared keys are in
``runtime.appkeys``."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from billing.metering.posting import PosterStats
from billing.metering.rate_cards import RateCardBook
from billing.metering.rescue import SettlementRescue
from billing.metering.tokens import TokenCounter
from gateway.auth import KeyAuthenticator
from gateway.billing_session_store import BillingSessionStore
from gateway.integrity_metrics import IntegrityMetrics
from gateway.traffic_metrics import TrafficMetrics
from gateway.usage import UsageStats

RATE_CARDS = web.AppKey("rate_cards", RateCardBook)
TOKENS = web.AppKey("tokens", TokenCounter)
AUTH = web.AppKey("auth", KeyAuthenticator)
USAGE_STATS = web.AppKey("usage_stats", UsageStats)
POSTER_STATS = web.AppKey("poster_stats", PosterStats)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
UPSTREAM_HEADERS = web.AppKey("upstream_headers", dict[str, str])
# Each billed endpoint's upstream URL, parsed once (key: the path below /v1).
UPSTREAM_URLS = web.AppKey("upstream_urls", dict[str, URL])
# Threads that count large prompts off the event loop (PROMPT_COUNT_THREADS of them).
PROMPT_COUNTING = web.AppKey("prompt_counting", ThreadPoolExecutor)
# Settlements and voids Redis did not confirm, retried in the background (one per process).
SETTLEMENT_RESCUE = web.AppKey("settlement_rescue", SettlementRescue)
# The Credits page's string catalogue (gateway/credits/strings.json with the configured texts).
CREDITS_STRINGS = web.AppKey("credits_strings", dict[str, Any])
# Billing sessions (``gateway.billing_session``): aiohttp-session storage on the Redis client.
BILLING_SESSIONS = web.AppKey("billing_sessions", BillingSessionStore)
# Every per-request metric of the gateway (on ``runtime.appkeys.METRICS``).
TRAFFIC = web.AppKey("traffic", TrafficMetrics)
# The Credits page's address for a 402 answer, built from the request (``runtime.return_to``).
BUY_CREDITS_URL = web.AppKey[Callable[[web.BaseRequest], str]]("buy_credits_url")
# The billing-integrity metrics (holds expired, settlement backlog, dependencies up).
INTEGRITY = web.AppKey("integrity", IntegrityMetrics)
