"""The billed OpenAI-compatible endpoints: authenticate, estimate, hold, forward, settle.

One ``BilledCall`` per request. Settlement (the Redis settle script, which appends to the
durable outbox) runs *before* the last bytes reach the client, so a response that was
delivered is always charged, even if the process dies right after; the Postgres write happens
later in the settlement writer, off the client's latency path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from billing.errors import BillingError, BillingUnavailableError, UnknownModelError
from billing.metering.estimate import (
    Estimate,
    EstimateError,
    estimate_chat,
    estimate_completions,
    estimate_embeddings,
    estimate_responses,
)
from billing.metering.outbox import SettlementRecord
from billing.metering.pricing import RateCard, charge_millicredits, worst_case_millicredits
from billing.metering.tokens import TokenCounter
from gateway import appkeys as gateway_keys
from gateway.auth import Identity
from gateway.sse import HeldHeadersResponse, send_whole
from gateway.usage import (
    DONE_EVENT,
    Usage,
    generated_text,
    parse_usage,
    response_text,
    tail_to_inspect,
    usage_event,
)
from runtime import appkeys
from runtime.errors import InvalidRequestError, error_body, json_response
from runtime.request_ids import new_request_id

log = logging.getLogger(__name__)

EstimateFn = Callable[[dict[str, Any], RateCard, TokenCounter], Estimate]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A billed upstream route.

    Attributes:
        path: path below the ``/v1`` base, e.g. ``/chat/completions``.
        include_usage: the endpoint takes ``stream_options.include_usage``.
    """

    name: str
    path: str
    estimate: EstimateFn
    include_usage: bool
    streams: bool = True


ENDPOINTS = (
    Endpoint("chat.completions", "/chat/completions", estimate_chat, True),
    Endpoint("completions", "/completions", estimate_completions, True),
    Endpoint("responses", "/responses", estimate_responses, False),
    Endpoint("embeddings", "/embeddings", estimate_embeddings, False, streams=False),
)

# A write to a client that has gone away raises one of these.
_CLIENT_RESET = (ConnectionResetError, aiohttp.ClientConnectionResetError)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE_TAIL = DONE_EVENT + b"\n\n"


class BilledCall:
    """One request's life from hold to settlement."""

    __slots__ = (
        "app",
        "card",
        "endpoint",
        "estimate",
        "hold_millicredits",
        "identity",
        "model",
        "request",
        "request_id",
        "settled",
        "started_ms",
        "upstream_started",
    )

    def __init__(self, request: web.Request, endpoint: Endpoint, identity: Identity) -> None:
        self.request = request
        self.app = request.app
        self.endpoint = endpoint
        self.identity = identity
        self.request_id = new_request_id()
        self.started_ms = int(time.time() * 1000)
        self.upstream_started = 0.0
        self.hold_millicredits = 0
        self.settled = False
        self.card: RateCard
        self.estimate: Estimate
        self.model = ""

    # -- settlement -----------------------------------------------------------------------

    async def settle(self, usage: Usage, *, source: str, status: str) -> None:
        """Charge ``usage`` at the rate card (the Redis settle script, see module docstring).

        Returns as soon as the settle command is in the kernel's socket buffer (it reaches
        Redis even if this process dies next; it goes out with the loop iteration's batch of
        Redis commands), so the response goes out without waiting a Redis round trip; the
        reply is checked in the background. When that cannot be proven (no connection yet,
        a full socket buffer), waits for the reply instead.

        Raises:
            BillingUnavailableError: Redis unreachable (the caller fails closed).
        """
        settings = self.app[appkeys.SETTINGS]
        card = self.card
        charging = settings.charging_enabled
        cost = (
            charge_millicredits(
                card,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                rounding_mode=settings.rounding_mode,
            )
            if charging
            else 0
        )
        payload = SettlementRecord(
            request_id=self.request_id,
            account_id=self.identity.account_id,
            api_key_id=self.identity.api_key_id,
            model=self.model,
            endpoint=self.endpoint.name,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=min(usage.cached_tokens, usage.prompt_tokens),
            completion_tokens=usage.completion_tokens,
            rate_card_id=card.id,
            input_millicredits_per_1k_tokens=card.input_millicredits_per_1k_tokens,
            cached_input_millicredits_per_1k_tokens=card.cached_rate,
            output_millicredits_per_1k_tokens=card.output_millicredits_per_1k_tokens,
            rounding_mode=settings.rounding_mode.value,
            cost_millicredits=cost,
            hold_millicredits=self.hold_millicredits,
            usage_source=source,
            status=status if charging else "uncharged",
            started_at_ms=self.started_ms,
            finished_at_ms=int(time.time() * 1000),
            upstream_latency_ms=int((time.monotonic() - self.upstream_started) * 1000),
        ).to_json()
        # Marked first: if this await is cancelled or fails, the script may still have run,
        # so the hold must not be voided afterwards (the sweeper expires it if it did not).
        self.settled = True
        pending = await self.app[appkeys.HOLDS].send_settle(
            self.identity.account_id,
            request_id=self.request_id,
            cost_millicredits=cost,
            payload=payload,
        )
        if await pending.in_kernel():
            pending.on_failure(partial(_settle_failed, self.request_id))
        else:
            await pending.result()

    async def void(self) -> None:
        """Release the hold with no charge (upstream failed before any output)."""
        if self.settled or not self.hold_millicredits:
            return
        self.settled = True
        try:
            await self.app[appkeys.HOLDS].void(self.identity.account_id, request_id=self.request_id)
        except BillingUnavailableError:
            log.warning("void of %s failed; the sweeper releases it", self.request_id)

    def estimated_usage(self, text: str) -> Usage:
        """Usage when the upstream never reported it: our prompt count + tiktoken of output."""
        tokens = self.app[gateway_keys.TOKENS]
        completion = tokens.count_generated(text, self.model) if text else 0
        return Usage(self.estimate.prompt_tokens, completion)


