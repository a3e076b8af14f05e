"""Gateway errors, and ``answer_errors``: the route wrapper that maps every error class to
OpenAI's error envelope.

Statuses are chosen by exception class, never by message text. Body shape:
``{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}`` plus the
extra fields an error promises (402: ``requiredCredits``, ``currentCredits``, ...).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from billing.errors import (
    AccountSuspendedError,
    BillingError,
    BillingUnavailableError,
    InsufficientCreditsError,
    UnknownModelError,
)
from billing.units import millicredits_to_credits
from runtime.request_ids import new_request_id

log = logging.getLogger(__name__)


class GatewayError(Exception):
    """An error with a defined HTTP answer."""

    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(GatewayError):
    """Malformed JSON, a missing or mistyped field (400)."""

    status = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    """Missing, unknown, revoked or expired API key: always the same 401."""

    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class NotFoundError(GatewayError):
    """Unknown route or model (404)."""

    status = 404
    error_type = "invalid_request_error"


class UpstreamError(GatewayError):
    """The upstream could not be reached or broke before answering (502)."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_unavailable"


def error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def json_response(body: dict[str, Any], status: int, headers: dict[str, str] | None = None):
    """A JSON response serialized with orjson."""
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def insufficient_credits_body(
    exc: InsufficientCreditsError, buy_credits_url: str
) -> dict[str, Any]:
    """The 402 body: OpenAI's envelope plus required/current credits and where to buy more."""
    body = error_body(
        f"Insufficient credits: this request needs up to "
        f"{millicredits_to_credits(exc.required_millicredits):.3f} credits and "
        f"{millicredits_to_credits(exc.available_millicredits):.3f} are available. "
        f"Buy credits at {buy_credits_url}",
        "insufficient_credits",
        code="insufficient_credits",
    )
    extra = {
        "requiredCredits": millicredits_to_credits(exc.required_millicredits),
        "currentCredits": millicredits_to_credits(exc.available_millicredits),
        "requiredMillicredits": str(exc.required_millicredits),
        "currentMillicredits": str(exc.available_millicredits),
        "buyCreditsUrl": buy_credits_url,
    }
    body["error"].update(extra)
    body.update(extra)
    return body


def billing_error_response(exc: BillingError, buy_credits_url: str) -> web.Response:
    """Map a billing error to its HTTP answer by class."""
    if isinstance(exc, InsufficientCreditsError):
        return json_response(insufficient_credits_body(exc, buy_credits_url), 402)
    if isinstance(exc, AccountSuspendedError):
        body = error_body(
            "Paid use of this account is paused: a refund or chargeback left "
            f"{millicredits_to_credits(exc.shortfall_millicredits):.3f} credits outstanding. "
            f"Add credits at {buy_credits_url}",
            "insufficient_credits",
            code="account_suspended",
        )
        body["error"]["shortfallMillicredits"] = str(exc.shortfall_millicredits)
        body["error"]["buyCreditsUrl"] = buy_credits_url
        return json_response(body, 402)
    if isinstance(exc, UnknownModelError):
        return json_response(
            error_body(str(exc), "invalid_request_error", param="model", code="model_not_found"),
            404,
        )
    if isinstance(exc, BillingUnavailableError):
        log.error("billing unavailable: %s", exc)
        return json_response(
            error_body(
                "Billing is temporarily unavailable; the request was not sent. Retry shortly.",
                "server_error",
                code="billing_unavailable",
            ),
            503,
        )
    log.exception("unmapped billing error", exc_info=exc)
    return json_response(error_body("Internal error", "server_error"), 500)


def answer_errors(handler: Handler, buy_credits_url: str) -> Handler:
    """Wrap a route handler so errors become OpenAI envelopes, chosen by class.

    ``GatewayError`` and ``BillingError`` get their defined answers (see
    ``billing_error_response``); aiohttp's 413 and 4xx/5xx ``HTTPException``s get envelopes;
    anything else propagates (aiohttp answers 500). Every response that has no
    ``x-request-id`` yet gets one: refusals (401, 402, 404, ...) carry an id too, for support
    conversations.

    The gateway wraps each route rather than installing a middleware: aiohttp runs middlewares
    through two more coroutine frames per request, and every suspension of a billed request
    (hold, upstream, settlement) resumes through each of them (py-spy: ~5 µs per request).
    """

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except (GatewayError, BillingError, web.HTTPException) as exc:
            response = error_response(request, exc, buy_credits_url)
        if not response.prepared and "x-request-id" not in response.headers:
            response.headers["x-request-id"] = new_request_id()
        return response

    return answer


def make_error_middleware(buy_credits_url: str) -> Middleware:
    """``answer_errors`` as a middleware, for an app whose requests are not on the hot path
    (the admin service)."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await answer_errors(handler, buy_credits_url)(request)

    return error_middleware


def error_response(request: web.Request, exc: Exception, buy_credits_url: str) -> web.Response:
    """The envelope of a ``GatewayError``, ``BillingError`` or aiohttp ``HTTPException``.

    Raises:
        web.HTTPException: ``exc`` itself when it is not an error (a redirect, say).
    """
    if isinstance(exc, GatewayError):
        return json_response(
            error_body(exc.message, exc.error_type, param=exc.param, code=exc.code), exc.status
        )
    if isinstance(exc, BillingError):
        return billing_error_response(exc, buy_credits_url)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return json_response(
            error_body(
                f"Request body too large: the limit is {request.app._client_max_size} bytes.",
                "invalid_request_error",
                code="request_too_large",
            ),
            413,
        )
    if not isinstance(exc, web.HTTPException) or exc.status < 400:
        raise exc
    code = "not_found" if exc.status == 404 else None
    message = (
        f"Unknown request URL: {request.method} {request.path}."
        if exc.status in (404, 405)
        else exc.reason
    )
    return json_response(error_body(message, "invalid_request_error", code=code), exc.status)
