"""The HTTP edge of both services: connection limits and answers for what no route sees.

``edge_runner(app, settings, ...)`` replaces ``web.AppRunner`` for the gateway and the admin
service. Its connections are ``EdgeRequestHandler``s, aiohttp's ``RequestHandler`` with:

- **A header deadline** (``HTTP_HEADER_TIMEOUT_S``, 60 s): a request's headers must be complete
  within this many seconds of the connection's opening (its first request) or of the request's
  first byte (later requests on a kept-alive connection); else the connection is closed. Bytes
  arriving do not extend it, so a client trickling a header a byte at a time (slow loris) is
  cut at the deadline.
- **A body deadline** (``HTTP_BODY_TIMEOUT_S``, 120 s): a body that has not arrived whole this
  long after its headers closes the connection (the route's read then fails and, in the
  gateway, the route is cancelled). A body that arrives with its headers costs no timer.
- **A keep-alive idle timeout** (``HTTP_KEEPALIVE_TIMEOUT_S``, 75 s, aiohttp's own timer): a
  connection closes when the next request's headers have not arrived this long after the
  previous response.
- **A connection cap** (``HTTP_MAX_CONNECTIONS`` per service, 4096): a connection beyond it is
  closed as soon as it is accepted, before anything is read from it, and counted. For the cap
  to hold before the process runs out of file descriptors, ``ensure_descriptor_budget`` raises
  the soft ``RLIMIT_NOFILE`` at start-up (and warns when the hard limit is too low).
- **Error answers in the envelope**: what aiohttp answers itself (``handle_error``: a request
  its parser refuses, an exception escaping a route, a handler's ``TimeoutError``; in
  ``finish_response``, an ``HTTPException`` its router or ``Expect`` check raised) is
  ``runtime.errors.edge_error_response``, with an ``x-request-id``, instead of aiohttp's
  ``text/plain``.
- **A body that breaks mid-read** (a bad chunk size after the headers) fails the route's read
  with the parser's error (an envelope 400), where aiohttp left the read waiting forever.

aiohttp's ``Server`` builds plain ``RequestHandler``s and has no hook for another class, so
``EdgeServer.__call__`` builds ours and ``EdgeAppRunner`` swaps ``EdgeServer`` in for the
``Server`` that ``AppRunner`` made (same handler, request factory and arguments).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from runtime.errors import edge_error_response, framework_error_response
from runtime.settings import Settings

log = logging.getLogger(__name__)

# Descriptors beyond the connections: Postgres and Redis pools, the listening sockets, logs.
_DESCRIPTOR_MARGIN = 256


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one service allows a connection (see the module docstring)."""

    header_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        """The ``HTTP_*`` settings."""
        return cls(
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            keepalive_timeout_s=settings.http_keepalive_timeout_s,
            max_connections=settings.http_max_connections,
        )


