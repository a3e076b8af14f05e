"""Hostile input at the HTTP edge, over raw sockets: malformed requests answer in the
envelope with an ``x-request-id`` and never echo a key; connections that never finish a
request are closed; the connection cap holds; ordinary requests are unaffected."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from admin_api.app import create_admin_app
from billing.api_keys import generate_key
from devtools.localservices import free_port
from gateway import appkeys as gateway_keys
from runtime.http_protocol import EdgeServer, edge_runner, ensure_descriptor_budget
from runtime.redaction import RedactingFilter
from runtime.settings import Settings

ENVELOPE_FIELDS = {"message", "type", "param", "code"}


class Answer:
    """One parsed HTTP/1.x answer: status, headers, body."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers: CIMultiDict[str] = CIMultiDict(
            tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line
        )

    def error(self) -> dict[str, Any]:
        """The envelope's ``error`` object, checking the envelope and the request id."""
        assert self.headers["Content-Type"].startswith("application/json")
        assert self.headers["x-request-id"].startswith("req_")
        error = orjson.loads(self.body)["error"]
        assert set(error) >= ENVELOPE_FIELDS
        return error


async def exchange(port: int, raw: bytes, *, timeout_s: float = 5.0) -> Answer:
    """Send ``raw`` on a new connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return Answer(await asyncio.wait_for(reader.read(), timeout_s))
    finally:
        writer.close()


def request_head(path: str = "/v1/models", *extra: bytes, method: str = "GET") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n".encode()
        + b"".join(header + b"\r\n" for header in extra)
        + b"\r\n"
    )


# -- malformed requests: the envelope, an id, no key echoed (defects 5, 8, 10) ------------


async def test_bearer_key_with_non_utf8_bytes_is_401_envelope(gw) -> None:
    answer = await exchange(
        gw.settings.port, request_head("/v1/models", b"Authorization: Bearer cg_live_\xff\xfe\x80")
    )
    assert answer.status == 401
    assert answer.error()["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"Authorization: Bearer KEY" + b"x" * 9000, id="header_over_8190_bytes"),
        pytest.param(b"Authorization: Bearer KEY\x00", id="nul_byte"),
        pytest.param(b"X-Api-Key: KEY\x00", id="bare_key_nul_byte"),
        # The parser echoes control characters escaped ("\\t", "\\x00") right before the key.
        pytest.param(b"Authorization: Bearer\tKEY\x00", id="tab_then_key_nul_byte"),
        pytest.param(b"Authorization: \x00KEY", id="nul_then_key"),
        pytest.param(b"X-Api-Key: \x01KEY", id="control_then_key"),
        pytest.param(b"Authorization: Bearer\tKEY" + b"x" * 9000, id="tab_then_key_over_8190"),
    ],
)
async def test_malformed_header_is_400_envelope_and_key_not_logged_or_echoed(
    gw, caplog: pytest.LogCaptureFixture, header: bytes
) -> None:
    key = generate_key()
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(RedactingFilter())  # as ``creditgate serve`` on its handlers
    answer = await exchange(
        gw.settings.port, request_head("/v1/models", header.replace(b"KEY", key.encode()))
    )
    assert answer.status == 400
    assert answer.error()["code"] == "bad_request"
    assert key.encode() not in answer.body
    assert key[12:] not in caplog.text  # what follows the visible prefix never reaches a log
    refused = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(refused) == 1, "the refused request is logged, once"
    assert refused[0].levelno == logging.INFO and refused[0].exc_info is None  # no traceback


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/a%0D%0Ab", 404),
        ("GET", "/a%0D%0Ab", 404),
        ("GET", "/%0Acg_live_secret", 404),
        ("GET", "/v1/a%00b", 404),
        ("GET", "/" + "a" * 8000, 404),
        ("GET", "/" + "a" * 9000, 400),  # a request line over aiohttp's 8,190 bytes
        ("POST", "/healthz%0A", 404),
        ("DELETE", "/healthz", 405),
        ("GET", "/v1/%FF%C3%28", 404),
        ("GET", "/%ZZ", 404),
    ],
    ids=[
        "v1_crlf",
        "crlf",
        "lf_key",
        "nul",
        "long_path",
        "path_over_limit",
        "post_lf",
        "405",
        "not_utf8",
        "bad_escape",
    ],
)
async def test_any_path_answers_in_the_envelope(gw, method: str, path: str, status: int) -> None:
    answer = await exchange(gw.settings.port, request_head(path, method=method))
    assert answer.status == status
    error = answer.error()
    assert "cg_live_secret" not in error["message"]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (request_head("*", method="OPTIONS"), 404),
        (request_head("evil:443", method="CONNECT"), 404),
        (request_head("/v1/models", b"Expect: 200-ok"), 417),
        (request_head("/healthz", b"Expect: 200-ok"), 417),
    ],
    ids=["options_asterisk", "connect_authority", "expect_unknown", "expect_unknown_healthz"],
)
async def test_answers_of_the_framework_itself_are_envelopes(gw, head: bytes, status: int) -> None:
    """What aiohttp's router and its Expect check answer, before any route runs."""
    answer = await exchange(gw.settings.port, head)
    assert answer.status == status
    answer.error()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_body_whose_content_encoding_does_not_decode_is_400_envelope(
    gw, encoding: str
) -> None:
    _, key = await gw.create_account(1_000_000)
    body = b"abcde"
    answer = await exchange(
        gw.settings.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Encoding: " + encoding.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
    )
    assert answer.status == 400
    assert answer.error()["code"] in ("bad_request", "invalid_body")
    assert len(gw.sim.requests) == 0


