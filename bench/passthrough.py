"""A bare aiohttp pass-through proxy: the throughput ceiling for the gateway's stack.

No authentication, no billing, no parsing: every request under ``/v1/`` is sent to the
upstream with its body unchanged through one shared ``ClientSession``, and the answer is
streamed back with ``iter_any()`` as it arrives. The gateway does all of this plus its money
path, so its numbers divided by these are the cost of billing.

Like the gateway it uses uvloop, no access log, a ``ClientTimeout`` without a total, an
unlimited connection pool, ``auto_decompress=False`` and the gateway's garbage-collector
settings (``creditgate.serve.tune_gc_for_serving``); and like the gateway it replaces the
client's key with its own upstream key.

    python bench/passthrough.py --port 8100 --upstream http://127.0.0.1:8090 --api-key sk-x

Prints ``READY http://host:port`` on stdout when serving; stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Sequence
from typing import Final

import aiohttp
from aiohttp import web

from creditgate.serve import tune_gc_for_serving

UPSTREAM_SESSION: Final = web.AppKey("upstream_session", aiohttp.ClientSession)
UPSTREAM_BASE: Final = web.AppKey("upstream_base", str)
UPSTREAM_HEADERS: Final = web.AppKey("upstream_headers", dict[str, str])

# Response headers that describe the upstream connection, not the body we relay.
_HOP_HEADERS: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}
)


async def forward(request: web.Request) -> web.StreamResponse:
    """Relay one request to the upstream and stream its answer back unchanged.

    Upstream unreachable: 502 with OpenAI's error envelope. Client gone mid-answer: the
    upstream response is closed.
    """
    app = request.app
    body = await request.read()
    try:
        upstream = await app[UPSTREAM_SESSION].request(
            request.method,
            app[UPSTREAM_BASE] + request.rel_url.raw_path_qs,
            data=body,
            headers=app[UPSTREAM_HEADERS],
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.json_response(
            {"error": {"message": repr(exc), "type": "upstream_error", "param": None}},
            status=502,
        )
    try:
        response = web.StreamResponse(status=upstream.status)
        for name, value in upstream.headers.items():
            if name.lower() not in _HOP_HEADERS:
                response.headers[name] = value
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            upstream.close()  # the client went away: stop reading the upstream
        return response
    finally:
        upstream.release()


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )
    app[UPSTREAM_SESSION] = session
    yield
    await session.close()


def create_app(upstream_base: str, api_key: str) -> web.Application:
    """The pass-through app; ``upstream_base`` is ``http://host:port`` (no ``/v1``)."""
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app[UPSTREAM_BASE] = upstream_base.rstrip("/")
    app[UPSTREAM_HEADERS] = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
    }
    app.cleanup_ctx.append(_upstream_session)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    return app


async def serve(host: str, port: int, upstream_base: str, api_key: str) -> None:
    """Serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(upstream_base, api_key), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
        tune_gc_for_serving()
        print(f"READY http://{host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    """``python bench/passthrough.py``: serve the pass-through proxy until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="upstream base, e.g. http://h:p")
    parser.add_argument("--api-key", default="sk-bench", help="key sent to the upstream")
    args = parser.parse_args(argv)
    coroutine = serve(args.host, args.port, args.upstream, args.api_key)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(coroutine)
    else:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(coroutine)


if __name__ == "__main__":
    main()
