"""The upstream simulator, driven by the official ``openai`` SDK as a real client would."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from billing.metering.tokens import TokenCounter
from devtools.simulator import Scenario, Simulator

API_KEY = "sk-sim-test"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator() as simulator:
        yield simulator


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=sim.base_url, api_key=API_KEY, max_retries=0, timeout=10.0
    ) as sdk:
        yield sdk


async def test_chat_non_streamed_reports_scripted_usage(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(chunks=5, chunk_text=" hi", prompt_tokens=123, cached_tokens=100))

    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content == " hi" * 5
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 123
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == 128
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 100
    received = sim.requests[-1]
    assert (received.method, received.path) == ("POST", "/v1/chat/completions")
    assert received.api_key == API_KEY
    assert received.json["messages"] == MESSAGES
    assert received.outcome == "completed"


async def test_chat_stream_without_include_usage_sends_no_usage(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(chunks=4))

    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]

    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == " hello" * 4
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all("usage" not in chunk.model_fields_set for chunk in chunks)  # key absent


async def test_chat_stream_with_include_usage_ends_with_usage_chunk(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(chunks=4, prompt_tokens=9, reasoning_tokens=2))

    stream = await client.chat.completions.create(
        model="o3-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    *content_chunks, usage_chunk = chunks
    # OpenAI sends "usage": null on every chunk before the usage chunk.
    assert all("usage" in chunk.model_fields_set for chunk in content_chunks)
    assert all(chunk.usage is None for chunk in content_chunks)
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == 9
    assert usage_chunk.usage.completion_tokens == 4 + 2  # reasoning tokens are output tokens
    assert usage_chunk.usage.completion_tokens_details is not None
    assert usage_chunk.usage.completion_tokens_details.reasoning_tokens == 2


async def test_chat_max_tokens_cuts_output_with_length(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(chunks=10, prompt_tokens=1))

    completion = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_completion_tokens=3
    )

    assert completion.choices[0].message.content == " hello" * 3
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


async def test_usage_override_is_reported_verbatim(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    usage = {"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801}
    sim.push(Scenario(chunks=2, usage=usage))

    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == usage


async def test_omit_usage_sends_none_even_when_asked(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(chunks=3, omit_usage=True), Scenario(chunks=3, omit_usage=True))

    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks)
    assert completion.usage is None


async def test_prompt_tokens_default_is_deterministic(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    first = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    second = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 0


async def test_completions_stream_with_include_usage(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(chunks=3, prompt_tokens=4))

    stream = await client.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="Once upon a time",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert "".join(choice.text for chunk in chunks for choice in chunk.choices) == " hello" * 3
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 3)


async def test_completions_non_streamed(sim: Simulator, client: openai.AsyncOpenAI) -> None:
    sim.push(Scenario(chunks=2, prompt_tokens=4))

    completion = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi")

    assert completion.choices[0].text == " hello hello"
    assert completion.usage is not None and completion.usage.total_tokens == 6


async def test_responses_non_streamed_usage(sim: Simulator, client: openai.AsyncOpenAI) -> None:
    sim.push(Scenario(chunks=3, prompt_tokens=50, cached_tokens=20, reasoning_tokens=5))

    response = await client.responses.create(model="gpt-4.1", input="Say hello.")

    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == " hello" * 3
    assert response.usage is not None
    assert response.usage.input_tokens == 50
    assert response.usage.input_tokens_details.cached_tokens == 20
    assert response.usage.output_tokens == 8
    assert response.usage.output_tokens_details.reasoning_tokens == 5
    assert response.usage.total_tokens == 58


async def test_responses_stream_events_end_with_completed_usage(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(chunks=3, prompt_tokens=11))

    stream = await client.responses.create(model="gpt-4.1", input="Say hello.", stream=True)
    events = [event async for event in stream]

    types = [event.type for event in events]
    assert types[0] == "response.created"
    assert types.count("response.output_text.delta") == 3
    assert types[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == " hello" * 3
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None
    assert completed.response.usage.input_tokens == 11
    assert completed.response.usage.output_tokens == 3


async def test_embeddings_float_and_base64(sim: Simulator, client: openai.AsyncOpenAI) -> None:
    sim.push(Scenario(prompt_tokens=6), Scenario(prompt_tokens=6))

    # The SDK asks for base64 by default and decodes it; "float" comes back as a list.
    decoded = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    floats = await client.embeddings.create(
        model="text-embedding-3-small", input="a", encoding_format="float", dimensions=4
    )

    assert [item.index for item in decoded.data] == [0, 1]
    assert len(decoded.data[0].embedding) == 16
    assert decoded.data[0].embedding[:4] == [-0.5, -0.4375, -0.375, -0.3125]
    assert decoded.usage.prompt_tokens == decoded.usage.total_tokens == 6
    assert floats.data[0].embedding == [-0.5, -0.4375, -0.375, -0.3125]
    assert sim.requests[0].json["encoding_format"] == "base64"


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    listed = [model.id async for model in client.models.list()]
    model = await client.models.retrieve("gpt-4o")

    assert "gpt-4o" in listed
    assert model.id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_request_without_bearer_token_is_401(sim: Simulator) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sim.base_url}/chat/completions", json={"model": "gpt-4o"}) as response,
    ):
        body = await response.json()

    assert response.status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert sim.requests[-1].outcome == "rejected"


async def test_fail_status_answers_error_envelope_before_output(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(fail_status=429, fail_message="Slow down."))

    with pytest.raises(openai.RateLimitError) as raised:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)

    assert raised.value.status_code == 429
    assert raised.value.message.endswith("Slow down.")
    assert raised.value.code == "rate_limit_exceeded"
    assert sim.requests[-1].outcome == "failed"


async def test_fail_after_chunks_disconnect_truncates_stream(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(chunks=10, fail_after_chunks=2))
    received: list[str] = []

    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    with pytest.raises(openai.APIConnectionError):  # the SDK's name for a cut-off body
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    assert "".join(received) == " hello" * 2
    assert sim.requests[-1].outcome == "failed"
    assert sim.requests[-1].chunks_sent == 2
    assert sim.disconnects == 0  # the upstream hung up, not the client


async def test_fail_after_chunks_error_event_raises_api_error(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(chunks=10, fail_after_chunks=3, fail_mode="error_event"))
    received: list[str] = []

    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="simulated upstream failed"):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    assert "".join(received) == " hello" * 3


async def test_client_leaving_mid_stream_counts_a_disconnect(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(chunks=1000, delay_s=0.02))

    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()

    await sim.wait_for_disconnects(1)
    assert sim.requests[-1].outcome == "disconnected"
    assert sim.requests[-1].chunks_sent < 1000


async def test_hang_stops_when_client_times_out(sim: Simulator) -> None:
    sim.push(Scenario(hang=True))

    async with openai.AsyncOpenAI(
        base_url=sim.base_url, api_key=API_KEY, max_retries=0, timeout=0.3
    ) as impatient:
        with pytest.raises(openai.APITimeoutError):
            await impatient.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    await sim.wait_for_disconnects(1)
    assert sim.requests[-1].outcome == "disconnected"


async def test_pushed_scenarios_are_used_in_order_then_default(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.push(Scenario(chunks=1), Scenario(chunks=2))

    counts = []
    for _ in range(3):
        completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert completion.usage is not None
        counts.append(completion.usage.completion_tokens)

    assert counts == [1, 2, Scenario().chunks]


def test_default_chunk_text_is_one_token_per_chunk() -> None:
    # Lets end-to-end tests compare a tiktoken count of the output with completion_tokens.
    scenario = Scenario()
    counter = TokenCounter.load()
    text = scenario.chunk_text * scenario.chunks
    for model in ("gpt-4o", "gpt-4"):
        assert counter.count_generated(text, model) == scenario.chunks