async def test_bad_chunk_size_after_the_headers_is_400_envelope(gw) -> None:
    _, key = await gw.create_account(1_000_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.settings.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # the route is reading the body when the bad chunk arrives
        writer.write(b"zz\r\n{}\r\n0\r\n\r\n")
        await writer.drain()
        answer = Answer(await asyncio.wait_for(reader.read(), 5))
    finally:
        writer.close()
    assert answer.status == 400
    assert answer.error()["code"] == "bad_request"
    assert len(gw.sim.requests) == 0


async def test_admin_service_answers_malformed_requests_in_the_envelope(
    database_url: str, redis_url: str
) -> None:
    settings = Settings(database_url=database_url, redis_url=redis_url, upstream_api_key="sk-x")
    runner = edge_runner(create_admin_app(settings), settings, access_log=None)
    await runner.setup()
    port = free_port()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        key = generate_key()
        bad = await exchange(port, request_head("/stripe/webhook", f"X: {key}".encode() + b"\x00"))
        unknown = await exchange(port, request_head("/a%0D%0Ab"))
    finally:
        await runner.cleanup()
    assert (bad.status, bad.error()["code"]) == (400, "bad_request")
    assert key.encode() not in bad.body
    assert (unknown.status, unknown.error()["code"]) == (404, "not_found")


# -- connections that never finish a request (defect 9) ---------------------------------


async def _closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    """True when the server closes the connection within ``within_s`` (reads EOF)."""
    try:
        while await asyncio.wait_for(reader.read(65536), within_s):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


@pytest.mark.parametrize("after_a_request", [False, True], ids=["first_request", "kept_alive"])
async def test_header_trickle_is_cut_at_the_header_deadline(
    make_gateway, after_a_request: bool
) -> None:
    gw = await make_gateway(http_header_timeout_s=1.0, http_keepalive_timeout_s=30.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.settings.port)
    if after_a_request:  # the deadline of a kept-alive connection's next request
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reader.readuntil(b"}"), 5)
        await asyncio.sleep(1.5)  # idle for longer than the header deadline: not cut
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n")

    async def trickle() -> None:  # a header byte every 0.1 s, never the blank line
        while True:
            await asyncio.sleep(0.1)
            writer.write(b"X")
            await writer.drain()

    trickling = asyncio.create_task(trickle())
    try:
        assert await _closed_by_server(reader, 10.0)
    finally:
        trickling.cancel()
        writer.close()
    assert loop.time() - started >= 0.9  # not before the deadline


