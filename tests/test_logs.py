"""``creditgate serve``'s logs (``runtime.json_logs``): one JSON object per stderr line, an
access line per billed request, money events, and never a key, a prompt or a webhook secret.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import openai
import orjson
import pytest

from billing.metering.redis_keys import outbox_key, shard_of
from devtools.localservices import free_port
from devtools.simulator import Simulator
from runtime import json_logs
from runtime.json_logs import install_json_logging
from tests.harness import create_account_with_key, seed_database, serve_env, start_serve

WEBHOOK_SECRET = "whsec_" + "W" * 32


@pytest.fixture
def root_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The root logger's handlers and level, and ``json_logs``' stream and buffers, restored
    after the test."""
    monkeypatch.setattr(json_logs, "_stream", json_logs._stream)
    monkeypatch.setattr(json_logs, "_buffers", {})
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logging_writes_the_fields_and_redacts_secrets(root_logging) -> None:
    stream = io.StringIO()
    install_json_logging(logging.INFO, stream, force=True)
    key = "cg_live_" + "K" * 43
    logging.getLogger("creditgate.test").info(
        "with %s", key, extra={"event": "hold.expired", "requestId": "req_1"}
    )
    try:
        raise ValueError(f"Bearer {key}")
    except ValueError:
        logging.getLogger("creditgate.test").exception("failed")
    text = stream.getvalue()
    assert key not in text
    first, second = (orjson.loads(line) for line in text.splitlines())
    assert first["level"] == "INFO"
    assert first["logger"] == "creditgate.test"
    assert first["message"] == "with cg_live_[REDACTED]"
    assert (first["event"], first["requestId"]) == ("hold.expired", "req_1")
    assert first["time"].endswith("+00:00")
    assert second["level"] == "ERROR"
    assert "Bearer [REDACTED]" in second["exc_info"]


async def _usage_row(database_url: str, request_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + 10
        while True:
            row = await conn.fetchrow(
                "SELECT * FROM usage_events WHERE request_id = $1", request_id
            )
            if row is not None:
                return row
            assert time.monotonic() < deadline, "usage row not posted"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def test_serve_logs_json_lines_with_an_access_line_and_no_secret(
    database_url: str, redis_url: str, sim: Simulator, tmp_path: Path
) -> None:
    await seed_database(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        account_id, key = await create_account_with_key(conn, 1_000_000, name="logs")
    finally:
        await conn.close()
    marker = "prompt-marker-" + secrets.token_hex(8)
    bad_key = "cg_live_" + "B" * 43
    port = free_port()
    env = serve_env(
        database_url,
        redis_url,
        sim.base_url,
        port,
        PURCHASES_ENABLED="false",
        STRIPE_WEBHOOK_SECRETS=WEBHOOK_SECRET,
    )
    err = tmp_path / "serve.err"
    process = await start_serve(env, tmp_path / "serve.out", err)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": marker}]
            )
            request_id = raw.headers["x-request-id"]
        async with openai.AsyncOpenAI(base_url=base_url, api_key=bad_key, max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as refused:
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": marker}]
                )
        refused_id = refused.value.response.headers["x-request-id"]
        usage = await _usage_row(database_url, request_id)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)

    text = await asyncio.to_thread(err.read_text)
    for secret in (key, bad_key, marker, WEBHOOK_SECRET):
        assert secret not in text
    lines = [orjson.loads(line) for line in text.splitlines()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
    access = {line["requestId"]: line for line in lines if line["logger"] == "creditgate.access"}
    assert access[request_id] == {
        "time": access[request_id]["time"],
        "level": "INFO",
        "logger": "creditgate.access",
        "message": "request",
        "event": "request",
        "requestId": request_id,
        "accountId": account_id,
        "keyPrefix": key[:12],
        "endpoint": "chat.completions",
        "model": "gpt-4o-mini",
        "status": 200,
        "inputTokens": usage["prompt_tokens"],
        "cachedInputTokens": usage["cached_tokens"],
        "outputTokens": usage["completion_tokens"],
        "chargedMillicredits": str(usage["charged_millicredits"]),
        "upstreamMs": access[request_id]["upstreamMs"],
        "totalMs": access[request_id]["totalMs"],
    }
    assert usage["charged_millicredits"] > 0
    assert 0 <= access[request_id]["upstreamMs"] <= access[request_id]["totalMs"]
    refusal = access[refused_id]
    assert (refusal["status"], refusal["accountId"], refusal["keyPrefix"]) == (
        401,
        None,
        bad_key[:12],
    )
    assert refusal["chargedMillicredits"] == "0"
    posted = [line for line in lines if line.get("event") == "settlement.batch_posted"]
    assert sum(line["posted"] for line in posted) == 1


async def test_money_events_carry_their_event_names(
    make_gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """``hold.expired`` from the sweeper, ``settlement.dead_lettered`` and
    ``settlement.batch_posted`` from the poster, with their ids and amounts as strings."""
    gw = await make_gateway()
    account, key = await gw.create_account(1_000_000)
    caplog.set_level(logging.INFO)
    await gw.holds.reserve(account, 700, request_id="expiring", ttl_s=0.001)
    await gw.redis.xadd(
        outbox_key(shard_of(account)), {"p": "not a record", "c": "1", "a": str(account)}
    )
    await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )

    def events(name: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "event", None) == name]

    deadline = time.monotonic() + 10
    while not (events("hold.expired") and events("settlement.dead_lettered")):
        assert time.monotonic() < deadline, "events not logged"
        await asyncio.sleep(0.05)
    await gw.settled()
    expired = events("hold.expired")[0]
    assert (expired.requestId, expired.accountId) == ("expiring", account)  # type: ignore[attr-defined]
    dead = events("settlement.dead_lettered")[0]
    assert (dead.accountId, dead.chargedMillicredits) == (account, "1")  # type: ignore[attr-defined]
    posted = events("settlement.batch_posted")
    assert sum(r.posted for r in posted) == 1  # type: ignore[attr-defined]
    assert all(r.chargedMillicredits.isdigit() for r in posted)  # type: ignore[attr-defined]


