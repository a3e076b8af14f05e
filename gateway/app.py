"""The gateway's aiohttp application factory.

``create_app(settings)`` wires the routes (each wrapped in its error answers) and, in
``cleanup_ctx``, the Postgres pool, the Redis client, the tokenizer, the rate card book, the
control listener with the live flags, the upstream ``ClientSession``, the settlement poster,
the hold sweeper and the Stripe client.
Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry
from yarl import URL

from billing.control import ControlKind
from billing.errors import POSTGRES_UNAVAILABLE, BillingUnavailableError
from billing.metering.posting import PosterStats, SettlementPoster
from billing.metering.rate_cards import RateCardBook
from billing.metering.rescue import SettlementRescue
from billing.metering.tokens import TokenCounter
from billing.partitions import run_maintenance
from billing.purchases.money_events import PurchaseStats
from gateway import appkeys as gateway_keys
from gateway.auth import KeyAuthenticator
from gateway.billing_api import billing_api_routes
from gateway.billing_session_routes import billing_session_routes
from gateway.billing_session_store import BillingSessionStore
from gateway.credits_page import credits_page_routes, setup_credits_page
from gateway.integrity_metrics import BACKLOG_INTERVAL_S, PROBE_INTERVAL_S, IntegrityMetrics
from gateway.models import handle_model, handle_models, handle_unknown_v1, handle_unmatched
from gateway.proxy import ENDPOINTS, handle_billed
from gateway.purchase_routes import CHECKOUT_ROUTE, checkout_routes, count_checkout_answers
from gateway.traffic_metrics import TrafficMetrics
from gateway.usage import UsageStats
from runtime import appkeys
from runtime.errors import answer_errors
from runtime.lease import Lease, leased
from runtime.metrics import LabelledReading, StatsCollector
from runtime.resources import (
    control_ctx,
    gateway_redis_ctx,
    open_script_channel,
    postgres_ctx,
    stripe_ctx,
)
from runtime.return_to import buy_credits_url_for
from runtime.settings import Settings
from runtime.supervision import TaskRestarts, cancel_and_wait, periodically, supervise

log = logging.getLogger(__name__)


def buy_credits_url(settings: Settings) -> str:
    """Where a user with too few credits is sent (the Credits page)."""
    return settings.public_base_url + "/credits"


async def _billing_state(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    pool = app[appkeys.DB_POOL]
    app[gateway_keys.TOKENS] = TokenCounter.load(settings.tiktoken_encodings_dir)
    counting = ThreadPoolExecutor(settings.prompt_count_threads, "prompt-count")
    app[gateway_keys.PROMPT_COUNTING] = counting
    book = RateCardBook()
    await book.refresh(pool)
    app[gateway_keys.RATE_CARDS] = book
    app[gateway_keys.AUTH] = KeyAuthenticator(pool, ttl_s=settings.auth_cache_ttl_s)
    app[gateway_keys.BILLING_SESSIONS] = BillingSessionStore(
        app[appkeys.REDIS],
        ttl_s=settings.billing_session_ttl_s,
        secure=settings.public_base_url.startswith("https://"),
    )
    yield
    book.close()
    counting.shutdown(wait=False, cancel_futures=True)


def _control(app: web.Application) -> AsyncIterator[None]:
    """The control listener (``runtime.control``): the live flags, and the gateway's reactions
    to operators' changes: revoked keys and suspended accounts drop the cached keys, a
    published rate card reloads the book. (Packages need nothing: the purchase routes read
    them per request.)"""
    auth = app[gateway_keys.AUTH]

    async def forget_keys() -> None:
        auth.forget_all()

    return control_ctx(
        app,
        reactions={
            ControlKind.KEYS: forget_keys,
            ControlKind.ACCOUNTS: forget_keys,
            ControlKind.RATE_CARDS: partial(_refresh_rate_cards, app),
        },
    )


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.upstream_connect_timeout_s,
            sock_read=settings.upstream_read_timeout_s,
        ),
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )
    app[gateway_keys.UPSTREAM] = session
    app[gateway_keys.UPSTREAM_HEADERS] = {
        "Authorization": f"Bearer {settings.upstream_api_key}",
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
    }
    app[gateway_keys.UPSTREAM_URLS] = {
        endpoint.path: URL(settings.upstream_base_url + endpoint.path) for endpoint in ENDPOINTS
    }
    yield
    await session.close()


async def _sweep_expired_holds(app: web.Application) -> None:
    """One round of the hold sweeper; Redis unreachable: logged, the next round retries."""
    try:
        voided = await app[appkeys.HOLDS].sweep_expired()
    except BillingUnavailableError as exc:
        log.warning("sweeper: %s", exc)
        return
    if voided:
        app[gateway_keys.INTEGRITY].count_expired_holds(voided)
        log.info("sweeper voided %d expired holds", voided)


async def _refresh_rate_cards(app: web.Application) -> None:
    """Reload the rate cards; Postgres unreachable: logged, the cards in use stay."""
    try:
        await app[gateway_keys.RATE_CARDS].refresh(app[appkeys.DB_POOL])
    except POSTGRES_UNAVAILABLE as exc:
        log.warning("rate card refresh failed (old cards stay in use): %r", exc)


async def _background(app: web.Application) -> AsyncIterator[None]:
    """The settlement rescue, the hold sweeper, the rate card refresh, the settlement
    poster and the integrity metrics' readers (settlement backlog, dependency probes), each
    supervised (``runtime.supervision``): a loop that fails is logged, counted and restarted,
    never lost."""
    settings = app[appkeys.SETTINGS]
    holds = app[appkeys.HOLDS]
    rescue = SettlementRescue(holds, app[appkeys.DB_POOL])
    app[gateway_keys.SETTLEMENT_RESCUE] = rescue
    integrity = app[gateway_keys.INTEGRITY]
    redis, pool = app[appkeys.REDIS], app[appkeys.DB_POOL]
    _start_supervised = partial(_start_supervised_in, app[appkeys.TASK_RESTARTS])
    # One process of the fleet sweeps at a time (runtime.lease; docs/design.md, "Workers").
    sweeper_lease = _lease(app, HOLD_SWEEPER_LEASE)
    tasks = [
        _start_supervised("settlement-rescue", rescue.run),
        _start_supervised(
            "hold-sweeper",
            partial(
                periodically,
                settings.sweep_interval_s,
                # Postgres down: every process sweeps, as before leases (voids are idempotent).
                leased(
                    sweeper_lease,
                    partial(_sweep_expired_holds, app),
                    run_when_unreachable=True,
                ),
            ),
        ),
        _start_supervised("partition-maintenance", partial(run_maintenance, pool)),
        _start_supervised(
            "rate-card-refresh",
            partial(periodically, settings.rate_card_refresh_s, partial(_refresh_rate_cards, app)),
        ),
        _start_supervised(
            "settlement-backlog",
            partial(
                periodically,
                BACKLOG_INTERVAL_S,
                partial(integrity.read_settlement_backlog, redis),
            ),
        ),
        _start_supervised(
            "dependency-probe",
            partial(
                periodically,
                PROBE_INTERVAL_S,
                partial(integrity.probe_dependencies, pool, redis),
            ),
        ),
    ]
    poster = None
    reader = None
    if settings.settlement_poster_enabled:
        reader = open_script_channel(
            settings, name="creditgate-outbox-reader", decode_responses=False
        )
        poster = SettlementPoster(
            holds,
            app[appkeys.DB_POOL],
            consumer=f"{socket.gethostname()}-{os.getpid()}",
            batch_size=settings.settlement_batch_size,
            claim_idle_ms=settings.settlement_claim_idle_ms,
            reader=reader,
            stats=app[gateway_keys.POSTER_STATS],
        )
        tasks.append(_start_supervised("settlement-poster", poster.run))
    yield
    for task in tasks:
        await cancel_and_wait(task)
    await sweeper_lease.close()
    # Settlements and voids Redis did not confirm (the replies still in flight first): a last
    # try, then Postgres (best effort).
    with contextlib.suppress(Exception):
        await holds.wait_for_replies()
        await rescue.finish(timeout_s=5)
    # Post what is already in the outbox before the process exits (best effort: whatever is
    # left is claimed by another poster or by this one after a restart).
    if poster is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(poster.drain_all(), timeout=5)
    if reader is not None:
        await reader.close()


#: The fleet-wide lease of the hold sweeper (``runtime.lease``).
HOLD_SWEEPER_LEASE = "hold-sweeper"


def _lease(app: web.Application, name: str) -> Lease:
    """A fleet-wide lease of this process, shown as ``creditgate_lease_held{lease}`` (1 in the
    process that holds it)."""
    settings = app[appkeys.SETTINGS]
    lease = Lease(settings.database_url, name, timeout_s=settings.postgres_connect_timeout_s)
    held = LabelledReading(
        "creditgate_lease_held",
        "1 in the process that holds the fleet-wide lease (runs its work), else 0.",
        "lease",
        lambda: {lease.name: int(lease.holding)},
        gauge=True,
    )
    app[appkeys.METRICS].register(StatsCollector([], [held]))
    return lease


def _start_supervised_in(
    restarts: TaskRestarts, name: str, run: Callable[[], Awaitable[None]]
) -> asyncio.Task[None]:
    return asyncio.create_task(supervise(name, run, restarts=restarts), name=name)


def create_app(
    settings: Settings,
    *,
    restarts: TaskRestarts | None = None,
    purchases: PurchaseStats | None = None,
) -> web.Application:
    """The gateway application (OpenAI-compatible routes under ``/v1``).

    Every route is wrapped by ``runtime.errors.answer_errors`` (no middleware, see there);
    the last one catches every path nothing else serves, so those get envelopes too.

    Args:
        restarts: the process's ``TaskRestarts`` when another app of the process made and
            exports it (``creditgate serve``: the admin app's); None: the gateway makes its
            own and exports it on its registry.
        purchases: the process's ``PurchaseStats`` (the success return's fulfilments), as
            above; the gateway never exports it (the admin app does).
    """
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[appkeys.SETTINGS] = settings
    app[appkeys.METRICS] = registry = CollectorRegistry()
    app[gateway_keys.TRAFFIC] = TrafficMetrics(registry)
    app[gateway_keys.USAGE_STATS] = UsageStats()
    app[gateway_keys.POSTER_STATS] = poster_stats = PosterStats()
    if restarts is None:
        restarts = TaskRestarts()
        registry.register(restarts.collector())
    app[appkeys.TASK_RESTARTS] = restarts
    app[appkeys.PURCHASE_STATS] = purchases or PurchaseStats()
    app[gateway_keys.INTEGRITY] = IntegrityMetrics(registry, poster_stats)
    setup_credits_page(app, settings)
    app.cleanup_ctx.extend(
        [
            postgres_ctx,
            gateway_redis_ctx,
            _billing_state,
            _control,
            _upstream,
            _background,
            stripe_ctx,
        ]
    )
    routes: list[tuple[str, str, Handler]] = [
        *(("POST", "/v1" + e.path, partial(handle_billed, endpoint=e)) for e in ENDPOINTS),
        ("GET", "/v1/models", handle_models),
        ("GET", "/v1/models/{model}", handle_model),
        # ``[\s\S]``, not ``.``: a path may hold a decoded CR or LF (``%0D%0A``) too.
        ("*", r"/v1/{tail:[\s\S]*}", handle_unknown_v1),
        ("GET", "/healthz", _healthz),
        *checkout_routes(),
        *billing_session_routes(),
        *billing_api_routes(),
        *credits_page_routes(),
        ("*", r"/{tail:[\s\S]*}", handle_unmatched),
    ]
    url: Callable[[web.BaseRequest], str] = partial(
        buy_credits_url_for,
        credits_url=buy_credits_url(settings),
        allowed_origins=settings.return_to_origins,
    )
    app[gateway_keys.BUY_CREDITS_URL] = url
    for method, path, handler in routes:
        answer = answer_errors(handler, url)
        if (method, path) == CHECKOUT_ROUTE:
            answer = count_checkout_answers(answer)
        app.router.add_route(method, path, answer)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
