"""Responses whose headers leave with their first write, shared by the gateway and its
simulated upstream (event streams, and the gateway's non-streamed answers)."""

from __future__ import annotations

from aiohttp import web


class HeldHeadersResponse(web.StreamResponse):
    """A stream whose status line and headers go out with its first write, in one system call.

    ``web.StreamResponse`` sends them on ``prepare()``, in a system call of their own;
    ``web.Response`` holds them for its body (the class attribute below, aiohttp >= 3.12;
    older versions ignore it and send them early). Use it where the first event follows
    ``prepare()`` at once, so holding the headers delays nothing a client can use: an answer
    written whole (events and ``write_eof``) then leaves in one write instead of three.
    With ``content_length`` set and the body passed to ``write_eof``, it is also a cheaper
    ``web.Response`` for a handler that writes its own answer.
    """

    _send_headers_immediately = False