async def test_buffered_lines_wait_for_their_batch_and_match_the_formatters_shape(
    root_logging,
) -> None:
    stream = io.StringIO()
    install_json_logging(logging.INFO, stream, force=True)
    lines = json_logs.buffered_lines("creditgate.access")
    assert lines is not None

    lines.write("request", {"requestId": "req_1", "status": 200})
    assert stream.getvalue() == ""  # waiting for its batch (a timer on this loop)
    json_logs.flush_buffered_lines()
    [line] = [orjson.loads(text) for text in stream.getvalue().splitlines()]
    assert line == {
        "time": line["time"],
        "level": "INFO",
        "logger": "creditgate.access",
        "message": "request",
        "requestId": "req_1",
        "status": 200,
    }
    logging.getLogger("creditgate.test").info("formatted")
    formatted = orjson.loads(stream.getvalue().splitlines()[-1])
    assert formatted.keys() - {"message", "logger"} == line.keys() - {
        "message",
        "logger",
        "requestId",
        "status",
    }

    big = {"padding": "x" * 1000}
    before = len(stream.getvalue())
    for _ in range(json_logs.LINE_FLUSH_BYTES // 1000 + 1):
        lines.write("request", big)
    assert len(stream.getvalue()) - before >= json_logs.LINE_FLUSH_BYTES  # written at once


def test_buffered_lines_off_when_the_logger_is_off_and_at_once_without_a_loop(
    root_logging,
) -> None:
    stream = io.StringIO()
    install_json_logging(logging.INFO, stream, force=True)
    access = logging.getLogger("creditgate.access")
    access.setLevel(logging.WARNING)
    try:
        assert json_logs.buffered_lines("creditgate.access") is None
    finally:
        access.setLevel(logging.NOTSET)
    lines = json_logs.buffered_lines("creditgate.access")
    assert lines is not None
    lines.write("request", {"status": 401})
    assert orjson.loads(stream.getvalue())["status"] == 401


async def test_access_log_false_writes_no_access_line_and_still_posts(
    database_url: str, redis_url: str, sim: Simulator, tmp_path: Path
) -> None:
    await seed_database(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        _, key = await create_account_with_key(conn, 1_000_000, name="quiet")
    finally:
        await conn.close()
    port = free_port()
    env = serve_env(database_url, redis_url, sim.base_url, port, ACCESS_LOG="false")
    err = tmp_path / "serve.err"
    process = await start_serve(env, tmp_path / "serve.out", err)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        await _usage_row(database_url, raw.headers["x-request-id"])
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)

    lines = [orjson.loads(line) for line in (await asyncio.to_thread(err.read_text)).splitlines()]
    assert [line for line in lines if line["logger"] == "creditgate.access"] == []
    assert any(line.get("event") == "settlement.batch_posted" for line in lines)
