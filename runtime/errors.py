"""Error answers in OpenAI's envelope, built in one place and chosen by exception class.

Body shape (``error_body``, the only builder of an error body):
``{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}`` plus the
extra fields an error promises (402: ``requiredCredits``, ``currentCredits``, ...).

``answer_errors`` wraps a route so that an exception becomes its answer: the class of the
exception picks the answer (``_ANSWERS``, looked up along the exception's MRO, so a subclass
inherits its base's answer unless it has its own), never its message text. ``billing`` raises
its own errors and knows nothing of HTTP; their statuses live here. ``edge_error_response`` is
the answer to what fails outside any route (aiohttp's parser, an escaped exception): see
``runtime.http_protocol``.

Every message passes through ``runtime.redaction.redact``: a message that quotes client input
(a path, a header) never echoes a key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware

from billing.errors import (
    POSTGRES_REFUSED_INPUT,
    AccountDeactivatedError,
    AccountSuspendedError,
    BillingError,
    BillingUnavailableError,
    InsufficientCreditsError,
    ModelNotAllowedError,
    RateLimitedError,
    SpendCapExceededError,
    UnknownModelError,
)
from billing.spend_controls import SpendCap, iso_utc
from billing.units import millicredits_to_credits
from runtime.redaction import redact
from runtime.request_ids import new_request_id

log = logging.getLogger(__name__)


class GatewayError(Exception):
    """An error with a defined HTTP answer: ``status``, ``error_type`` and ``code`` per class."""

    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
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
    message: str,
    error_type: str,
    *,
    param: str | None = None,
    code: str | None = None,
    extra: Mapping[str, object] | None = None,
    extra_at_top_level: bool = False,
) -> dict[str, Any]:
    """OpenAI's error envelope: the body of every error answer and of the final SSE error event.

    Args:
        message: redacted here (``runtime.redaction``), so it may quote client input.
        extra: fields an error promises beyond OpenAI's four, added inside ``error``.
        extra_at_top_level: ``extra`` is repeated beside ``error`` too (the 402's promise,
            for clients that read the top level).
    """
    error: dict[str, Any] = {
        "message": redact(message),
        "type": error_type,
        "param": param,
        "code": code,
    }
    body: dict[str, Any] = {"error": error}
    if extra:
        error.update(extra)
        if extra_at_top_level:
            body.update(extra)
    return body


def json_response(
    body: Mapping[str, Any] | list[Any], status: int, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response serialized with orjson."""
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    extra: Mapping[str, object] | None = None,
    extra_at_top_level: bool = False,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An error answer: ``error_body`` as JSON with ``status``.

    ``error_type`` defaults to ``invalid_request_error`` below 500 and ``server_error`` from
    500 up (OpenAI's types); the other arguments are ``error_body``'s and ``json_response``'s.
    """
    if error_type is None:
        error_type = "invalid_request_error" if status < 500 else "server_error"
    body = error_body(
        message,
        error_type,
        param=param,
        code=code,
        extra=extra,
        extra_at_top_level=extra_at_top_level,
    )
    return json_response(body, status, headers)


# -- answers by exception class ---------------------------------------------------------

_E = TypeVar("_E", bound=BaseException)
# (exception, request, buy_credits_url) -> the answer; may re-raise the exception itself.
_Answer = Callable[[_E, web.Request, str], web.Response]
_ANSWERS: dict[type[BaseException], _Answer[Any]] = {}


def _answers(cls: type[_E]) -> Callable[[_Answer[_E]], _Answer[_E]]:
    """Register the decorated function as the answer to ``cls`` and its subclasses."""

    def register(answer: _Answer[_E]) -> _Answer[_E]:
        _ANSWERS[cls] = answer
        return answer

    return register


def _answer_for(cls: type[BaseException]) -> _Answer[Any] | None:
    for base in cls.__mro__:
        answer = _ANSWERS.get(base)
        if answer is not None:
            return answer
    return None


@_answers(GatewayError)
def _gateway_error(exc: GatewayError, request: web.Request, buy_credits_url: str) -> web.Response:
    return error_response(
        exc.status, exc.message, error_type=exc.error_type, param=exc.param, code=exc.code
    )


@_answers(InsufficientCreditsError)
def _insufficient_credits(
    exc: InsufficientCreditsError, request: web.Request, buy_credits_url: str
) -> web.Response:
    required = millicredits_to_credits(exc.required_millicredits)
    current = millicredits_to_credits(exc.available_millicredits)
    return error_response(
        402,
        f"Insufficient credits: this request needs up to {required:.3f} credits and "
        f"{current:.3f} are available. Buy credits at {buy_credits_url}",
        error_type="insufficient_credits",
        code="insufficient_credits",
        extra={
            "requiredCredits": required,
            "currentCredits": current,
            "requiredMillicredits": str(exc.required_millicredits),
            "currentMillicredits": str(exc.available_millicredits),
            "buyCreditsUrl": buy_credits_url,
        },
        extra_at_top_level=True,
    )


@_answers(AccountSuspendedError)
def _account_suspended(
    exc: AccountSuspendedError, request: web.Request, buy_credits_url: str
) -> web.Response:
    return error_response(
        402,
        "Paid use of this account is paused: a refund or chargeback left "
        f"{millicredits_to_credits(exc.shortfall_millicredits):.3f} credits outstanding. "
        f"Add credits at {buy_credits_url}",
        error_type="insufficient_credits",
        code="account_suspended",
        extra={
            "shortfallMillicredits": str(exc.shortfall_millicredits),
            "buyCreditsUrl": buy_credits_url,
        },
    )


@_answers(AccountDeactivatedError)
def _account_deactivated(
    exc: AccountDeactivatedError, request: web.Request, buy_credits_url: str
) -> web.Response:
    return error_response(
        403,
        "This account is suspended. Contact support to reactivate it.",
        code="account_deactivated",
        extra={"buyCreditsUrl": buy_credits_url},
    )


@_answers(ModelNotAllowedError)
def _model_not_allowed(
    exc: ModelNotAllowedError, request: web.Request, buy_credits_url: str
) -> web.Response:
    return error_response(403, str(exc), param="model", code="model_not_allowed")


_CAP_NAMES = {
    "day": "daily spend cap",
    "month": "monthly spend cap",
    "request": "maximum charge per request",
}


@_answers(SpendCapExceededError)
def _spend_cap_exceeded(
    exc: SpendCapExceededError, request: web.Request, buy_credits_url: str
) -> web.Response:
    cap = SpendCap(exc.cap)
    limit = millicredits_to_credits(exc.cap_millicredits)
    resets_at = None if exc.resets_at_ms is None else iso_utc(exc.resets_at_ms)
    if resets_at is None:
        message = (
            f"The {cap.holder}'s maximum charge per request of {limit:.3f} credits is below "
            f"this request's worst case of "
            f"{millicredits_to_credits(exc.required_millicredits):.3f} credits."
        )
    else:
        message = (
            f"The {cap.holder}'s {_CAP_NAMES[cap.window]} of {limit:.3f} credits would be "
            f"exceeded; it resets at {resets_at}."
        )
    return error_response(
        402,
        message,
        error_type="insufficient_quota",
        code="spend_cap_exceeded",
        extra={
            "cap": cap.value,
            "window": cap.window,
            "resetsAt": resets_at,
            "capCredits": limit,
            "spentCredits": millicredits_to_credits(exc.spent_millicredits),
            "requiredCredits": millicredits_to_credits(exc.required_millicredits),
            "capMillicredits": str(exc.cap_millicredits),
            "spentMillicredits": str(exc.spent_millicredits),
            "requiredMillicredits": str(exc.required_millicredits),
        },
        extra_at_top_level=True,
    )


@_answers(RateLimitedError)
def _rate_limited(
    exc: RateLimitedError, request: web.Request, buy_credits_url: str
) -> web.Response:
    retry_after_s = max(-(-exc.retry_after_ms // 1000), 1)
    return error_response(
        429,
        f"Rate limit reached for requests per minute (RPM) on this API key: limit "
        f"{exc.limit}, used {exc.limit}, requested 1. Please try again in {retry_after_s}s.",
        error_type="requests",
        code="rate_limit_exceeded",
        headers={
            "Retry-After": str(retry_after_s),
            "x-ratelimit-limit-requests": str(exc.limit),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": f"{retry_after_s}s",
        },
    )


@_answers(UnknownModelError)
def _unknown_model(
    exc: UnknownModelError, request: web.Request, buy_credits_url: str
) -> web.Response:
    return error_response(404, str(exc), param="model", code="model_not_found")


@_answers(BillingUnavailableError)
def _billing_unavailable(
    exc: BillingUnavailableError, request: web.Request, buy_credits_url: str
) -> web.Response:
    log.error("billing unavailable: %s", exc)
    return error_response(
        503,
        "Billing is temporarily unavailable; the request was not sent. Retry shortly.",
        code="billing_unavailable",
    )


def _refused_input(exc: Exception, request: web.Request, buy_credits_url: str) -> web.Response:
    # Postgres refused a value of the request (a NUL byte in a query parameter, say): the
    # caller's input, not an outage, so no ERROR log and no 503 that invites a retry.
    log.info("%s %r: Postgres refused a value: %s", request.method, request.path, exc)
    return error_response(
        400,
        "The request contains a value that cannot be used (for example a NUL character).",
        code="invalid_value",
    )


for _refused in POSTGRES_REFUSED_INPUT:
    _ANSWERS[_refused] = _refused_input


@_answers(BillingError)
def _unmapped_billing_error(
    exc: BillingError, request: web.Request, buy_credits_url: str
) -> web.Response:
    log.error("unmapped billing error", exc_info=exc)
    return error_response(500, "Internal error")


@_answers(web.HTTPException)
def _http_exception(
    exc: web.HTTPException, request: web.Request, buy_credits_url: str
) -> web.Response:
    if exc.status < 400:  # a redirect, say: not an error, aiohttp sends it as it is
        raise exc
    if exc.status == 404:
        return error_response(
            404, f"Unknown request URL: {request.method} {request.path}.", code="not_found"
        )
    return error_response(exc.status, exc.reason)


@_answers(web.HTTPMethodNotAllowed)
def _method_not_allowed(
    exc: web.HTTPMethodNotAllowed, request: web.Request, buy_credits_url: str
) -> web.Response:
    allowed = sorted(exc.allowed_methods)
    return error_response(
        405,
        f"Method {request.method} is not allowed for {request.path}; "
        f"allowed: {', '.join(allowed)}.",
        code="method_not_allowed",
        headers={"Allow": ",".join(allowed)},
    )


@_answers(web.HTTPRequestEntityTooLarge)
def _request_too_large(
    exc: web.HTTPRequestEntityTooLarge, request: web.Request, buy_credits_url: str
) -> web.Response:
    return error_response(
        413,
        f"Request body too large: the limit is {request.app._client_max_size} bytes.",
        code="request_too_large",
    )


def _malformed_request_response(exc: HttpProcessingError) -> web.Response:
    # aiohttp's parser refused the request line, a header or the body (a bad chunk size): the
    # connection cannot carry another request. Only the reason's first line is kept (the rest
    # quotes the raw bytes), redacted like every message.
    reason = exc.message.partition("\n")[0].strip()[:200] or "unreadable request"
    status = exc.code if 400 <= exc.code < 500 else 400
    response = error_response(status, f"Malformed HTTP request: {reason}", code="bad_request")
    response.force_close()
    return response


@_answers(HttpProcessingError)
def _malformed_request(
    exc: HttpProcessingError, request: web.Request, buy_credits_url: str
) -> web.Response:
    return _malformed_request_response(exc)


@_answers(web.RequestPayloadError)
def _undecodable_body(
    exc: web.RequestPayloadError, request: web.Request, buy_credits_url: str
) -> web.Response:
    # aiohttp's decompressor refused the body: its bytes are not what Content-Encoding says.
    return error_response(
        400,
        "The request body could not be decoded: it does not match its Content-Encoding.",
        code="invalid_body",
    )


def edge_error_response(status: int, exc: BaseException | None) -> web.Response:
    """The answer when no route answered: aiohttp's ``RequestHandler.handle_error`` cases.

    Args:
        status: aiohttp's choice: 400 (the parser refused the request), 500 (an exception
            escaped a handler), 504 (a handler raised ``TimeoutError``).
        exc: the exception, if any; an ``HttpProcessingError`` gets its registered answer.

    The connection is closed after it (as aiohttp does); the answer has an ``x-request-id``.
    """
    if isinstance(exc, HttpProcessingError):
        response = _malformed_request_response(exc)
    else:
        message = "Internal error" if status == 500 else HTTPStatus(status).phrase
        response = error_response(status, message)
        response.force_close()
    response.headers["x-request-id"] = new_request_id()
    return response


def error_answer(request: web.Request, exc: BaseException, buy_credits_url: str) -> web.Response:
    """The answer to ``exc``, chosen by its class (see the module docstring).

    Raises:
        BaseException: ``exc`` itself when no answer is registered for its class, or it is
            not an error (an ``HTTPException`` below 400, a redirect say).
    """
    answer = _answer_for(type(exc))
    if answer is None:
        raise exc
    return answer(exc, request, buy_credits_url)


def framework_error_response(request: web.BaseRequest, exc: web.HTTPException) -> web.Response:
    """The envelope, with an ``x-request-id``, for an error aiohttp raised before any route
    ran (its router's 404 or 405 for a request target no route can match, such as ``*`` or
    ``host:port``; its 417 for an ``Expect`` other than ``100-continue``)."""
    response = error_answer(request, exc, "")  # type: ignore[arg-type]
    response.headers["x-request-id"] = new_request_id()
    return response


# Every exception class that has an answer (those registered above).
_ANSWERED = tuple(_ANSWERS)


#: The Credits page's address for a 402 (or 403) answer: fixed, or built from the request
#: (the gateway's carries the request's ``returnTo``: ``runtime.return_to``).
BuyCreditsUrl = str | Callable[[web.BaseRequest], str]


def answer_errors(handler: Handler, buy_credits_url: BuyCreditsUrl) -> Handler:
    """Wrap a route handler so errors become OpenAI envelopes, chosen by class.

    ``GatewayError``, ``BillingError``, aiohttp's ``HTTPException``s from 400 up and its
    parser's ``HttpProcessingError`` (a body that breaks mid-read) get their answers
    (``error_answer``); anything else propagates (aiohttp answers 500). Every response
    that has no ``x-request-id`` yet gets one: refusals (401, 402, 404, ...) carry an id too,
    for support conversations.

    The gateway wraps each route rather than installing a middleware: aiohttp runs middlewares
    through two more coroutine frames per request, and every suspension of a billed request
    (hold, upstream, settlement) resumes through each of them.
    """

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except _ANSWERED as exc:
            url = buy_credits_url if isinstance(buy_credits_url, str) else buy_credits_url(request)
            response = error_answer(request, exc, url)
        if not response.prepared and "x-request-id" not in response.headers:
            response.headers["x-request-id"] = new_request_id()
        return response

    return answer


def make_error_middleware(buy_credits_url: BuyCreditsUrl) -> Middleware:
    """``answer_errors`` as a middleware, for an app whose requests are not on the hot path
    (the admin service)."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await answer_errors(handler, buy_credits_url)(request)

    return error_middleware
