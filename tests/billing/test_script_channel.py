"""The pipelined Redis connection of the hot path, against a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
import redis.exceptions

from billing.metering.script_channel import ScriptChannel

_ECHO_ARG = "return ARGV[1]"


@pytest.fixture
async def channel(redis_url: str) -> AsyncIterator[ScriptChannel]:
    ch = ScriptChannel(redis_url, timeout_s=2.0)
    try:
        yield ch
    finally:
        await ch.close()


async def test_concurrent_commands_get_their_own_replies(channel: ScriptChannel):
    sha = await channel.execute("SCRIPT", "LOAD", _ECHO_ARG)
    replies = await asyncio.gather(
        *(channel.evalsha(sha, _ECHO_ARG, [], [f"v{i}"]) for i in range(200))
    )
    assert replies == [f"v{i}" for i in range(200)]


async def test_unknown_script_is_loaded_then_run(channel: ScriptChannel):
    script = "return ARGV[1] .. '!'"
    sha = await channel.execute("SCRIPT", "LOAD", script)
    await channel.execute("SCRIPT", "FLUSH")
    assert await channel.evalsha(sha, script, [], ["hi"]) == "hi!"


async def test_error_reply_raises_response_error(channel: ScriptChannel):
    with pytest.raises(redis.exceptions.ResponseError):
        await channel.execute("EVAL", "return redis.error_reply('nope')", 0)
    assert await channel.execute("PING") == "PONG"  # the connection is still usable


async def test_silent_server_times_out_every_command_in_flight():
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ch = ScriptChannel(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
    try:
        started = time.monotonic()
        results = await asyncio.gather(
            ch.execute("PING"), ch.execute("PING"), return_exceptions=True
        )
        waited = time.monotonic() - started
        assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results)
        assert "took over 0.3s" in str(results[0])
        assert 0.25 <= waited < 5.0
    finally:
        await ch.close()
        server.close()
        await server.wait_closed()


async def test_reconnects_after_the_connection_drops(channel: ScriptChannel, redis_url: str):
    assert await channel.execute("PING") == "PONG"
    name = "cg-test-channel"
    await channel.execute("CLIENT", "SETNAME", name)
    killer = ScriptChannel(redis_url)
    try:
        assert await killer.execute("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal") >= 1
    finally:
        await killer.close()
    await asyncio.sleep(0.05)
    assert await channel.execute("PING") == "PONG"


async def test_cancelled_command_does_not_shift_replies(channel: ScriptChannel):
    sleeper = "local t = redis.call('TIME') return ARGV[1]"
    sha = await channel.execute("SCRIPT", "LOAD", sleeper)
    first = asyncio.ensure_future(channel.evalsha(sha, sleeper, [], ["first"]))
    second = asyncio.ensure_future(channel.evalsha(sha, sleeper, [], ["second"]))
    first.cancel()
    assert await second == "second"
    assert await channel.evalsha(sha, sleeper, [], ["third"]) == "third"


async def test_send_batches_with_execute_and_reports_the_write(channel: ScriptChannel):
    assert channel.send("PING") is None  # not connected yet: the caller must use execute
    assert await channel.execute("PING") == "PONG"
    sent = channel.send("ECHO", "a")
    assert sent is not None
    reply, written = sent
    queued = asyncio.ensure_future(channel.execute("ECHO", "b"))
    assert not written.done()  # goes out with this loop iteration's batch, not at once
    assert await written is True
    assert await reply == "a"
    assert await queued == "b"


async def test_a_cancelled_wait_for_the_write_leaves_the_others_alone(channel: ScriptChannel):
    assert await channel.execute("PING") == "PONG"
    first = channel.send("ECHO", "1")
    second = channel.send("ECHO", "2")
    assert first is not None and second is not None
    first[1].cancel()  # that request's handler was cancelled (its client left)
    assert await second[1] is True
    assert await first[0] == "1"
    assert await second[0] == "2"


async def _normal_clients(redis_url: str) -> int:
    admin = redis.asyncio.from_url(redis_url)
    try:
        # This admin connection itself is one of them: not counted.
        return len(await admin.client_list(_type="normal")) - 1
    finally:
        await admin.aclose()


async def test_stalled_setup_fails_as_connection_error_and_leaks_no_connection(redis_url: str):
    """A Redis stall longer than the timeout while the channel reconnects (its SCRIPT LOAD
    waits): each attempt fails with ConnectionError (the gateway's 503), never a bare
    TimeoutError, and closes the connection it opened."""
    ch = ScriptChannel(redis_url, timeout_s=0.3)
    ch.preload(_ECHO_ARG)
    admin = redis.asyncio.from_url(redis_url)
    try:
        assert await ch.execute("PING") == "PONG"
        await admin.ping()
        before = await _normal_clients(redis_url)
        await admin.execute_command("CLIENT", "PAUSE", 2500, "ALL")
        failures: list[BaseException] = []
        for _ in range(4):  # the live connection times out, then each reconnect stalls
            try:
                await ch.execute("PING")
            except Exception as exc:
                failures.append(exc)
        assert len(failures) == 4
        assert all(isinstance(f, redis.exceptions.ConnectionError) for f in failures), failures
        await admin.execute_command("CLIENT", "UNPAUSE")
        assert await ch.execute("PING") == "PONG"
        await asyncio.sleep(0.1)  # let Redis notice the closed ones
        assert await _normal_clients(redis_url) == before
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await ch.close()
