"""The billed OpenAI-compatible endpoints: authenticate, estimate, hold, forward, settle.

One ``BilledCall`` per request. Settlement (the Redis settle script, which appends to the
durable outbox) runs *before* the last bytes reach the client, so a response that was
delivered is always charged, even if the process dies right after; the Postgres write happens
later in the settlement poster, off the client's latency path.

The hold's life is ``HoldState``, moved only by ``BilledCall.settle`` and ``void``. Streamed
answers are relayed by ``gateway.relay``; non-streamed ones are read whole, settled, then
written in one piece. The estimate and the hold of ``_prepare`` are ``gateway.admission``'s;
each answer is counted and logged by ``gateway.request_end``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from billing.errors import BillingUnavailableError, ModelNotServedError, UnknownModelError
from billing.live_flags import Billing
from billing.metering.estimate import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    Estimate,
    Estimator,
)
from billing.metering.outbox import SettlementRecord
from billing.metering.pricing import (
    RateCard,
    RoundingMode,
    charge_millicredits,
)
from billing.metering.rescue import SettlementRescue
from billing.metering.tokens import JSON_MAX_DEPTH
from billing.spend_controls import check_model
from gateway import appkeys as gateway_keys
from gateway.admission import count_prompt, estimate_tokens, reserve_worst_case
from gateway.auth import Identity
from gateway.held_headers import write_whole_response
from gateway.json_body import json_object
from gateway.relay import relay_stream
from gateway.request_end import CLIENT_CLOSED_REQUEST, Arrival, finished, refused
from gateway.usage import UnusableUsage, Usage, parse_usage, response_text, usage_bound
from runtime import appkeys
from runtime.errors import (
    GatewayError,
    InvalidRequestError,
    error_body,
    json_response,
)
from runtime.request_ids import new_request_id

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A billed upstream route.

    Attributes:
        path: path below the ``/v1`` base, e.g. ``/chat/completions``.
        estimator: how its body is sized for the hold.
        include_usage: the endpoint takes ``stream_options.include_usage``.
    """

    name: str
    path: str
    estimator: Estimator
    include_usage: bool
    streams: bool = True


ENDPOINTS = (
    Endpoint("chat.completions", "/chat/completions", CHAT, True),
    Endpoint("completions", "/completions", COMPLETIONS, True),
    Endpoint("responses", "/responses", RESPONSES, False),
    Endpoint("embeddings", "/embeddings", EMBEDDINGS, False, streams=False),
)


#: Set (``true``) on a charged answer when the account's available balance after its hold is
#: below ``billing.low_balance_threshold_credits`` (the Credits page's warning level).
LOW_BALANCE_HEADER = "x-creditgate-low-balance"


_JSON_CONTENT_TYPE = {"Content-Type": "application/json"}


class ChargingPausedError(GatewayError):
    """Charging is paused with ``billing.charging_paused_mode = block`` (503): nothing is
    held or forwarded."""

    status = 503
    error_type = "server_error"
    code = "charging_paused"


class HoldState(enum.Enum):
    """Where a call's hold is in its life. Only ``BilledCall.settle`` and ``void`` move it::

        RESERVED     --settle--> CHARGED   (the Redis settle script was sent)
        RESERVED     --void----> VOIDED    (released with no charge)
        NOTHING_HELD --settle--> CHARGED   (usage is recorded, at cost 0 if charging is off)

    CHARGED and VOIDED are final: a later settle or void does nothing, so a request is settled
    at most once and a charged hold is never voided.
    """

    NOTHING_HELD = "nothing_held"
    """No millicredits held: the request is not charged (charging off, or its account
    outside the rollout), or the worst case prices at 0. A void has nothing to release and
    leaves the state as it is."""
    RESERVED = "reserved"
    """A hold of ``hold_millicredits`` (> 0) is placed in Redis."""
    CHARGED = "charged"
    """The settle script was sent; whether it ran may be unknown (see ``BilledCall.settle``)."""
    VOIDED = "voided"
    """The hold was released with no charge."""

    @property
    def is_final(self) -> bool:
        """Charged or voided: nothing is left to settle."""
        return self is HoldState.CHARGED or self is HoldState.VOIDED


