"""Where a billed request ends: what is counted and logged per answer.

Every answer of ``gateway.proxy.handle_billed``, refusals included, ends here once:
``finished`` for a forwarded request (streams included, and a client that went away,
``CLIENT_CLOSED_REQUEST``), ``refused`` for an error answer. Each counts the request in
``TrafficMetrics`` (``creditgate_requests_total``, the latency histograms, a 402's reason) and
writes one access line (``log_access``). The metrics and the line's fields are documented in
docs/design.md, "Metrics and logs".
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from billing.api_keys import KEY_PREFIX, VISIBLE_PREFIX_CHARS
from gateway import appkeys as gateway_keys
from gateway.auth import Identity
from gateway.traffic_metrics import OTHER_MODEL
from gateway.usage import Usage
from runtime.errors import error_answer
from runtime.json_logs import BufferedJsonLines, buffered_lines

if TYPE_CHECKING:
    from gateway.proxy import BilledCall, Endpoint

#: The logger of the access log: one INFO line per billed request (``log_access``), written
#: by ``runtime.json_logs.buffered_lines``; its level turns the lines off.
ACCESS_LOGGER = "creditgate.access"

#: The status metrics and the access log give a request whose client went away before its
#: answer ended (the handler was cancelled; nginx's code, no response carries it).
CLIENT_CLOSED_REQUEST = 499


class Arrival:
    """What is known of a request before its ``BilledCall`` exists: its arrival
    (``time.monotonic()``), its identity once authenticated, its model once priced."""

    __slots__ = ("at", "identity", "model")

    def __init__(self, at: float) -> None:
        self.at = at
        self.identity: Identity | None = None
        self.model = OTHER_MODEL


def finished(call: BilledCall, status: int) -> None:
    """Count a forwarded request's answer (sent whole, streams included) and log it."""
    now = time.monotonic()
    total_s = now - call.arrived
    upstream_s = (call.upstream_ended or now) - call.upstream_started
    traffic = call.app[gateway_keys.TRAFFIC]
    endpoint = call.endpoint.name
    traffic.count_request(endpoint, call.model, status)
    traffic.observe_latency(
        endpoint,
        total_s=total_s,
        first_byte_s=(call.first_byte_sent - call.arrived) if call.first_byte_sent else total_s,
        upstream_s=upstream_s,
    )
    lines = buffered_lines(ACCESS_LOGGER)
    if lines is not None:
        usage = call.settled_usage
        log_access(
            lines,
            call.request,
            request_id=call.request_id,
            identity=call.identity,
            endpoint=endpoint,
            model=call.model,
            status=status,
            usage=usage,
            charged_millicredits=call.charged_millicredits,
            upstream_ms=int(upstream_s * 1000),
            total_ms=int(total_s * 1000),
        )


def refused(
    request: web.Request, endpoint: Endpoint, arrival: Arrival, exc: Exception, request_id: str
) -> web.StreamResponse:
    """The answer to an error of a billed request (``runtime.errors.error_answer``), counted
    and logged; a 402 is counted by its error code too.

    Raises:
        Exception: ``exc`` itself when it has no answer (aiohttp answers 500).
    """
    response = error_answer(request, exc, request.app[gateway_keys.BUY_CREDITS_URL](request))
    response.headers["x-request-id"] = request_id
    status = response.status
    total_s = time.monotonic() - arrival.at
    traffic = request.app[gateway_keys.TRAFFIC]
    traffic.count_request(endpoint.name, arrival.model, status)
    traffic.observe_latency(endpoint.name, total_s=total_s, first_byte_s=total_s, upstream_s=None)
    if status == 402 and isinstance(response.body, bytes):
        traffic.count_payment_required(str(orjson.loads(response.body)["error"]["code"]))
    lines = buffered_lines(ACCESS_LOGGER)
    if lines is not None:
        log_access(
            lines,
            request,
            request_id=request_id,
            identity=arrival.identity,
            endpoint=endpoint.name,
            model=arrival.model,
            status=status,
            usage=None,
            charged_millicredits=0,
            upstream_ms=None,
            total_ms=int(total_s * 1000),
        )
    return response


def log_access(
    lines: BufferedJsonLines,
    request: web.BaseRequest,
    *,
    request_id: str,
    identity: Identity | None,
    endpoint: str,
    model: str,
    status: int,
    usage: Usage | None,
    charged_millicredits: int,
    upstream_ms: int | None,
    total_ms: int,
) -> None:
    """The access line of one billed request (fields: docs/design.md, "Metrics and logs").
    The key appears only as its visible prefix; no prompt or answer text is logged."""
    lines.write(
        "request",
        {
            "event": "request",
            "requestId": request_id,
            "accountId": None if identity is None else identity.account_id,
            "keyPrefix": _key_prefix(request),
            "endpoint": endpoint,
            "model": model,
            "status": status,
            "inputTokens": 0 if usage is None else usage.prompt_tokens,
            "cachedInputTokens": 0 if usage is None else usage.cached_tokens,
            "outputTokens": 0 if usage is None else usage.completion_tokens,
            "chargedMillicredits": str(charged_millicredits),
            "upstreamMs": upstream_ms,
            "totalMs": total_ms,
        },
    )


def _key_prefix(request: web.BaseRequest) -> str | None:
    """The visible prefix of the request's key (``cg_live_`` and 4 characters), or None when
    it sent no key of ours (whatever else it sent is not logged)."""
    _, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if key.startswith(KEY_PREFIX) and len(key) > VISIBLE_PREFIX_CHARS:
        return key[:VISIBLE_PREFIX_CHARS]
    return None
