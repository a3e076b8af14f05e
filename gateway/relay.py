"""Relaying a streamed answer: forward whole SSE events as they arrive, settle before the end.

Writes to the client follow the upstream's: one per chunk of whole events it sends, the
headers riding with the first, and the chunk ending in ``[DONE]`` sent together with the end
of the chunked body (so an answer the upstream sends in one piece leaves in one system call).
Bytes after ``[DONE]`` in later chunks are read and dropped.

The request settles when its usage event or ``[DONE]`` passes, before those bytes are sent
(see ``gateway.proxy``). How the stream can end, and what is charged:

=================================  ==========================================================
upstream sends usage / ``[DONE]``  its usage (bounded), or our count of text, "completed"
client goes away                   the text forwarded so far, "client_disconnected"
upstream breaks before ``[DONE]``  the text forwarded so far, "upstream_error", + error event
upstream ends without either       the same as a break (the generation did not complete)
Redis down at settlement           nothing (voided once Redis answers), + error event
nothing generated                  the hold is voided
=================================  ==========================================================
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from billing.errors import BillingError, BillingUnavailableError
from gateway.held_headers import HeldHeadersResponse
from gateway.sse_framing import EVENT_END, SseFramer
from gateway.usage import DONE_EVENT, generated_text, tail_to_inspect, usage_event
from runtime.errors import error_body

if TYPE_CHECKING:
    from gateway.proxy import BilledCall

log = logging.getLogger(__name__)

# A write to a client that has gone away raises one of these.
_CLIENT_RESET = (ConnectionResetError, aiohttp.ClientConnectionResetError)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def relay_stream(
    call: BilledCall, upstream: aiohttp.ClientResponse, client_wants_usage: bool
) -> Coroutine[Any, Any, web.StreamResponse]:
    """Forward the upstream's event stream to the client, settling ``call`` on the way.

    Returns the relay's coroutine for the handler to await (not a coroutine of its own: every
    resumption of a stream passes through each awaiting frame, so the chain is kept short).

    Args:
        upstream: a streamed answer with a status below 400; the caller releases it.
        client_wants_usage: the client asked for ``stream_options.include_usage``; if not,
            the extra usage-only chunk (which the gateway asked for) is not forwarded.

    Awaiting it returns the response, already written and ended (the handler returns it).

    Raises (when awaited):
        asyncio.CancelledError: the client went away while the upstream was silent (aiohttp
            cancels the handler); what was generated is settled first.
    """
    headers = call.response_headers(_SSE_HEADERS)
    response = HeldHeadersResponse(status=upstream.status, headers=headers)
    return _StreamRelay(call, upstream, response, client_wants_usage).run()


class _ClientGone(Exception):
    """The client closed its connection while we were writing to it."""


class _StreamRelay:
    """One stream's relay: the framer, what was forwarded, and how each ending is handled."""

    __slots__ = ("call", "client_wants_usage", "forwarded", "framer", "response", "upstream")

    def __init__(
        self,
        call: BilledCall,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        client_wants_usage: bool,
    ) -> None:
        self.call = call
        self.upstream = upstream
        self.response = response
        self.client_wants_usage = client_wants_usage
        self.framer = SseFramer()
        # Whole events as forwarded (for counting the text if usage never comes).
        self.forwarded: list[bytes] = []

    async def run(self) -> web.StreamResponse:
        """Relay to the end, then settle and end the response by how the stream ended."""
        response = self.response
        try:
            await response.prepare(self.call.request)  # headers held until the first write
        except _CLIENT_RESET:
            await self.call.void()  # the client left before the first byte: nothing generated
            self.upstream.close()
            return response
        try:
            await self._pump()
        except (_ClientGone, asyncio.CancelledError) as exc:
            await self._client_gone()
            if isinstance(exc, asyncio.CancelledError):
                raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._upstream_broke(exc)
        except BillingUnavailableError:
            await _send_stream_error(
                response,
                "Billing is temporarily unavailable; the response was cut short.",
                "billing_unavailable",
            )
        else:
            await self._upstream_ended()
        return response

    async def _pump(self) -> None:
        """Forward every whole event the upstream sends, settling on usage or ``[DONE]``.

        Raises:
            _ClientGone: a write to the client failed.
            aiohttp.ClientError, TimeoutError: the upstream broke.
            BillingUnavailableError: Redis unreachable at settlement.
        """
        call, framer, forwarded = self.call, self.framer, self.forwarded
        write = self.response.write
        async for chunk in self.upstream.content.iter_any():
            # Runs once per upstream chunk: the pass-through case (nothing to look at) and its
            # write stay inline (a coroutine call per chunk showed in the stream benchmark);
            # only usage, [DONE] and the stream's last write take the slower path.
            events = framer.feed(chunk)
            if not events:
                continue  # no whole event yet, or after [DONE]: read on, send nothing
            start = len(events) if call.hold_state.is_final else tail_to_inspect(events)
            if start == len(events):
                forwarded.append(events)  # nothing to look at: pass through unparsed
            else:
                events = await self._pass_events(events, start)
                if not events:
                    continue
            if not call.first_byte_sent:
                call.first_byte_sent = time.monotonic()
            if framer.is_final(events):
                await self._write(events, last=True)
                continue
            try:
                await write(events)
            except _CLIENT_RESET as exc:
                raise _ClientGone from exc
        call.upstream_ended = time.monotonic()
        rest = framer.close()
        if rest:
            forwarded.append(rest)
            await self._write(rest, last=False)  # ended after settling, in _upstream_ended

    async def _write(self, events: bytes, *, last: bool) -> None:
        """Send ``events``; the stream's last event leaves with the end of the chunked body,
        in one write, and anything the upstream sends after it is dropped."""
        try:
            if last:
                self.framer.end()
                await self.response.write_eof(events)
            else:
                await self.response.write(events)
        except _CLIENT_RESET as exc:
            raise _ClientGone from exc

    async def _pass_events(self, events: bytes, start: int) -> bytes:
        """What to send the client of ``events`` (whole SSE events), settling on the way.

        Events before ``start`` (see ``gateway.usage.tail_to_inspect``) pass through unparsed;
        from there each event is looked at (``_settle_on``), and blank events are dropped.
        Appends what is sent to ``forwarded``.
        """
        head = events[:start]
        if head:
            self.forwarded.append(head)
        out: list[bytes] = [head]
        call = self.call
        for event in events[start:].split(EVENT_END):
            if not event.strip():
                continue
            if not call.hold_state.is_final and await self._settle_on(event):
                continue
            whole = event + EVENT_END
            self.forwarded.append(whole)
            out.append(whole)
        return b"".join(out)

    async def _settle_on(self, event: bytes) -> bool:
        """Settle (the call is not settled yet) if ``event`` ends the answer: its usage
        settles the request, ``[DONE]`` without usage settles estimated. True when the event
        is to be dropped: the extra usage-only chunk, for a client that did not ask for it."""
        call = self.call
        found = usage_event(event)
        if found is not None:
            usage, usage_only = found
            await call.settle_reported(
                usage, text=lambda: generated_text([*self.forwarded, event + EVENT_END])
            )
            return usage_only and not self.client_wants_usage
        if event.startswith(DONE_EVENT):
            await self._settle_estimated(self.forwarded, status="completed")
        return False

    async def _client_gone(self) -> None:
        """The client went away, noticed on a write or (aiohttp cancels the handler) while we
        waited for a slow or stalled upstream: stop the upstream, charge what was generated."""
        self.upstream.close()
        await self._settle_estimated(
            [*self.forwarded, self.framer.tail], status="client_disconnected"
        )

    async def _upstream_broke(self, exc: BaseException) -> None:
        if self.framer.ended:  # after [DONE]: the client already has its whole answer
            log.info("upstream broke after [DONE] for %s: %r", self.call.request_id, exc)
            return
        log.warning("upstream stream broke for %s: %r", self.call.request_id, exc)
        await self._finish_broken_stream()

    async def _upstream_ended(self) -> None:
        """The upstream ended its body: settle from what the tail scan passed over if not yet
        settled, and end the response (with an error event if the answer did not complete)."""
        if not self.call.hold_state.is_final and not await self._settle_passed_over():
            # The upstream closed cleanly but sent neither usage nor [DONE] (e.g. it ended
            # with an error event): the generation did not complete.
            await self._finish_broken_stream()
            return
        try:
            await self.response.write_eof()
        except _CLIENT_RESET:
            pass

    async def _settle_passed_over(self) -> bool:
        """Settle from a usage object or ``[DONE]`` the tail scan passed over because
        something followed it in its chunk (a sloppy upstream); True if there was one.

        This settles after those bytes were delivered, the one case that does: a crash in
        between leaves the hold to the sweeper.
        """
        events = b"".join(self.forwarded).split(EVENT_END)
        for event in reversed(events):
            found = usage_event(event)
            if found is not None:
                await self.call.settle_reported(
                    found[0], text=partial(generated_text, self.forwarded)
                )
                return True
        if any(event.startswith(DONE_EVENT) for event in events):
            await self._settle_estimated(self.forwarded, status="completed")
            return True
        return False

    async def _settle_estimated(self, events: list[bytes], *, status: str) -> None:
        """Charge the text in ``events`` (tiktoken's count), or void when there is none.
        Nothing to do once charged or voided."""
        call = self.call
        if call.hold_state.is_final:
            return
        text = generated_text(events)
        if not text:
            await call.void()
            return
        await call.settle(await call.estimated_usage(text), source="estimated", status=status)

    async def _finish_broken_stream(self) -> None:
        """The upstream stream ended without usage: charge what was generated (or void when
        nothing was), and tell the client with a final SSE error event."""
        try:
            await self._settle_estimated(self.forwarded, status="upstream_error")
        except BillingError:
            log.error("could not settle broken stream %s", self.call.request_id)
        await _send_stream_error(
            self.response,
            "The upstream stream ended unexpectedly; you were charged only for what was generated.",
            "upstream_error",
        )


async def _send_stream_error(response: web.StreamResponse, message: str, code: str) -> None:
    """A final SSE event carrying an ``error`` object (the status is already sent)."""
    try:
        await response.write(
            b"data: " + orjson.dumps(error_body(message, "server_error", code=code)) + EVENT_END
        )
        await response.write_eof()
    except _CLIENT_RESET:
        pass
