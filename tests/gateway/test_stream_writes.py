"""How a stream leaves the gateway: headers ride with the first event, the last event with the
end of the chunked body, and nothing after ``[DONE]`` is forwarded.

Each write to a client socket is recorded by wrapping aiohttp's ``StreamWriter`` (the gateway's
server-side posters only: not its upstream requests, not the simulator's answers).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import http_writer, web_protocol

from devtools.simulator import Scenario

END_OF_BODY = b"0\r\n\r\n"


@pytest.fixture
def client_writes(gw, monkeypatch) -> list[bytes]:
    """Every write the gateway makes to a client socket, in order."""
    writes: list[bytes] = []
    write, writelines = http_writer.StreamWriter._write, http_writer.StreamWriter._writelines

    def to_client(writer: http_writer.StreamWriter) -> bool:
        # A server-side writer on the gateway's port (the simulator serves in this process too).
        protocol = writer.protocol
        if not isinstance(protocol, web_protocol.RequestHandler) or protocol.transport is None:
            return False
        return protocol.transport.get_extra_info("sockname")[1] == gw.settings.port

    def recording_write(self, chunk):
        if to_client(self):
            writes.append(bytes(chunk))
        return write(self, chunk)

    def recording_writelines(self, chunks):
        chunks = list(chunks)
        if to_client(self):
            writes.append(b"".join(bytes(c) for c in chunks))
        return writelines(self, chunks)

    monkeypatch.setattr(http_writer.StreamWriter, "_write", recording_write)
    monkeypatch.setattr(http_writer.StreamWriter, "_writelines", recording_writelines)
    return writes


async def _stream(gw, key: str) -> tuple[list, str]:
    stream = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    return chunks, stream.response.headers["x-request-id"]


async def test_stream_the_upstream_sends_whole_reaches_the_client_in_one_write(
    gw, sim, client_writes
):
    _, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=5, prompt_tokens=100))
    chunks, _ = await _stream(gw, key)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 5
    assert len(client_writes) == 1
    (write,) = client_writes
    assert write.startswith(b"HTTP/1.1 200 ")
    assert write.count(b"data: {") == 7 + 1  # opening, 5 contents, finish; usage
    assert write.endswith(b"data: [DONE]\n\n\r\n" + END_OF_BODY)


async def test_stream_in_pieces_sends_headers_with_the_first_event_and_ends_with_the_last(
    gw, sim, client_writes
):
    _, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=3, delay_s=0.05, prompt_tokens=100))
    chunks, _ = await _stream(gw, key)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 3
    assert len(client_writes) == 4  # as the upstream wrote them
    assert client_writes[0].startswith(b"HTTP/1.1 200 ")
    assert all(b"data: " in write for write in client_writes)  # no write of headers alone
    assert client_writes[-1].endswith(b"data: [DONE]\n\n\r\n" + END_OF_BODY)
    assert not any(write.endswith(END_OF_BODY) for write in client_writes[:-1])


@pytest.mark.parametrize("trailer_delay_s", [None, 0.05], ids=["same-write", "later-write"])
async def test_bytes_after_done_are_not_charged_and_a_later_write_of_them_is_dropped(
    gw, sim, client_writes, trailer_delay_s
):
    """A sloppy upstream sends an event after [DONE], in the same write or 50 ms later: the
    usage it reported is what is charged, the client sees no error, and a later write is
    not forwarded (the client's response ended at [DONE])."""
    account, key = await gw.create_account(1_000_000)
    trailer = b'data: {"late": true}\n\n'
    sim.push(
        Scenario(
            chunks=4,
            prompt_tokens=900,
            stream_trailer=trailer,
            stream_trailer_delay_s=trailer_delay_s,
        )
    )
    chunks, request_id = await _stream(gw, key)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    await sim.wait_until(lambda: sim.requests[-1].outcome == "completed")
    if trailer_delay_s is not None:
        await asyncio.sleep(0.1)  # loopback delivery to the gateway takes well under 1 ms
        assert not any(b"late" in write for write in client_writes)
    await gw.settled()
    await gw.assert_charged_upstream_usage(
        request_id,
        account,
        opening_millicredits=1_000_000,
        prompt_tokens=900,
        completion_tokens=4,
    )


async def test_upstream_that_breaks_after_done_leaves_the_answer_whole_and_charged(
    gw, sim, client_writes, caplog
):
    """The upstream cuts its connection after [DONE] (and a late write), without ending its
    chunked body: the client already has its whole answer; nothing else happens."""
    account, key = await gw.create_account(1_000_000)
    sim.push(
        Scenario(
            chunks=2,
            prompt_tokens=300,
            stream_trailer=b": late\n\n",
            stream_trailer_delay_s=0.05,
            disconnect_after_stream=True,
        )
    )
    with caplog.at_level(logging.INFO):
        chunks, request_id = await _stream(gw, key)
        await sim.wait_until(lambda: sim.requests[-1].outcome == "completed")
        await asyncio.sleep(0.1)  # the gateway reads the late write and the cut
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
    assert client_writes[-1].endswith(b"data: [DONE]\n\n\r\n" + END_OF_BODY)
    assert "upstream broke after [DONE]" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    await gw.settled()
    await gw.assert_charged_upstream_usage(
        request_id,
        account,
        opening_millicredits=1_000_000,
        prompt_tokens=300,
        completion_tokens=2,
    )


async def test_non_streamed_answer_reaches_the_client_in_one_write_with_its_length(
    gw, sim, client_writes
):
    _, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=4, prompt_tokens=100))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.prompt_tokens == 100
    assert len(client_writes) == 1
    (write,) = client_writes
    head, _, body = write.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {len(body)}".encode() in head.split(b"\r\n")
    assert b"Content-Type: application/json" in head.split(b"\r\n")
    assert f"x-request-id: {raw.headers['x-request-id']}".encode() in head.split(b"\r\n")
    assert body.startswith(b"{") and body.endswith(b"}")