def _settle_failed(request_id: str, exc: BaseException) -> None:
    # Delivered, maybe uncharged: if the script did not run, the sweeper voids the hold.
    log.error("settlement of %s failed after delivery: %s", request_id, exc)


def _headers(call: BilledCall) -> dict[str, str]:
    return {"x-request-id": call.request_id}


async def _prepare(
    request: web.Request, endpoint: Endpoint
) -> tuple[BilledCall, bytes, dict[str, Any], bool]:
    """Authenticate, parse, price and hold. Returns the call, the raw and parsed body and
    ``stream``."""
    app = request.app
    identity = await app[gateway_keys.AUTH].authenticate(request)
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("You must provide a model parameter.", param="model")
    settings = app[appkeys.SETTINGS]
    card = app[gateway_keys.RATE_CARDS].get(model)
    if (
        card is None
        or not card.serves(endpoint.name)  # e.g. a chat model on /v1/embeddings
        or (settings.model_allowlist and model not in settings.model_allowlist)
    ):
        raise UnknownModelError(model)
    stream = body.get("stream") is True
    if stream and not endpoint.streams:
        raise InvalidRequestError(f"{endpoint.name} does not stream.", param="stream")
    call = BilledCall(request, endpoint, identity)
    call.model = model
    call.card = card
    try:
        call.estimate = endpoint.estimate(body, card, app[gateway_keys.TOKENS])
    except EstimateError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
    if settings.charging_enabled:
        hold = worst_case_millicredits(
            card,
            prompt_tokens=call.estimate.prompt_tokens,
            max_output_tokens=call.estimate.max_completion_tokens,
            rounding_mode=settings.rounding_mode,
        )
        await app[appkeys.HOLDS].reserve(
            identity.account_id, hold, request_id=call.request_id, ttl_s=settings.hold_ttl_s
        )
        call.hold_millicredits = hold
    return call, raw, body, stream


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
        _headers(call),
    )


