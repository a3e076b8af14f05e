"""The simulator as an aiohttp app: routes, handlers, and the scripted pacing of answers.

A handler admits the request (records it, checks the bearer token and the JSON body), takes
the next scripted :class:`~devtools.simulator.scenario.Scenario`, fills the pre-rendered
response of :mod:`devtools.simulator.shapes`, and sends it as scripted: with delays, a failure
status, a failure mid-answer, a hang, or in one write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Final, Literal

import orjson
from aiohttp import web

from devtools.simulator.scenario import ReceivedRequest, Scenario, approximate_prompt_tokens
from devtools.simulator.shapes import _error_body, _Script, _Stream
from devtools.simulator.state import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    DEFAULT_MODELS,
    MAX_EMBEDDING_DIMENSIONS,
    SIMULATOR_STATE,
    SimulatorState,
)
from gateway.held_headers import HeldHeadersResponse, write_whole_response

_SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
}

_JSON_HEADERS: Final = {"Content-Type": "application/json"}

_Kind = Literal["chat", "completions", "responses", "embeddings"]


def create_simulator_app(
    default: Scenario | None = None,
    *,
    require_auth: bool = True,
    models: Sequence[str] = DEFAULT_MODELS,
    max_recorded: int = 10_000,
    embedding_dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS,
) -> web.Application:
    """The simulator as an aiohttp app, its state at ``app[SIMULATOR_STATE]``.

    Args:
        default: the scenario for requests when none is queued; ``Scenario()`` if omitted.
        require_auth: answer 401 unless ``Authorization: Bearer <any token>`` is sent.
        models: ids listed by ``GET /v1/models`` (generation accepts any model name).
        max_recorded: received requests kept for assertions; 0 for long benchmark runs.
        embedding_dimensions: vector length when a request names no ``dimensions``.

    Run it with ``handler_cancellation=True`` (as :class:`Simulator` and ``main`` do) so an
    answer stops the moment its client goes away; without it, the simulator polls.
    """
    return _build_app(
        SimulatorState(
            default,
            require_auth=require_auth,
            models=models,
            max_recorded=max_recorded,
            embedding_dimensions=embedding_dimensions,
        )
    )


def _build_app(state: SimulatorState) -> web.Application:
    app = web.Application()
    app[SIMULATOR_STATE] = state
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model_id}", _models)
    return app


def _error_response(status: int, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(_error_body(status, message)),
        content_type="application/json",
    )


# --- handlers -------------------------------------------------------------------------


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completions")


async def _responses(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "responses")


async def _embeddings(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "embeddings")


async def _models(request: web.Request) -> web.StreamResponse:
    state = request.app[SIMULATOR_STATE]
    admitted = await _admit(request, state)
    if isinstance(admitted, web.Response):
        return admitted
    model_id = request.match_info.get("model_id")
    body = state.models_body if model_id is None else state.model_bodies.get(model_id)
    if body is None:
        state.conclude(admitted[0], "rejected")
        return _error_response(404, f"The model '{model_id}' does not exist")
    state.conclude(admitted[0], "completed")
    return web.Response(body=body, content_type="application/json")


async def _admit(
    request: web.Request, state: SimulatorState
) -> tuple[ReceivedRequest, dict[str, Any]] | web.Response:
    """Record the request, then check its bearer token and (for POST) its JSON body."""
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    record = ReceivedRequest(
        method=request.method,
        path=request.path,
        headers=request.headers,  # already an immutable CIMultiDictProxy of its own
        json=body,
    )
    state.record(record)
    if state.require_auth and record.api_key is None:
        state.conclude(record, "rejected")
        return _error_response(
            401, "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
    if request.method == "POST" and not isinstance(body, dict):
        state.conclude(record, "rejected")
        return _error_response(400, "We could not parse the JSON body of your request.")
    return record, body or {}


async def _generate(request: web.Request, kind: _Kind) -> web.StreamResponse:
    state = request.app[SIMULATOR_STATE]
    admitted = await _admit(request, state)
    if isinstance(admitted, web.Response):
        return admitted
    record, body = admitted
    script = state.next_script()
    try:
        refusal = await _scripted_refusal(request, state, record, script.scenario)
        if refusal is not None:
            return refusal
        if script.scenario.raw_answer is not None:
            state.conclude(record, "completed")
            headers = _SSE_HEADERS if body.get("stream") is True else _JSON_HEADERS
            return await write_whole_response(request, script.scenario.raw_answer, headers=headers)
        if kind == "embeddings":
            return await _answer_embeddings(request, state, record, script.scenario, body)
        return await _answer(request, state, record, script, kind, body)
    except asyncio.CancelledError:  # the client went away (handler_cancellation=True)
        state.conclude(record, "disconnected")
        raise


async def _answer(
    request: web.Request,
    state: SimulatorState,
    record: ReceivedRequest,
    script: _Script,
    kind: _Kind,
    body: dict[str, Any],
) -> web.StreamResponse:
    scenario = script.scenario
    fmt = script.formats[kind]
    visible, truncated = _visible_chunks(scenario, fmt.max_tokens(body))
    prompt_tokens = scenario.prompt_tokens
    if prompt_tokens is None:
        prompt_tokens = approximate_prompt_tokens(fmt.prompt_of(body))
    usage = scenario.usage
    if usage is None:
        usage = fmt.usage(prompt_tokens, visible + scenario.reasoning_tokens, scenario)
    values = {
        "id": state.next_id(fmt.id_prefix),
        "created": str(int(time.time())).encode(),
        "model": orjson.dumps(str(body.get("model", ""))),
        "usage": orjson.dumps(usage),
        "content": orjson.dumps(scenario.chunk_text * visible) if truncated else script.content,
    }
    if body.get("stream") is True:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        stream = fmt.stream(values, include_usage and not scenario.omit_usage, truncated)
        return await _write_stream(request, state, record, scenario, stream, visible)
    sent = await _generate_chunks(request, state, record, scenario, visible)
    if sent is not None:
        return sent
    state.conclude(record, "completed")  # before the answer, as a returned response had it
    return await write_whole_response(request, fmt.body(values, truncated), headers=_JSON_HEADERS)


async def _answer_embeddings(
    request: web.Request,
    state: SimulatorState,
    record: ReceivedRequest,
    scenario: Scenario,
    body: dict[str, Any],
) -> web.StreamResponse:
    stopped = await _generate_chunks(request, state, record, scenario, 0)
    if stopped is not None:
        return stopped
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) and inputs and not _is_ids(inputs) else 1
    dimensions = body.get("dimensions", state.embedding_dimensions)
    if not isinstance(dimensions, int) or not 0 < dimensions <= MAX_EMBEDDING_DIMENSIONS:
        state.conclude(record, "rejected")
        return _error_response(400, f"Invalid 'dimensions': {dimensions!r}.")
    vector = state.vector(dimensions, body.get("encoding_format") == "base64")
    data = b",".join(
        b'{"object":"embedding","index":%d,"embedding":%b}' % (index, vector)
        for index in range(count)
    )
    prompt_tokens = scenario.prompt_tokens
    if prompt_tokens is None:
        prompt_tokens = approximate_prompt_tokens(inputs)
    usage = scenario.usage
    if usage is None:
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    usage_part = b"" if scenario.omit_usage else b',"usage":' + orjson.dumps(usage)
    model = orjson.dumps(str(body.get("model", "")))
    state.conclude(record, "completed")
    return web.Response(
        body=b'{"object":"list","data":[%b],"model":%b%b}' % (data, model, usage_part),
        content_type="application/json",
    )


def _is_ids(inputs: list[Any]) -> bool:
    """Whether an embeddings ``input`` list is one prompt of token ids (``list[int]``)."""
    return isinstance(inputs[0], int)


# --- scripted behaviour ---------------------------------------------------------------


async def _scripted_refusal(
    request: web.Request, state: SimulatorState, record: ReceivedRequest, scenario: Scenario
) -> web.StreamResponse | None:
    """The answer for a scripted hang or error status, or ``None`` to go on generating."""
    if scenario.hang:
        await _wait_until_gone(request)
        state.conclude(record, "disconnected")
        return web.Response()
    if scenario.fail_status is not None:
        state.conclude(record, "failed")
        return _error_response(scenario.fail_status, scenario.fail_message)
    return None


async def _generate_chunks(
    request: web.Request,
    state: SimulatorState,
    record: ReceivedRequest,
    scenario: Scenario,
    visible: int,
) -> web.StreamResponse | None:
    """Spend a non-streamed answer's generation time; ``None`` unless scripted to fail.

    A scripted mid-generation failure closes the connection (``fail_mode="disconnect"``) or
    answers 500 (``"error_event"``); a scripted stall waits for the client to go away.
    """
    stop_at = _stop_at(scenario, visible)
    if scenario.delay_s > 0 and not await _pause(request, scenario.delay_s * stop_at):
        state.conclude(record, "disconnected")
        return web.Response()
    record.chunks_sent = stop_at
    if scenario.fail_after_chunks is not None:
        state.conclude(record, "failed")
        if scenario.fail_mode == "error_event":
            return _error_response(500, scenario.fail_message)
        _close_connection(request)
        return web.Response()
    if scenario.hang_after_chunks is not None:
        await _wait_until_gone(request)
        state.conclude(record, "disconnected")
        return web.Response()
    return None


async def _write_stream(
    request: web.Request,
    state: SimulatorState,
    record: ReceivedRequest,
    scenario: Scenario,
    stream: _Stream,
    visible: int,
) -> web.StreamResponse:
    """Send a streamed answer as scripted. Without delays, all of it (status line, headers,
    events and the end of the chunked body) goes in one write."""
    response = HeldHeadersResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    stop_at = _stop_at(scenario, visible)
    pending = [stream.head]
    try:
        for index in range(stop_at):
            if scenario.delay_s > 0:
                await response.write(b"".join(pending))
                record.chunks_sent = index
                pending.clear()
                if not await _pause(request, scenario.delay_s):
                    state.conclude(record, "disconnected")
                    return response
            pending.append(stream.chunk(index))
        if scenario.fail_after_chunks is not None and scenario.fail_mode == "error_event":
            pending.append(stream.error(stop_at))
        elif scenario.fail_after_chunks is None and scenario.hang_after_chunks is None:
            pending.append(stream.tail(stop_at))
        late_trailer = stream.late_trailer and stop_at == visible
        ends_here = (
            scenario.fail_after_chunks is None
            and scenario.hang_after_chunks is None
            and not scenario.disconnect_after_stream
            and not late_trailer
        )
        if ends_here:
            await response.write_eof(b"".join(pending))
        else:
            await response.write(b"".join(pending))
        record.chunks_sent = stop_at
        if late_trailer and scenario.fail_after_chunks is None:
            if not await _pause(request, scenario.stream_trailer_delay_s or 0.0):
                state.conclude(record, "disconnected")
                return response
            await response.write(stream.late_trailer)
    except ConnectionResetError:  # aiohttp's "Cannot write to closing transport"
        state.conclude(record, "disconnected")
        return response
    if scenario.fail_after_chunks is not None:
        state.conclude(record, "failed")
        if scenario.fail_mode == "disconnect":
            _close_connection(request)
    elif scenario.hang_after_chunks is not None:
        await _wait_until_gone(request)
        state.conclude(record, "disconnected")
    else:
        if scenario.disconnect_after_stream:
            _close_connection(request)
        state.conclude(record, "completed")
    return response


def _stop_at(scenario: Scenario, visible: int) -> int:
    """Content chunks sent before a scripted failure or stall (all of them if none)."""
    stop_at = visible
    for limit in (scenario.fail_after_chunks, scenario.hang_after_chunks):
        if limit is not None:
            stop_at = min(stop_at, max(limit, 0))
    return stop_at


def _visible_chunks(scenario: Scenario, max_tokens: object) -> tuple[int, bool]:
    """Content chunks to generate under the request's output cap, and whether it cut them."""
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
        visible = min(scenario.chunks, max(max_tokens - scenario.reasoning_tokens, 0))
        return visible, visible < scenario.chunks
    return scenario.chunks, False


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _pause(request: web.Request, seconds: float) -> bool:
    """Sleep ``seconds``; ``False`` as soon as the client has gone away."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if _client_gone(request):
            return False
        await asyncio.sleep(min(remaining, 0.05))
    return not _client_gone(request)


async def _wait_until_gone(request: web.Request) -> None:
    # Polled as well as cancelled: aiohttp has no disconnect event for a handler, and a runner
    # without handler_cancellation never cancels it.
    while not _client_gone(request):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


def _close_connection(request: web.Request) -> None:
    """Close the connection after the bytes already written: a truncated chunked body."""
    if request.transport is not None:
        request.transport.close()
