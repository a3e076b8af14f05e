"""The admin API's errors: one class per status, answered in OpenAI's envelope with field
``details``.

Body (``runtime.errors.error_body``, the one envelope builder, with ``details`` as its extra)::

    {"error": {"message": str, "type": "invalid_request_error", "param": str | None,
               "code": str | None, "details": [{"field": str, "message": str}]?}}

A handler raises ``NotFound``, ``Conflict``, ``Unprocessable`` or ``BadRequest``; a billing
error it lets through is answered by ``BILLING_ANSWERS`` (looked up along the error's MRO);
a pydantic ``ValidationError`` of the body, query or path is a 400 whose ``details`` name
each field; Postgres unreachable is a 503 (``database_unavailable``). Anything else propagates
to the service's error middleware (500).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from billing.admin_tokens import AdminTokenNotFoundError, AdminTokenRevokedError
from billing.errors import (
    AccountNotFoundError,
    ApiKeyNotFoundError,
    BillingError,
    DeadLetterNotFoundError,
    DuplicateAccountError,
    NegativeBalanceError,
    NoShortfallError,
)
from billing.live_flags import UnknownFlagError
from billing.metering.rate_cards import DuplicateRateCardError, RateCardError
from billing.purchases.packages import DuplicatePackageError, UnknownPackageError
from runtime.errors import GatewayError, error_response


class AdminError(GatewayError):
    """An admin API refusal: ``status``, ``code`` per class, optional field ``details``.

    Args:
        details: ``[{"field": "email", "message": "..."}]``, one per refused field.
    """

    status = 400
    error_type = "invalid_request_error"
    code: str | None = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        details: Sequence[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.details = list(details) if details else None


class BadRequest(AdminError):
    """400: the body, query or path is malformed (``details`` names the fields)."""


class Unauthorized(AdminError):
    """401: no ``Authorization: Bearer`` admin token, or an unknown, revoked or expired one."""

    status = 401
    code = "invalid_admin_token"


class Forbidden(AdminError):
    """403: the token's role is below the route's."""

    status = 403
    code = "insufficient_role"


class NotFound(AdminError):
    """404: the target does not exist."""

    status = 404
    code = "not_found"


class Conflict(AdminError):
    """409: the request conflicts with the current state (an idempotency key reused with
    other content, a duplicate, a target already in the requested state)."""

    status = 409
    code = "conflict"


class Unprocessable(AdminError):
    """422: well-formed, but a rule refuses it (a debit below zero, say)."""

    status = 422
    code = "unprocessable"


#: Billing errors a handler may let through, and the admin error each becomes.
BILLING_ANSWERS: dict[type[BillingError], type[AdminError]] = {
    AccountNotFoundError: NotFound,
    AdminTokenNotFoundError: NotFound,
    DeadLetterNotFoundError: NotFound,
    AdminTokenRevokedError: Conflict,
    NegativeBalanceError: Unprocessable,
    UnknownFlagError: NotFound,
    UnknownPackageError: NotFound,
    DuplicatePackageError: Conflict,
    DuplicateRateCardError: Conflict,
    RateCardError: Unprocessable,
    ApiKeyNotFoundError: NotFound,
    DuplicateAccountError: Conflict,
    NoShortfallError: Unprocessable,
}

#: The statuses an admin route may answer with an error (the OpenAPI document lists them).
ERROR_STATUSES: dict[int, str] = {
    400: "The body, query or path is malformed; `details` names the fields.",
    401: "No admin token, or an unknown, revoked or expired one.",
    403: "The token's role is below the route's (`insufficient_role`).",
    404: "The target does not exist.",
    409: "Conflicts with the current state (e.g. an idempotency key reused).",
    422: "A rule refuses the request (e.g. a debit below zero).",
    503: "The database is unavailable; nothing was changed (`database_unavailable`).",
}


def from_billing_error(exc: BillingError) -> AdminError | None:
    """The admin error for a billing error (``BILLING_ANSWERS``), None if it has none."""
    for base in type(exc).__mro__:
        answer = BILLING_ANSWERS.get(base)
        if answer is not None:
            return answer(str(exc))
    return None


def from_validation_error(exc: ValidationError, *, location: str) -> BadRequest:
    """A 400 naming each refused field of the body, query or path (``location``)."""
    details = [
        {"field": ".".join(str(part) for part in error["loc"]) or location, "message": error["msg"]}
        for error in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0]
    return BadRequest(
        f"Invalid {location}: {first['field']}: {first['message']}",
        param=first["field"],
        details=details,
    )


def admin_error_response(exc: AdminError, request_id: str) -> web.Response:
    """The answer to ``exc``: the envelope with ``details`` when it has some."""
    extra: dict[str, Any] | None = {"details": exc.details} if exc.details else None
    return error_response(
        exc.status,
        exc.message,
        error_type=exc.error_type,
        param=exc.param,
        code=exc.code,
        extra=extra,
        headers={"x-request-id": request_id},
    )


def database_unavailable_response(request_id: str) -> web.Response:
    """503: Postgres is unreachable or stopped answering; nothing was changed (a change and
    its audit row commit together or not at all)."""
    return error_response(
        503,
        "The database is unavailable; nothing was changed. Retry shortly.",
        code="database_unavailable",
        headers={"x-request-id": request_id},
    )