async def handle_billed(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """Serve one billed request (see module docstring); the app routes
    ``partial(handle_billed, endpoint=...)`` inside its error answers (no wrapper of our own)."""
    call, data, body, stream = await _prepare(request, endpoint)
    client_wants_usage = False
    if stream and endpoint.include_usage:
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        client_wants_usage = options.get("include_usage") is True
        if not client_wants_usage:
            # Only this case changes the body; every other request is forwarded as sent.
            data = _asking_for_usage(data, body, options)
    try:
        upstream = await _open_upstream(call, data)
        if upstream is None:
            return _upstream_unavailable(call)
        try:
            if upstream.status >= 400:
                return await _relay_error(call, upstream)
            if stream:
                return await _relay_stream(call, upstream, client_wants_usage)
            return await _relay_body(call, upstream)
        finally:
            upstream.release()
    except BaseException:
        if not call.settled:
            await call.void()
        raise


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
    return orjson.dumps(body)


async def _relay_error(call: BilledCall, upstream: aiohttp.ClientResponse) -> web.Response:
    """Upstream refused before any output: void the hold, pass its error through."""
    try:
        data = await upstream.read()
    except aiohttp.ClientError:
        data = b""
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
    return json_response(obj, upstream.status, _headers(call))


async def _relay_body(call: BilledCall, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Non-streamed: read the whole answer, settle, then respond."""
    try:
        data = await upstream.read()
    except (aiohttp.ClientError, TimeoutError):
        await call.void()
        return _upstream_unavailable(call)
    usage = None
    obj: Any = None
    try:
        obj = orjson.loads(data)
        usage = parse_usage(obj.get("usage")) if isinstance(obj, dict) else None
    except orjson.JSONDecodeError:
        pass
    if usage is not None:
        await call.settle(usage, source="upstream", status="completed")
    else:
        text = response_text(obj) if isinstance(obj, dict) else ""
        await call.settle(call.estimated_usage(text), source="estimated", status="completed")
    # Settled already: the answer was generated, whether or not the client is still there.
    return await send_whole(
        call.request,
        data,
        status=upstream.status,
        headers={"Content-Type": "application/json", "x-request-id": call.request_id},
    )


async def _relay_stream(
    call: BilledCall, upstream: aiohttp.ClientResponse, client_wants_usage: bool
) -> web.StreamResponse:
    """Streamed: forward SSE events as they arrive; settle before the final event.

    Writes to the client follow the upstream's: one per chunk of whole events it sends, the
    headers riding with the first, and the chunk ending in ``[DONE]`` sent together with the
    end of the chunked body (so an answer the upstream sends in one piece leaves in one
    system call). Bytes after ``[DONE]`` in later chunks are read and dropped.
    """
    headers = {**_SSE_HEADERS, **_headers(call)}
    response = HeldHeadersResponse(status=upstream.status, headers=headers)
    try:
        await response.prepare(call.request)
    except _CLIENT_RESET:
        await call.void()  # the client left before the first byte: nothing generated for it
        upstream.close()
        return response
    forwarded: list[bytes] = []
    buffer = b""
    ended = False
    try:
        async for chunk in upstream.content.iter_any():
            # Per-chunk work is kept inline: this loop runs ~20 times per answer.
            if ended:
                continue  # read to the end so the upstream connection can be reused
            if buffer:
                chunk = buffer + chunk
            cut = chunk.rfind(b"\n\n") + 2
            if cut < 2:
                buffer = chunk
                continue
            if cut == len(chunk):
                complete, buffer = chunk, b""
            else:
                complete, buffer = chunk[:cut], chunk[cut:]
            start = len(complete) if call.settled else tail_to_inspect(complete)
            if start == len(complete):
                forwarded.append(complete)  # nothing to look at: pass through unparsed
            else:
                complete = await _pass_events(call, complete, start, forwarded, client_wants_usage)
                if not complete:
                    continue
            try:
                if not buffer and complete.endswith(_DONE_TAIL):
                    # The stream's last event: it goes out with the end of the chunked body
                    # in one write. Anything the upstream sends after [DONE] is dropped.
                    ended = True
                    await response.write_eof(complete)
                else:
                    await response.write(complete)
            except _CLIENT_RESET as exc:
                raise _ClientGone from exc
        if buffer.strip():
            forwarded.append(buffer)
            try:
                await response.write(buffer + b"\n\n")
            except _CLIENT_RESET as exc:
                raise _ClientGone from exc
    except (_ClientGone, asyncio.CancelledError) as exc:
        # The client went away, noticed on a write or (aiohttp cancels the handler) while we
        # waited for a slow or stalled upstream: stop the upstream, charge what was generated.
        upstream.close()
        if not call.settled:
            await _settle_estimated(call, [*forwarded, buffer], status="client_disconnected")
        if isinstance(exc, asyncio.CancelledError):
            raise
        return response
    except (aiohttp.ClientError, TimeoutError) as exc:
        if ended:  # after [DONE]: the client already has its whole answer
            log.info("upstream broke after [DONE] for %s: %r", call.request_id, exc)
            return response
        log.warning("upstream stream broke for %s: %r", call.request_id, exc)
        await _finish_broken_stream(call, response, forwarded)
        return response
    except BillingUnavailableError:
        await _send_stream_error(
            response,
            "Billing is temporarily unavailable; the response was cut short.",
            "billing_unavailable",
        )
        return response
    if not call.settled and not await _settle_passed_over(call, forwarded):
        # The upstream closed cleanly but sent neither usage nor [DONE] (e.g. it ended with
        # an error event): the generation did not complete.
        await _finish_broken_stream(call, response, forwarded)
        return response
    try:
        await response.write_eof()
    except _CLIENT_RESET:
        pass
    return response


async def _pass_events(
    call: BilledCall,
    complete: bytes,
    start: int,
    forwarded: list[bytes],
    client_wants_usage: bool,
) -> bytes:
    """What to send the client of ``complete`` (whole SSE events), settling on the way.

    Events before ``start`` (see ``gateway.usage.tail_to_inspect``) pass through unparsed;
    from there each event is looked at: the usage settles the request (and the extra
    usage-only chunk is dropped for clients that did not ask for it), ``[DONE]`` without
    usage settles estimated.
    Appends what is sent to ``forwarded`` (for counting if the client disconnects).
    """
    head = complete[:start]
    if head:
        forwarded.append(head)
    out: list[bytes] = [head]
    for event in complete[start:].split(b"\n\n"):
        if not event.strip():
            continue
        if not call.settled:
            found = usage_event(event)
            if found is not None:
                usage, usage_only = found
                await call.settle(usage, source="upstream", status="completed")
                if usage_only and not client_wants_usage:
                    continue
            elif event.startswith(DONE_EVENT):
                await _settle_estimated(call, forwarded, status="completed")
        forwarded.append(event + b"\n\n")
        out.append(event + b"\n\n")
    return b"".join(out)


async def _settle_passed_over(call: BilledCall, forwarded: list[bytes]) -> bool:
    """Settle from a usage object or ``[DONE]`` the tail scan passed over because something
    followed it in its chunk (a sloppy upstream); True if there was one.

    This settles after those bytes were delivered, the one case that does: a crash in between
    leaves the hold to the sweeper.
    """
    events = b"".join(forwarded).split(b"\n\n")
    for event in reversed(events):
        found = usage_event(event)
        if found is not None:
            await call.settle(found[0], source="upstream", status="completed")
            return True
    if any(event.startswith(DONE_EVENT) for event in events):
        await _settle_estimated(call, forwarded, status="completed")
        return True
    return False


class _ClientGone(Exception):
    """The client closed its connection while we were writing to it."""


async def _settle_estimated(call: BilledCall, events: list[bytes], *, status: str) -> None:
    text = generated_text(events)
    if not text:
        await call.void()
        return
    await call.settle(call.estimated_usage(text), source="estimated", status=status)


async def _finish_broken_stream(
    call: BilledCall,
    response: web.StreamResponse,
    forwarded: list[bytes],
    *,
    status: str = "upstream_error",
) -> None:
    """The upstream stream ended without usage: charge what was generated (or void when
    nothing was), and tell the client with a final SSE error event."""
    try:
        await _settle_estimated(call, forwarded, status=status)
    except BillingError:
        log.error("could not settle broken stream %s", call.request_id)
    await _send_stream_error(
        response,
        "The upstream stream ended unexpectedly; you were charged only for what was generated.",
        "upstream_error",
    )


async def _send_stream_error(response: web.StreamResponse, message: str, code: str) -> None:
    """A final SSE event carrying an ``error`` object (the status is already sent)."""
    try:
        await response.write(
            b"data: " + orjson.dumps(error_body(message, "server_error", code=code)) + b"\n\n"
        )
        await response.write_eof()
    except _CLIENT_RESET:
        pass