async def test_body_trickle_is_cut_at_the_body_deadline_and_nothing_is_forwarded(
    make_gateway, sim
) -> None:
    gw = await make_gateway(http_body_timeout_s=1.0, http_keepalive_timeout_s=30.0)
    _, key = await gw.create_account(1_000_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.settings.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def trickle() -> None:  # a body byte every 0.1 s, never the whole body
        while True:
            await asyncio.sleep(0.1)
            writer.write(b" ")
            await writer.drain()

    trickling = asyncio.create_task(trickle())
    try:
        assert await _closed_by_server(reader, 10.0)
    finally:
        trickling.cancel()
        writer.close()
    assert loop.time() - started >= 0.9  # not before the deadline
    assert len(sim.requests) == 0


async def test_body_in_pieces_within_the_deadline_is_served(make_gateway, sim) -> None:
    gw = await make_gateway(http_body_timeout_s=2.0)
    _, key = await gw.create_account(1_000_000)
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.settings.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        for i in range(0, len(body), 20):
            await asyncio.sleep(0.05)
            writer.write(body[i : i + 20])
        answer = Answer(await asyncio.wait_for(reader.read(), 10))
    finally:
        writer.close()
    assert answer.status == 200
    assert len(sim.requests) == 1


async def test_idle_connections_are_closed(make_gateway) -> None:
    gw = await make_gateway(http_header_timeout_s=1.0, http_keepalive_timeout_s=1.0)
    port = gw.settings.port
    fresh = await asyncio.open_connection("127.0.0.1", port)  # never sends a byte
    kept = await asyncio.open_connection("127.0.0.1", port)  # one request, then idle
    kept[1].write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    head = await asyncio.wait_for(kept[0].readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    server = gw.runner.server
    assert isinstance(server, EdgeServer)
    assert server.open_connections == 2
    assert await _closed_by_server(fresh[0], 10.0)
    assert await _closed_by_server(kept[0], 10.0)
    for _, writer in (fresh, kept):
        writer.close()
    await asyncio.sleep(0.1)
    assert server.open_connections == 0


async def test_connection_cap_holds_and_requests_within_it_are_served(make_gateway) -> None:
    gw = await make_gateway(http_max_connections=5)
    port = gw.settings.port
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    server = gw.runner.server
    assert isinstance(server, EdgeServer)
    await asyncio.sleep(0.1)
    assert server.open_connections == 5

    beyond = await asyncio.open_connection("127.0.0.1", port)
    assert await _closed_by_server(beyond[0], 5.0)
    beyond[1].close()
    assert server.refused_connections == 1
    assert server.open_connections == 5

    # A held connection is served as usual; once one closes, a new one is served too.
    reader, writer = held[0]
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    answer = await exchange(port, request_head("/healthz"))
    assert answer.status == 200
    assert server.refused_connections == 1


async def test_normal_keep_alive_requests_are_unaffected_by_short_timeouts(
    make_gateway, sim
) -> None:
    gw = await make_gateway(http_header_timeout_s=1.0, http_keepalive_timeout_s=1.0)
    _, key = await gw.create_account(1_000_000)
    client = gw.client(key)
    for _ in range(3):  # one kept-alive connection, pauses shorter than the timeouts
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.choices[0].message.content
        await asyncio.sleep(0.5)
    server = gw.runner.server
    assert isinstance(server, EdgeServer)
    assert (server.open_connections, server.refused_connections) == (1, 0)


@pytest.mark.parametrize(
    ("raised", "status"),
    [(RuntimeError("a bug"), 500), (TimeoutError(), 504)],
    ids=["exception", "timeout"],
)
async def test_exception_escaping_a_route_is_an_envelope(
    gw, monkeypatch, raised: BaseException, status: int
) -> None:
    async def authenticate(request: web.Request) -> None:
        raise raised

    monkeypatch.setattr(gw.app[gateway_keys.AUTH], "authenticate", authenticate)
    answer = await exchange(
        gw.settings.port,
        request_head("/v1/chat/completions", b"Content-Length: 2", method="POST") + b"{}",
    )
    assert answer.status == status
    assert answer.error()["type"] == "server_error"


@pytest.fixture
def restore_descriptor_limit() -> Iterator[tuple[int, int]]:
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield limits
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def _settings_for(max_connections: int) -> Settings:
    return Settings(
        database_url="", redis_url="", upstream_api_key="", http_max_connections=max_connections
    )


def test_descriptor_budget_raises_the_soft_limit_to_what_the_cap_needs(
    restore_descriptor_limit: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    _, hard = restore_descriptor_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (600, hard))
    assert ensure_descriptor_budget(_settings_for(200)) == 3 * 200 + 256
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 3 * 200 + 256
    assert ensure_descriptor_budget(_settings_for(10)) == 3 * 200 + 256  # never lowered
    assert not caplog.records


def test_descriptor_budget_warns_when_the_hard_limit_is_too_low(
    restore_descriptor_limit: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    _, hard = restore_descriptor_limit
    assert hard != resource.RLIM_INFINITY
    assert ensure_descriptor_budget(_settings_for(hard)) == hard
    assert "HTTP_MAX_CONNECTIONS" in caplog.text
