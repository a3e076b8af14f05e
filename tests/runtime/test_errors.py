"""``runtime.errors``: answers chosen by exception class along its MRO, one envelope builder."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from billing.errors import (
    AccountNotFoundError,
    BillingUnavailableError,
    InsufficientCreditsError,
)
from runtime.errors import NotFoundError, error_answer, error_body

BUY_URL = "http://gateway.test/credits"


def _answer(exc: BaseException) -> tuple[int, dict[str, object]]:
    request = make_mocked_request("POST", "/v1/chat/completions", app=web.Application())
    response = error_answer(request, exc, BUY_URL)
    assert isinstance(response.body, bytes)
    return response.status, orjson.loads(response.body)


def test_error_answer_402_repeats_credit_fields_at_both_levels() -> None:
    status, body = _answer(
        InsufficientCreditsError(required_millicredits=1_500, available_millicredits=250)
    )
    assert status == 402
    extra = {
        "requiredCredits": 1.5,
        "currentCredits": 0.25,
        "requiredMillicredits": "1500",
        "currentMillicredits": "250",
        "buyCreditsUrl": BUY_URL,
    }
    assert body == {
        "error": {
            "message": body["error"]["message"],  # type: ignore[index]
            "type": "insufficient_credits",
            "param": None,
            "code": "insufficient_credits",
            **extra,
        },
        **extra,
    }


def test_error_answer_subclass_inherits_its_base_answer() -> None:
    class RedisDownError(BillingUnavailableError):
        pass

    status, body = _answer(RedisDownError("redis: connection refused"))
    assert status == 503
    assert body["error"]["code"] == "billing_unavailable"  # type: ignore[index]


def test_error_answer_billing_error_without_its_own_answer_is_500_envelope() -> None:
    status, body = _answer(AccountNotFoundError(7))
    assert status == 500
    assert body == {
        "error": {"message": "Internal error", "type": "server_error", "param": None, "code": None}
    }


def test_error_answer_gateway_error_uses_its_class_attributes() -> None:
    status, body = _answer(NotFoundError("no such thing", code="unknown_url"))
    assert status == 404
    assert body == error_body("no such thing", "invalid_request_error", code="unknown_url")


def test_error_answer_redirect_is_raised_not_answered() -> None:
    with pytest.raises(web.HTTPFound):
        _answer(web.HTTPFound("/elsewhere"))


def test_error_answer_unregistered_exception_is_raised() -> None:
    with pytest.raises(KeyError):
        _answer(KeyError("x"))