class BilledCall:
    """One request's life from hold to settlement, built once its hold is placed.

    Attributes:
        request_id: the idempotency key of the hold and its settlement (``x-request-id``).
        started_ms: Unix time in ms when the request was accepted for pricing.
        hold_millicredits: the hold placed for the worst case; 0 when nothing is held.
        hold_state: see ``HoldState``; changed only by ``settle`` and ``void``.
        upstream_started: ``time.monotonic()`` when the upstream request was sent.
        arrived: ``time.monotonic()`` when the handler started (the request's arrival).
        first_byte_sent: ``time.monotonic()`` when the first body byte went to the client;
            0.0 until then.
        upstream_ended: ``time.monotonic()`` when the upstream's body ended; 0.0 until then.
        settled_usage: the usage charged at settlement (None until settled).
        charged_millicredits: the settled charge (0 until settled, or not charged).
        charged: the live flags charge this request (read once, when it started: a flag
            flipped mid-request does not split its hold from its settlement).
        rounding_mode: the live flags' rounding when it started (its hold's and charge's).
        body: the request's parsed body (its prompt is counted from it when the hold was
            placed at the prompt's upper bound and the usage must be estimated).
        low_balance: the account's available balance after the hold is below the live
            ``billing.low_balance_threshold_credits`` (the answer says so in
            ``x-creditgate-low-balance: true``; known only when a hold was placed).
    """

    __slots__ = (
        "app",
        "arrived",
        "body",
        "card",
        "charged",
        "charged_millicredits",
        "endpoint",
        "estimate",
        "first_byte_sent",
        "hold_millicredits",
        "hold_state",
        "identity",
        "low_balance",
        "model",
        "request",
        "request_id",
        "rounding_mode",
        "settled_usage",
        "started_ms",
        "upstream_ended",
        "upstream_started",
    )

    def __init__(
        self,
        request: web.Request,
        endpoint: Endpoint,
        identity: Identity,
        *,
        request_id: str,
        started_ms: int,
        model: str,
        card: RateCard,
        estimate: Estimate,
        hold_millicredits: int,
        charged: bool,
        rounding_mode: RoundingMode,
        low_balance: bool = False,
        arrived: float = 0.0,
        body: dict[str, Any],
    ) -> None:
        self.request = request
        self.app = request.app
        self.endpoint = endpoint
        self.identity = identity
        self.request_id = request_id
        self.started_ms = started_ms
        self.model = model
        self.card = card
        self.estimate = estimate
        self.hold_millicredits = hold_millicredits
        self.hold_state = HoldState.RESERVED if hold_millicredits else HoldState.NOTHING_HELD
        self.upstream_started = 0.0
        self.charged = charged
        self.rounding_mode = rounding_mode
        self.low_balance = low_balance
        self.arrived = arrived
        self.body = body
        self.first_byte_sent = 0.0
        self.upstream_ended = 0.0
        self.settled_usage: Usage | None = None
        self.charged_millicredits = 0
        if hold_millicredits:
            request.app[gateway_keys.TRAFFIC].hold_placed(hold_millicredits)

    def response_headers(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` and the headers of every answer of this call: its ``x-request-id``, and
        ``x-creditgate-low-balance: true`` when its balance is low (one new dict)."""
        headers = (
            {**base, "x-request-id": self.request_id} if base else {"x-request-id": self.request_id}
        )
        if self.low_balance:
            headers[LOW_BALANCE_HEADER] = "true"
        return headers

    # -- settlement -----------------------------------------------------------------------

    async def settle_reported(
        self, reported: Usage | UnusableUsage, *, text: Callable[[], str]
    ) -> None:
        """Settle a completed answer on the upstream's usage report (untrusted input).

        Within ``usage_bound`` it is charged as reported (``usage_source = upstream``);
        above it, charged at the bound, recorded with the reported counts and ``clamped``;
        unusable, charged at our own count of the prompt and of ``text()`` (the answer's
        generated text), ``estimated``. Both cases log a warning and count in the app's
        ``UsageStats``.

        Raises:
            BillingUnavailableError: as ``settle``.
        """
        stats = self.app[gateway_keys.USAGE_STATS]
        if isinstance(reported, UnusableUsage):
            stats.unusable += 1
            log.warning(
                "unusable usage for %s (%s); charged our own count",
                self.request_id,
                reported.reason,
            )
            await self.settle(
                await self.estimated_usage(text()), source="estimated", status="completed"
            )
            return
        bound = usage_bound(self.estimate)
        if reported.within(bound):
            await self.settle(reported, source="upstream", status="completed")
            return
        charged = reported.clamped_to(bound)
        stats.clamped += 1
        log.warning(
            "usage for %s above what the request could produce: reported prompt_tokens=%d "
            "completion_tokens=%d, charged prompt_tokens=%d completion_tokens=%d",
            self.request_id,
            reported.prompt_tokens,
            reported.completion_tokens,
            charged.prompt_tokens,
            charged.completion_tokens,
        )
        await self.settle(charged, source="clamped", status="completed", reported=reported)

    async def settle(
        self, usage: Usage, *, source: str, status: str, reported: Usage | None = None
    ) -> None:
        """Charge ``usage`` at the rate card (the Redis settle script, see module docstring).

        ``reported``: the token counts the settlement record carries when they are not the
        ones charged (the upstream's, for ``source="clamped"``); ``usage`` when None.

        Returns as soon as the settle command is in the kernel's socket buffer (it reaches
        Redis even if this process dies next; it goes out with the loop iteration's batch of
        Redis commands), so the response goes out without waiting a Redis round trip; the
        reply is checked in the background. When that cannot be proven (no connection yet,
        a full socket buffer), waits for the reply instead.

        Does nothing once the hold is charged or voided: a request settles at most once.

        Raises:
            BillingUnavailableError: Redis unreachable (the caller fails closed).
        """
        if self.hold_state.is_final:
            return
        card = self.card
        charging = self.charged
        cost = (
            charge_millicredits(
                card,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                rounding_mode=self.rounding_mode,
            )
            if charging
            else 0
        )
        recorded = usage if reported is None else reported
        payload = SettlementRecord(
            request_id=self.request_id,
            account_id=self.identity.account_id,
            api_key_id=self.identity.api_key_id,
            model=self.model,
            endpoint=self.endpoint.name,
            prompt_tokens=recorded.prompt_tokens,
            cached_tokens=min(recorded.cached_tokens, recorded.prompt_tokens),
            completion_tokens=recorded.completion_tokens,
            rate_card_id=card.id,
            input_millicredits_per_1k_tokens=card.input_millicredits_per_1k_tokens,
            cached_input_millicredits_per_1k_tokens=card.cached_rate,
            output_millicredits_per_1k_tokens=card.output_millicredits_per_1k_tokens,
            rounding_mode=self.rounding_mode.value,
            cost_millicredits=cost,
            hold_millicredits=self.hold_millicredits,
            usage_source=source,
            status=status if charging else "uncharged",
            started_at_ms=self.started_ms,
            finished_at_ms=int(time.time() * 1000),
            upstream_latency_ms=int((time.monotonic() - self.upstream_started) * 1000),
        ).to_json()
        # CHARGED before the command is awaited: once sent, the script may run even if this
        # await is cancelled or fails (it can already be in the socket buffer), and a void sent
        # after it on another connection could overtake it and release a hold that is being
        # charged. So a call whose settle was sent is never voided here; a failure goes to the
        # rescue (see _settle_failed and below).
        self.hold_state = HoldState.CHARGED
        traffic = self.app[gateway_keys.TRAFFIC]
        if self.hold_millicredits:
            traffic.hold_released(self.hold_millicredits)
        account_id = self.identity.account_id
        pending = await self.app[appkeys.HOLDS].send_settle(
            account_id, request_id=self.request_id, cost_millicredits=cost, payload=payload
        )
        rescue = self.app[gateway_keys.SETTLEMENT_RESCUE]
        if await pending.in_kernel():
            pending.on_failure(
                partial(_settle_failed, rescue, account_id, self.request_id, cost, payload)
            )
        else:
            try:
                await pending.result()
            except BillingUnavailableError:
                # Not delivered (the caller answers 503 or an SSE error): the hold is voided
                # once Redis answers, which releases nothing if the script did run (then it
                # charged).
                rescue.void_later(account_id, request_id=self.request_id)
                raise
        # Counted once the settle is delivered (a lost reply is sent again by the rescue, and
        # ``settle.lua`` charges a repeat once).
        self.settled_usage = usage
        self.charged_millicredits = cost
        traffic.count_settlement(card, usage, cost)

    async def void(self) -> None:
        """Release the hold with no charge (nothing was generated for the client).

        Does nothing unless the hold is ``RESERVED``. A Redis failure is logged, not raised:
        the sweeper releases the hold at its deadline.
        """
        if self.hold_state is not HoldState.RESERVED:
            return
        self.hold_state = HoldState.VOIDED
        self.app[gateway_keys.TRAFFIC].hold_released(self.hold_millicredits)
        try:
            await self.app[appkeys.HOLDS].void(self.identity.account_id, request_id=self.request_id)
        except BillingUnavailableError:
            log.warning("void of %s failed; voided again once Redis answers", self.request_id)
            self.app[gateway_keys.SETTLEMENT_RESCUE].void_later(
                self.identity.account_id, request_id=self.request_id
            )

    async def estimated_usage(self, text: str) -> Usage:
        """Usage when the upstream never reported it: our prompt count + tiktoken of output.

        A prompt held at its upper bound is counted now (``count_prompt``, off the loop)."""
        tokens = self.app[gateway_keys.TOKENS]
        completion = tokens.count_generated(text, self.model) if text else 0
        estimate = self.estimate
        if estimate.prompt_counted:
            return Usage(estimate.prompt_tokens, completion)
        prompt = await count_prompt(self.app, self.endpoint.estimator, self.card, self.body)
        return Usage(prompt, completion)


def _settle_failed(
    rescue: SettlementRescue,
    account_id: int,
    request_id: str,
    cost_millicredits: int,
    payload: str,
    exc: BaseException,
) -> None:
    """The reply of a delivered answer's settle was lost: the script may or may not have run.
    The rescue sends it again (``settle.lua`` recognises a repeat), so it is charged once."""
    log.warning("settlement of %s failed after delivery (%s); sent again", request_id, exc)
    rescue.settle_later(
        account_id, request_id=request_id, cost_millicredits=cost_millicredits, payload=payload
    )


async def _prepare(
    request: web.Request, endpoint: Endpoint, arrival: Arrival
) -> tuple[BilledCall, bytes, bool, bool]:
    """Authenticate, parse, price and hold. Returns the call, the body to forward,
    ``stream``, and whether the client asked for usage in its stream itself. Notes the
    identity and the priced model in ``arrival`` as soon as they are known (for the metrics
    and the access line of a refusal).

    Checks run cheapest first, and every refusal but the reserve's own 402 comes before
    any hold is placed (docs/design.md, "A request's life", step 2). The live flags are read
    once, here: the request keeps that snapshot to its settlement."""
    app = request.app
    identity = arrival.identity = await app[gateway_keys.AUTH].authenticate(request)
    controls = identity.controls
    if controls is not None and controls.requests_per_minute is not None:
        await app[appkeys.RATE_LIMITER].admit(
            identity.account_id, identity.api_key_id, controls.requests_per_minute
        )
    raw = await request.read()
    body = json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("You must provide a model parameter.", param="model")
    flags = app[appkeys.CONTROL].flags
    card = app[gateway_keys.RATE_CARDS].get(model)
    if card is None or not flags.serves_model(model):
        raise UnknownModelError(model)
    arrival.model = model
    if not card.serves(endpoint.name):  # e.g. a chat model on /v1/embeddings
        raise ModelNotServedError(
            model, model_kind=card.model_kind.value, endpoint_path="/v1" + endpoint.path
        )
    if controls is not None:
        check_model(controls, model)
    stream = body.get("stream") is True
    if stream and not endpoint.streams:
        raise InvalidRequestError(f"{endpoint.name} does not stream.", param="stream")
    billing = flags.billing_for(identity.account_id)
    if billing is Billing.BLOCKED:
        raise ChargingPausedError(
            "Paid requests are paused by the operator; nothing was sent or charged. Retry later."
        )
    charged = billing is Billing.CHARGED
    rounding_mode = flags.rounding_mode
    request_id = new_request_id()
    started_ms = int(time.time() * 1000)
    estimate = estimate_tokens(app, endpoint.estimator, card, body, len(raw))
    data, client_wants_usage = raw, False
    if stream and endpoint.include_usage:
        data, client_wants_usage = _stream_body(raw, body)
    hold_millicredits, low_balance = 0, False
    if charged:
        estimate, hold_millicredits, available_millicredits = await reserve_worst_case(
            app,
            identity,
            card,
            estimate,
            request_id,
            rounding_mode,
            started_ms,
            estimator=endpoint.estimator,
            body=body,
        )
        low_balance = available_millicredits < flags.low_balance_threshold_credits * 1000
    call = BilledCall(
        request,
        endpoint,
        identity,
        request_id=request_id,
        started_ms=started_ms,
        model=model,
        card=card,
        estimate=estimate,
        hold_millicredits=hold_millicredits,
        charged=charged,
        rounding_mode=rounding_mode,
        low_balance=low_balance,
        arrived=arrival.at,
        body=body,
    )
    return call, data, stream, client_wants_usage


async def _open_upstream(call: BilledCall, data: bytes) -> aiohttp.ClientResponse | None:
    """POST the body upstream; None (hold voided) when the upstream cannot be reached."""
    app = call.app
    call.upstream_started = time.monotonic()
    try:
        return await app[gateway_keys.UPSTREAM].post(
            app[gateway_keys.UPSTREAM_URLS][call.endpoint.path],
            data=data,
            headers=app[gateway_keys.UPSTREAM_HEADERS],
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        await call.void()
        log.warning("upstream unreachable for %s: %r", call.request_id, exc)
        return None


def _upstream_unavailable(call: BilledCall) -> web.Response:
    return json_response(
        error_body(
            "The upstream model provider could not be reached; nothing was charged.",
            "upstream_error",
            code="upstream_unavailable",
        ),
        502,
        call.response_headers(),
    )


async def handle_billed(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """Serve one billed request (see module docstring); the app routes
    ``partial(handle_billed, endpoint=...)`` inside its error answers (no wrapper of our own).

    Every answer, refusals included, ends here once: counted in ``TrafficMetrics`` and
    written to the access log (``gateway.request_end``)."""
    arrival = Arrival(time.monotonic())
    try:
        call, data, stream, client_wants_usage = await _prepare(request, endpoint, arrival)
    except Exception as exc:
        return refused(request, endpoint, arrival, exc, new_request_id())
    try:
        upstream = await _open_upstream(call, data)
        if upstream is None:
            response: web.StreamResponse = _upstream_unavailable(call)
        else:
            try:
                if upstream.status >= 400:
                    response = await _relay_error(call, upstream)
                elif stream:
                    response = await relay_stream(call, upstream, client_wants_usage)
                else:
                    response = await _relay_body(call, upstream)
            finally:
                upstream.release()
    except BaseException as exc:
        await call.void()  # does nothing once charged: a sent settle is never undone
        if not isinstance(exc, Exception):
            # Cancelled: the client went away while we waited (what was generated is
            # settled). Counted and logged as 499, "client closed request".
            finished(call, CLIENT_CLOSED_REQUEST)
            raise
        return refused(request, endpoint, arrival, exc, call.request_id)
    finished(call, response.status)
    return response


def _stream_body(raw: bytes, body: dict[str, Any]) -> tuple[bytes, bool]:
    """For a stream of an endpoint that reports usage when asked: the body to forward, and
    whether the client asked for usage itself (``stream_options.include_usage``)."""
    options = body.get("stream_options")
    options = options if isinstance(options, dict) else {}
    if options.get("include_usage") is True:
        return raw, True
    # Only this case changes the body; every other request is forwarded as sent.
    return _asking_for_usage(raw, body, options), False


_INCLUDE_USAGE_MEMBER = b'"stream_options":{"include_usage":true},'


def _asking_for_usage(raw: bytes, body: dict[str, Any], options: dict[str, Any]) -> bytes:
    """The request body with ``stream_options.include_usage`` set.

    Without a ``stream_options`` member (the usual case) it is spliced in after the opening
    brace, so a prompt of any size is copied, not re-encoded. ``raw`` parsed as a JSON object
    with a ``model``, so it is one ``{`` after optional whitespace, then a member; otherwise
    ``body`` is re-encoded with the client's options kept.
    """
    if "stream_options" not in body:
        brace = raw.index(b"{") + 1
        return raw[:brace] + _INCLUDE_USAGE_MEMBER + raw[brace:]
    body["stream_options"] = {**options, "include_usage": True}
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:  # only nesting can fail: the body was parsed from JSON
        raise InvalidRequestError(
            "The request body is nested too deeply to be forwarded: at most "
            f"{JSON_MAX_DEPTH} levels are accepted."
        ) from None


async def _relay_error(call: BilledCall, upstream: aiohttp.ClientResponse) -> web.Response:
    """Upstream refused before any output: void the hold, pass its error through."""
    try:
        data = await upstream.read()
    except aiohttp.ClientError:
        data = b""
    call.upstream_ended = time.monotonic()
    await call.void()
    try:
        obj = orjson.loads(data)
        if not (isinstance(obj, dict) and isinstance(obj.get("error"), dict)):
            raise ValueError
    except ValueError:
        obj = error_body(
            f"The upstream answered {upstream.status}; nothing was charged.",
            "upstream_error",
            code="upstream_error",
        )
    return json_response(obj, upstream.status, call.response_headers())


async def _relay_body(call: BilledCall, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Non-streamed: read the whole answer, settle, then respond with it as it came (a body
    that is not JSON, or of another shape than OpenAI's, is relayed too)."""
    try:
        data = await upstream.read()
    except (aiohttp.ClientError, TimeoutError):
        await call.void()
        return _upstream_unavailable(call)
    call.upstream_ended = time.monotonic()
    obj: Any = None
    with contextlib.suppress(orjson.JSONDecodeError):
        obj = orjson.loads(data)
    # Any body, JSON or not, is relayed as the upstream sent it; the charge comes from its
    # usage if that is usable, else from our own count of the prompt and its text.
    usage = parse_usage(obj.get("usage")) if isinstance(obj, dict) else None
    if usage is not None:
        await call.settle_reported(usage, text=partial(response_text, obj))
    else:
        text = response_text(obj)
        usage = await call.estimated_usage(text)
        await call.settle(usage, source="estimated", status="completed")
    # Settled already: the answer was generated, whether or not the client is still there.
    call.first_byte_sent = time.monotonic()
    return await write_whole_response(
        call.request,
        data,
        status=upstream.status,
        headers=call.response_headers(_JSON_CONTENT_TYPE),
    )
