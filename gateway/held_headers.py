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


async def write_whole_response(
    request: web.BaseRequest, body: bytes, *, status: int = 200, headers: dict[str, str]
) -> HeldHeadersResponse:
    """Write a complete answer (``Content-Length`` set) from the handler, in one write, and
    return the prepared response for the handler to return.

    What ``return web.Response(body=...)`` sends, for less CPU per request (measured in
    docs/benchmarks.md). A client that has gone away (``ConnectionResetError``, which
    aiohttp's ``ClientConnectionResetError`` is) is not an error here: both callers have
    finished their work (settled, or concluded the simulated request) before answering.
    """
    response = HeldHeadersResponse(status=status, headers=headers)
    response.content_length = len(body)
    try:
        await response.prepare(request)
        await response.write_eof(body)
    except ConnectionResetError:
        pass
    return response