class EdgeRequestHandler(RequestHandler):
    """One client connection: aiohttp's handler with the header deadline, the connection cap
    and envelope error answers (see the module docstring)."""

    __slots__ = ("_body_deadline", "_header_deadline", "_limits")

    def __init__(self, manager: EdgeServer, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._header_deadline: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        assert isinstance(manager, EdgeServer)
        if manager.open_connections > manager.max_connections:
            manager.refuse(self)
            self.force_close()
            return
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        # Waiting for a request (``_waiter`` pending, nothing queued): these bytes start its
        # head. The deadline is armed only if they do not complete it: no timer for a head
        # that arrives whole, the usual case on a kept-alive connection.
        waiter = self._waiter
        awaiting_head = waiter is not None and not waiter.done()
        super().data_received(data)
        if self._messages:  # a request's head is complete (or refused by the parser)
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None
            if self._current_request is not None:
                self._fail_broken_body(self._current_request)
            body = self._messages[-1][1]
            if not body.is_eof():  # only the newest request's body can still be arriving
                self._arm_body_deadline(body)
        elif awaiting_head and data and self._header_deadline is None:
            self._arm_header_deadline()

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # An HTTPException reaching here escaped every route: aiohttp's router (a target no
        # route matches) or its Expect check raised it. Routes' own answers carry an id.
        if (
            isinstance(resp, web.HTTPException)
            and resp.status >= 400
            and "x-request-id" not in resp.headers
        ):
            resp = framework_error_response(request, resp)
        return await super().finish_response(request, resp, start_time)

    def connection_lost(self, exc: BaseException | None) -> None:
        for deadline in (self._header_deadline, self._body_deadline):
            if deadline is not None:
                deadline.cancel()
        self._header_deadline = self._body_deadline = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The envelope (``runtime.errors.edge_error_response``) instead of aiohttp's text.

        A request the parser refused is the client's fault and anyone can send one: it is
        logged in one INFO line (no traceback), so malformed requests cannot flood the log.
        Anything else keeps aiohttp's logging (a traceback at ERROR). Either way nothing can
        be answered once output began (``ConnectionError``, as aiohttp)."""
        if isinstance(exc, HttpProcessingError):
            log.info(
                "refused a malformed request from %s: %s",
                request.remote,
                exc.message.partition("\n")[0][:200],
            )
            if request.writer.output_size > 0:
                raise ConnectionError("the answer had begun; the connection is dropped")
        else:
            super().handle_error(request, status, exc, message)
        return edge_error_response(status, exc)

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self._loop.call_later(
            self._limits.header_timeout_s, self._header_deadline_passed
        )

    def _arm_body_deadline(self, body: StreamReader) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
        deadline = self._loop.call_later(
            self._limits.body_timeout_s, self._body_deadline_passed, body
        )
        self._body_deadline = deadline
        body.on_eof(deadline.cancel)

    def _body_deadline_passed(self, body: StreamReader) -> None:
        self._body_deadline = None
        if not body.is_eof():
            log.debug("closing a connection whose request body is overdue")
            self._count_timed_out("body")
            self.force_close()

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self._waiter is not None and not self._messages:
            log.debug("closing a connection whose request headers are overdue")
            self._count_timed_out("header")
            self.force_close()

    def _count_timed_out(self, stage: str) -> None:
        manager = self._manager
        assert isinstance(manager, EdgeServer)
        manager.timed_out_connections[stage] += 1

    def _fail_broken_body(self, request: BaseRequest) -> None:
        # The parser failed while this request's body was arriving: aiohttp queues the error
        # as the next request and leaves this body unfinished, so a read would wait forever.
        failed = self._messages[-1][0]
        payload = request.content
        if isinstance(failed, _ErrInfo) and not payload.is_eof():
            payload.set_exception(failed.exc)
            payload.feed_eof()


class EdgeServer(web.Server):
    """aiohttp's ``Server`` that builds ``EdgeRequestHandler``s and counts connections.

    Attributes:
        open_connections: connections open now (accepted and not yet lost).
        refused_connections: connections closed at once by the cap since start-up.
        timed_out_connections: connections closed by a deadline since start-up, by stage
            (``header``, ``body``).
    """

    def __init__(self, handler: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._kwargs["keepalive_timeout"] = limits.keepalive_timeout_s
        self._limits = limits
        self.max_connections = limits.max_connections
        self.open_connections = 0
        self.refused_connections = 0
        self.timed_out_connections = {"header": 0, "body": 0}

    def __call__(self) -> EdgeRequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, limits=self._limits, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open_connections -= 1

    def refuse(self, handler: RequestHandler) -> None:
        """Count a connection the cap closes; log the 1st, 2nd, 4th, 8th ... (a flood of
        connections is no flood of log lines)."""
        self.refused_connections += 1
        if self.refused_connections & (self.refused_connections - 1) == 0:  # 1, 2, 4, 8 ...
            log.warning(
                "connection cap reached (%d open, HTTP_MAX_CONNECTIONS=%d): closing new "
                "connections; %d closed so far",
                self.open_connections,
                self.max_connections,
                self.refused_connections,
            )


class EdgeAppRunner(web.AppRunner):
    """``web.AppRunner`` serving through an ``EdgeServer``."""

    __slots__ = ("_limits",)

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return EdgeServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            limits=self._limits,
            **made._kwargs,
        )


def edge_runner(app: web.Application, settings: Settings, **kwargs: Any) -> EdgeAppRunner:
    """The runner of one service, limited by the ``HTTP_*`` settings; ``kwargs`` are
    ``web.AppRunner``'s (``access_log``, ``handler_cancellation``, ``shutdown_timeout`` ...)."""
    return EdgeAppRunner(app, limits=ConnectionLimits.from_settings(settings), **kwargs)


def ensure_descriptor_budget(settings: Settings) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to what both services' connection caps need; returns
    the soft limit in force.

    Needed: ``3 x HTTP_MAX_CONNECTIONS`` + a margin (the gateway holds a client's and, while it
    proxies, an upstream's descriptor per connection; the admin service one). The soft limit is
    raised up to the hard limit, never lowered; when even the hard limit is lower, a warning
    says so: then the process may run out of descriptors (new connections wait in the listen
    backlog) before the cap closes any.
    """
    needed = 3 * settings.http_max_connections + _DESCRIPTOR_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        log.warning(
            "file descriptor limit %d is below the %d that HTTP_MAX_CONNECTIONS=%d needs: "
            "raise the hard limit (ulimit -Hn) or lower HTTP_MAX_CONNECTIONS",
            soft,
            needed,
            settings.http_max_connections,
        )
    return soft
