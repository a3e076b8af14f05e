"""The user billing API: an account's own balance, usage, ledger, statements and estimates.

Routes (``billing_api_routes``), each scoped to ``billing_caller(request).account_id``:
    GET  /api/billing/me                       balance, held, available, rates, recent rows
    GET  /api/billing/usage                    usage events (filters, cursor, ``format=csv``)
    GET  /api/billing/usage/{id}               one usage event
    GET  /api/billing/ledger                   ledger entries (filters, cursor, ``format=csv``)
    GET  /api/billing/ledger/{id}              one ledger entry
    GET  /api/billing/statements/{YYYY-MM}     a UTC month (``format=json|csv|pdf``)
    POST /api/billing/estimate                 credits for token counts or a text

Another account's ids are 404, never 403: nothing tells a caller that they exist. Amounts at
the JSON edge are ``billing.units.money_fields`` (a millicredit string beside display numbers);
in CSV (``gateway.billing_exports``, streamed in batches: constant memory) and PDF
(``gateway.statement_pdf``) they are ``billing.units.credits_text`` (exact, 3 decimals).
The reference is docs/billing-api.md.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import MultiMapping

from billing.accounts import balance_fields, get_account
from billing.ledger import (
    ENTRY_TYPES,
    LedgerEntry,
    UsageEvent,
    list_ledger_entries,
    list_usage_events,
)
from billing.metering.pricing import RateCard, charge_millicredits
from billing.purchases.packages import list_packages
from billing.statements import FIRST_YEAR, LAST_YEAR, Statement, monthly_statement, parse_month
from billing.units import MILLICREDITS_PER_CREDIT, credits_text, money_fields
from gateway import appkeys as gateway_keys
from gateway.billing_exports import (
    LEDGER_CSV_HEADER,
    USAGE_CSV_HEADER,
    Lister,
    attachment,
    batches,
    ledger_csv_row,
    postgres_errors_as_503,
    statement_csv,
    stream_csv,
    usage_csv_row,
)
from gateway.billing_session import BillingCaller, billing_caller
from gateway.json_body import json_object
from gateway.purchase_routes import package_json, reference_package
from gateway.statement_pdf import statement_pdf
from runtime import appkeys
from runtime.errors import InvalidRequestError, NotFoundError, json_response

#: Rows of ``recentLedger`` and ``recentUsage`` in ``GET /api/billing/me``.
RECENT_ROWS = 5
DEFAULT_PAGE_ROWS = 25
MAX_PAGE_ROWS = 100
#: Longest ``text`` the estimator counts (characters).
MAX_ESTIMATE_TEXT_CHARS = 100_000
#: Largest token count the estimator takes (per field).
MAX_ESTIMATE_TOKENS = 1_000_000_000

#: The query parameters each route takes; any other is 400 (a filter a route does not have
#: must not be silently ignored).
ME_PARAMS: tuple[str, ...] = ()
USAGE_PARAMS = ("model", "key", "since", "until", "limit", "cursor", "format")
LEDGER_PARAMS = ("type", "since", "until", "limit", "cursor", "format")
STATEMENT_PARAMS = ("format",)

#: Digits as the API takes them: ASCII only (``str.isdigit`` and ``int`` take ``"１"`` too).
_ASCII_DIGITS = re.compile(r"[0-9]+")


def billing_api_routes() -> list[tuple[str, str, Handler]]:
    """The billing API routes as ``(method, path, handler)``; the gateway app adds them with
    its error answers, beside ``checkout_routes()``."""
    return [
        ("GET", "/api/billing/me", handle_me),
        ("GET", "/api/billing/usage", handle_usage),
        ("GET", "/api/billing/usage/{id:[0-9]+}", handle_usage_event),
        ("GET", "/api/billing/ledger", handle_ledger),
        ("GET", "/api/billing/ledger/{id:[0-9]+}", handle_ledger_entry),
        ("GET", "/api/billing/statements/{month}", handle_statement),
        ("POST", "/api/billing/estimate", handle_estimate),
    ]


# -- rows at the edge -------------------------------------------------------------------


def usage_json(event: UsageEvent) -> dict[str, Any]:
    """A usage event as the API shows it (``inputTokens`` includes ``cachedInputTokens``)."""
    return {
        "object": "usage_event",
        "id": str(event.id),
        "date": event.started_at.isoformat(),
        "model": event.model,
        "inputTokens": event.prompt_tokens,
        "cachedInputTokens": event.cached_tokens,
        "outputTokens": event.completion_tokens,
        **money_fields("charged", event.charged_millicredits),
        "requestId": event.request_id,
        "keyPrefix": event.key_prefix,
        "usageSource": event.usage_source,
    }


def ledger_json(entry: LedgerEntry) -> dict[str, Any]:
    """A ledger entry as the API shows it (``amount`` signed: credits in > 0)."""
    return {
        "object": "ledger_entry",
        "id": str(entry.id),
        "date": entry.created_at.isoformat(),
        "type": entry.entry_type,
        **money_fields("amount", entry.amount_millicredits),
        **money_fields("balanceAfter", entry.balance_after_millicredits),
        "reference": entry.reference,
        "receiptUrl": entry.receipt_url,
    }


def rate_json(card: RateCard) -> dict[str, Any]:
    """A rate card in force: credits per 1k tokens as exact 3-decimal strings."""
    return {
        "model": card.model,
        "label": card.display_label,
        "displayName": f"{card.display_label} ({card.model})" if card.display_label else card.model,
        "inputCreditsPer1k": credits_text(card.input_millicredits_per_1k_tokens),
        "cachedInputCreditsPer1k": credits_text(card.cached_rate),
        "outputCreditsPer1k": credits_text(card.output_millicredits_per_1k_tokens),
        "updatedAt": card.effective_at.isoformat(),
    }


# -- query parameters -------------------------------------------------------------------


def _only(given: Iterable[str], accepted: Sequence[str], *, kind: str = "query parameter") -> None:
    """400 for a query parameter (or body field) the route does not take, naming it and the
    accepted ones."""
    for name in given:
        if name not in accepted:
            raise InvalidRequestError(
                f"Unknown {kind} {name!r}; this route accepts "
                f"{', '.join(accepted) if accepted else 'none'}.",
                param=name,
                code="unknown_parameter",
            )


def _limit(query: MultiMapping[str]) -> int:
    raw = query.get("limit")
    if raw is None:
        return DEFAULT_PAGE_ROWS
    if not _ASCII_DIGITS.fullmatch(raw) or not 1 <= int(raw) <= MAX_PAGE_ROWS:
        raise InvalidRequestError(
            f"limit must be a whole number from 1 to {MAX_PAGE_ROWS}.",
            param="limit",
            code="invalid_limit",
        )
    return int(raw)


def _cursor(query: MultiMapping[str]) -> int | None:
    """The ``nextCursor`` of the previous page: rows older than it (ids are bigints)."""
    raw = query.get("cursor")
    if raw is None:
        return None
    if not _ASCII_DIGITS.fullmatch(raw) or not 0 < int(raw) < 2**63:
        raise InvalidRequestError(
            "cursor must be the nextCursor of a previous page.",
            param="cursor",
            code="invalid_cursor",
        )
    return int(raw)


def _instant(query: MultiMapping[str], name: str) -> datetime | None:
    """An ISO date (``YYYY-MM-DD``, midnight UTC) or datetime (UTC when it has no offset),
    years ``FIRST_YEAR`` to ``LAST_YEAR`` (Postgres's own range is wider than Python's)."""
    raw = query.get(name)
    if raw is None:
        return None
    try:
        moment = (
            datetime.combine(date.fromisoformat(raw), time(), UTC)
            if len(raw) == 10
            else datetime.fromisoformat(raw)
        )
    except ValueError:
        moment = None
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment is None or not FIRST_YEAR <= moment.year <= LAST_YEAR:
        raise InvalidRequestError(
            f"{name} must be an ISO 8601 date (YYYY-MM-DD) or date-time.",
            param=name,
            code="invalid_date",
        )
    return moment


def _choice(query: MultiMapping[str], name: str, allowed: Sequence[str]) -> str | None:
    raw = query.get(name)
    if raw is None or raw in allowed:
        return raw
    raise InvalidRequestError(
        f"{name} must be one of: {', '.join(allowed)}.", param=name, code=f"invalid_{name}"
    )


def _text(query: MultiMapping[str], name: str, max_chars: int = 200) -> str | None:
    """A free-text filter: 1 to ``max_chars`` printable characters (no NUL or other control
    character, which Postgres would refuse or no row could match)."""
    raw = query.get(name)
    if raw is not None and (not raw or len(raw) > max_chars or not raw.isprintable()):
        raise InvalidRequestError(
            f"{name} must be 1 to {max_chars} printable characters.",
            param=name,
            code=f"invalid_{name}",
        )
    return raw


@dataclass(frozen=True, slots=True)
class _ListQuery:
    """The parsed query of a list route: its filters (keyword arguments of the billing list
    function), the page and the format."""

    filters: dict[str, Any]
    before_id: int | None
    limit: int
    csv: bool


def _list_query(query: MultiMapping[str], filters: dict[str, Any]) -> _ListQuery:
    since, until = _instant(query, "since"), _instant(query, "until")
    if since is not None and until is not None and since >= until:
        raise InvalidRequestError(
            "since must be before until.", param="until", code="invalid_date_range"
        )
    return _ListQuery(
        filters={**filters, "since": since, "until": until},
        before_id=_cursor(query),
        limit=_limit(query),
        csv=_choice(query, "format", ("json", "csv")) == "csv",
    )


# -- lists and exports ------------------------------------------------------------------


async def _page(
    request: web.Request, lister: Lister, parsed: _ListQuery, to_json: Callable[[Any], Any]
) -> web.Response:
    with postgres_errors_as_503():
        rows = await lister(
            request.app[appkeys.READ_POOL],
            **parsed.filters,
            before_id=parsed.before_id,
            limit=parsed.limit + 1,
        )
    kept = rows[: parsed.limit]
    next_cursor = str(kept[-1].id) if len(rows) > parsed.limit else None
    return json_response(
        {"object": "list", "data": [to_json(row) for row in kept], "nextCursor": next_cursor},
        200,
    )


async def handle_usage(request: web.Request) -> web.StreamResponse:
    """``GET /api/billing/usage``: the caller's usage events, newest first.

    Query: ``model``, ``key`` (a key prefix), ``since``, ``until`` (``since <= started <
    until``), ``limit`` (1-100, default 25), ``cursor``, ``format=csv`` (the whole filtered
    set, no limit). Answer: ``{"object": "list", "data": [usage...], "nextCursor"}``.
    """
    caller = await billing_caller(request)
    query = request.query
    _only(query, USAGE_PARAMS)
    parsed = _list_query(
        query,
        {
            "account_id": caller.account_id,
            "model": _text(query, "model"),
            "key_prefix": _text(query, "key"),
        },
    )
    if parsed.csv:
        rows = batches(request, list_usage_events, parsed.filters)
        return await stream_csv(request, "usage", USAGE_CSV_HEADER, rows, usage_csv_row)
    return await _page(request, list_usage_events, parsed, usage_json)


async def handle_ledger(request: web.Request) -> web.StreamResponse:
    """``GET /api/billing/ledger``: the caller's ledger entries, newest first.

    Query: ``type`` (purchase, deduction, refund, adjustment, reversal), ``since``,
    ``until``, ``limit``, ``cursor``, ``format=csv``, as for usage.
    """
    caller = await billing_caller(request)
    query = request.query
    _only(query, LEDGER_PARAMS)
    parsed = _list_query(
        query,
        {
            "account_id": caller.account_id,
            "entry_type": _choice(query, "type", sorted(ENTRY_TYPES)),
        },
    )
    if parsed.csv:
        rows = batches(request, list_ledger_entries, parsed.filters)
        return await stream_csv(request, "ledger", LEDGER_CSV_HEADER, rows, ledger_csv_row)
    return await _page(request, list_ledger_entries, parsed, ledger_json)


async def _one(request: web.Request, caller: BillingCaller, lister: Lister, what: str) -> Any:
    """The caller's row with the path's id, or 404 (also for another account's row)."""
    row_id = int(request.match_info["id"])
    rows: Sequence[Any] = []
    if row_id < 2**63 - 1:
        with postgres_errors_as_503():
            rows = await lister(
                request.app[appkeys.READ_POOL],
                account_id=caller.account_id,
                before_id=row_id + 1,
                limit=1,
            )
    if not rows or rows[0].id != row_id:
        raise NotFoundError(f"No {what} {row_id}.", param="id", code=f"{what}_not_found")
    return rows[0]


async def handle_usage_event(request: web.Request) -> web.Response:
    """``GET /api/billing/usage/{id}``: one of the caller's usage events (else 404)."""
    caller = await billing_caller(request)
    event = await _one(request, caller, list_usage_events, "usage_event")
    return json_response(usage_json(event), 200)


async def handle_ledger_entry(request: web.Request) -> web.Response:
    """``GET /api/billing/ledger/{id}``: one of the caller's ledger entries (else 404)."""
    caller = await billing_caller(request)
    entry = await _one(request, caller, list_ledger_entries, "ledger_entry")
    return json_response(ledger_json(entry), 200)


# -- the account ------------------------------------------------------------------------


async def handle_me(request: web.Request) -> web.Response:
    """``GET /api/billing/me``: the caller's account at a glance (see docs/billing-api.md).

    Redis unreachable (held amounts unknown) or Postgres unreachable: 503.
    """
    caller = await billing_caller(request)
    _only(request.query, ME_PARAMS)
    app = request.app
    pool = app[appkeys.DB_POOL]
    flags = app[appkeys.CONTROL].flags
    with postgres_errors_as_503():
        account = await get_account(pool, caller.account_id)
        packages = await list_packages(pool)
        # The lists from the read pool (a replica may lag); the balance from the primary.
        reads = app[appkeys.READ_POOL]
        ledger = await list_ledger_entries(reads, account_id=caller.account_id, limit=RECENT_ROWS)
        usage = await list_usage_events(reads, account_id=caller.account_id, limit=RECENT_ROWS)
    money = await balance_fields(app[appkeys.HOLDS], caller.account_id, account.posted)
    threshold_millicredits = flags.low_balance_threshold_credits * MILLICREDITS_PER_CREDIT
    reference = reference_package(packages)
    return json_response(
        {
            "object": "billing_account",
            "accountId": str(account.id),
            "email": account.email,
            **money,
            "lowBalance": int(money["availableMillicredits"]) < threshold_millicredits,
            "lowBalanceThresholdCredits": flags.low_balance_threshold_credits,
            "chargingPaused": not flags.charging_enabled,
            "purchasesEnabled": flags.purchases_enabled and appkeys.STRIPE in app,
            "packages": [package_json(p, reference) for p in packages],
            "activeRates": [
                rate_json(card)
                for card in app[gateway_keys.RATE_CARDS].models()
                if flags.serves_model(card.model)
            ],
            "recentLedger": [ledger_json(entry) for entry in ledger],
            "recentUsage": [usage_json(event) for event in usage],
        },
        200,
    )


# -- statements -------------------------------------------------------------------------


def statement_json(statement: Statement) -> dict[str, Any]:
    """A monthly statement as JSON: signed totals, closing = opening + the movements."""
    return {
        "object": "statement",
        "month": statement.label,
        "accountId": str(statement.account_id),
        "email": statement.email,
        "periodStart": statement.period_start.isoformat(),
        "periodEnd": statement.period_end.isoformat(),
        **money_fields("openingBalance", statement.opening_balance_millicredits),
        **money_fields("purchases", statement.purchases_millicredits),
        **money_fields("deductions", statement.deductions_millicredits),
        **money_fields("refunds", statement.refunds_millicredits),
        **money_fields("disputes", statement.disputes_millicredits),
        **money_fields("adjustments", statement.adjustments_millicredits),
        **money_fields("reversals", statement.reversals_millicredits),
        **money_fields("closingBalance", statement.closing_balance_millicredits),
        "usage": [
            {
                "model": usage.model,
                "requests": usage.requests,
                "inputTokens": usage.input_tokens,
                "cachedInputTokens": usage.cached_input_tokens,
                "outputTokens": usage.output_tokens,
                **money_fields("charged", usage.charged_millicredits),
            }
            for usage in statement.usage
        ],
    }


async def handle_statement(request: web.Request) -> web.Response:
    """``GET /api/billing/statements/{YYYY-MM}``: the caller's statement of a UTC month.

    Query: ``format`` = ``json`` (default), ``csv`` or ``pdf`` (the last two as downloads,
    ``statement-YYYY-MM.csv|pdf``). 400 for a malformed month or format.
    """
    caller = await billing_caller(request)
    _only(request.query, STATEMENT_PARAMS)
    try:
        month = parse_month(request.match_info["month"])
    except ValueError as exc:
        raise InvalidRequestError(
            f"The month must be YYYY-MM (for example 2026-11), from {FIRST_YEAR}-01 to "
            f"{LAST_YEAR}-12.",
            param="month",
            code="invalid_month",
        ) from exc
    kind = _choice(request.query, "format", ("json", "csv", "pdf")) or "json"
    with postgres_errors_as_503():
        statement = await monthly_statement(
            request.app[appkeys.READ_POOL], caller.account_id, month
        )
    if kind == "json":
        return json_response(statement_json(statement), 200)
    body = statement_csv(statement).encode() if kind == "csv" else statement_pdf(statement)
    return web.Response(
        body=body,
        content_type="text/csv" if kind == "csv" else "application/pdf",
        charset="utf-8" if kind == "csv" else None,
        headers={
            "Content-Disposition": attachment(f"statement-{statement.label}.{kind}"),
            "Cache-Control": "no-store",
        },
    )


# -- the estimator ----------------------------------------------------------------------


def _tokens(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_ESTIMATE_TOKENS:
        raise InvalidRequestError(
            f"{name} must be a whole number from 0 to {MAX_ESTIMATE_TOKENS}.",
            param=name,
            code="invalid_token_count",
        )
    return value


def _estimate_text(body: dict[str, Any]) -> str | None:
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, str) or len(text) > MAX_ESTIMATE_TEXT_CHARS:
        raise InvalidRequestError(
            f"text must be a string of at most {MAX_ESTIMATE_TEXT_CHARS} characters.",
            param="text",
            code="invalid_text",
        )
    if body.get("inputTokens") is not None:
        raise InvalidRequestError(
            "Give inputTokens or text, not both.", param="text", code="invalid_text"
        )
    return text


def _rate_card(request: web.Request, model: object) -> RateCard:
    card = request.app[gateway_keys.RATE_CARDS].get(model) if isinstance(model, str) else None
    if card is None or not request.app[appkeys.CONTROL].flags.serves_model(card.model):
        raise InvalidRequestError(
            "model must be one of the models in activeRates (GET /api/billing/me).",
            param="model",
            code="model_not_found",
        )
    return card


_ESTIMATE_FIELDS = ("model", "inputTokens", "cachedInputTokens", "outputTokens", "text")


async def handle_estimate(request: web.Request) -> web.Response:
    """``POST /api/billing/estimate``: what a request would cost at today's rate card.

    Body: ``{"model", "inputTokens"?, "cachedInputTokens"?, "outputTokens"?, "text"?}``;
    ``text`` (at most 100,000 characters) is counted with the gateway's tokenizer for the
    model and stands for ``inputTokens``. Answer: ``{"object": "estimate", "model",
    "inputTokens", "cachedInputTokens", "outputTokens", **money_fields("estimated")}``,
    rounded as the live ``rounding_mode`` flag says. Any other field is 400
    ``unknown_parameter`` (a misspelt count must not give a confident estimate).
    """
    await billing_caller(request)
    body = json_object(await request.read())
    _only(body, _ESTIMATE_FIELDS, kind="field")
    card = _rate_card(request, body.get("model"))
    text = _estimate_text(body)
    input_tokens = _tokens(body, "inputTokens") or 0
    cached_tokens = _tokens(body, "cachedInputTokens") or 0
    output_tokens = _tokens(body, "outputTokens") or 0
    if text is not None:
        # Off the event loop: 100,000 characters take milliseconds to encode.
        input_tokens = await asyncio.get_running_loop().run_in_executor(
            request.app[gateway_keys.PROMPT_COUNTING],
            request.app[gateway_keys.TOKENS].count_text,
            text,
            card.model,
        )
    if cached_tokens > input_tokens:
        raise InvalidRequestError(
            f"cachedInputTokens ({cached_tokens}) is part of the input and cannot exceed "
            f"inputTokens ({input_tokens}, counted from text when text is given).",
            param="cachedInputTokens",
            code="invalid_token_count",
        )
    estimated = charge_millicredits(
        card,
        prompt_tokens=input_tokens,
        cached_tokens=cached_tokens,
        completion_tokens=output_tokens,
        rounding_mode=request.app[appkeys.CONTROL].flags.rounding_mode,
    )
    return json_response(
        {
            "object": "estimate",
            "model": card.model,
            "inputTokens": input_tokens,
            "cachedInputTokens": cached_tokens,
            "outputTokens": output_tokens,
            **money_fields("estimated", estimated),
        },
        200,
    )
