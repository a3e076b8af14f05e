"""A local OpenAI-compatible upstream: scripted, fast, and loudly fake.

Used three ways:

- ``make run`` without a real upstream key: ``python -m gateway.simulator --port 8090``
  prints a banner saying every answer is canned, then serves ``/v1``.
- Tests: :class:`Simulator` starts it in-process on a free loopback port; tests script each
  request with a :class:`Scenario` (chunks, delays, usage, errors, hangs, disconnects) and
  assert on the requests it received and on the clients that went away.
- Benchmarks: responses are rendered to JSON bytes when a scenario is set or pushed; a request
  only fills a few holes (id, model, usage) and joins bytes, and its prompt tokens are a
  character count, never a tokenization.

Endpoints (OpenAI's shapes): ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/responses`` (each streamed or not), ``POST /v1/embeddings``, ``GET /v1/models``,
``GET /v1/models/{id}``.

Usage it reports, unless ``Scenario.usage`` replaces the whole object: prompt tokens are
``Scenario.prompt_tokens`` or ``1 + characters // 4`` of the request's prompt text (the
common four-characters-per-token rule); completion tokens are the content chunks sent (each
chunk is one token) plus ``Scenario.reasoning_tokens``. Streams carry usage only when the
request asked with ``stream_options.include_usage`` (Responses streams always do, in
``response.completed``), as OpenAI's do.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import itertools
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

DEFAULT_MODELS: Final = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3-mini",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
)
DEFAULT_EMBEDDING_DIMENSIONS: Final = 16
MAX_EMBEDDING_DIMENSIONS: Final = 4096

_SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
}
_DONE: Final = b"data: [DONE]\n\n"
_FINGERPRINT: Final = "fp_simulator"


@dataclass(frozen=True, eq=False, kw_only=True)
class Scenario:
    """How the simulator answers one request (or every request, as the default).

    Attributes:
        chunks: content chunks generated; each is one completion token. A request's
            ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` caps it
            (then ``finish_reason`` is ``"length"``).
        chunk_text: the text of every chunk. The default, ``" hello"``, is exactly one token
            in both o200k_base and cl100k_base, so counting the output with tiktoken gives
            ``chunks``.
        delay_s: seconds before each content chunk (a non-streamed answer waits the sum).
        prompt_tokens: reported prompt/input tokens; ``None`` estimates from the request.
        usage: replaces the whole reported usage object, verbatim.
        cached_tokens: ``prompt_tokens_details.cached_tokens`` (``input_tokens_details`` for
            Responses).
        reasoning_tokens: hidden reasoning tokens, added to the completion tokens.
        fail_status: answer this HTTP status in OpenAI's error envelope before any output.
        fail_message: the error message of ``fail_status`` and mid-stream errors.
        fail_after_chunks: stop after ``min(fail_after_chunks, chunks)`` content chunks,
            before the final chunk and the usage: by closing the connection
            (``fail_mode="disconnect"``) or by sending an SSE error event and ending the
            stream (``"error_event"``). A non-streamed request gets its connection closed, or a 500.
        hang: never answer; wait until the client goes away.
        hang_after_chunks: stream this many content chunks, then stall until the client goes.
        omit_usage: report no usage at all, as an upstream that ignores ``stream_options``.
    """

    chunks: int = 16
    chunk_text: str = " hello"
    delay_s: float = 0.0
    prompt_tokens: int | None = None
    usage: dict[str, Any] | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    fail_status: int | None = None
    fail_message: str = "The simulated upstream failed."
    fail_after_chunks: int | None = None
    fail_mode: Literal["disconnect", "error_event"] = "disconnect"
    hang: bool = False
    hang_after_chunks: int | None = None
    omit_usage: bool = False


@dataclass(kw_only=True)
class ReceivedRequest:
    """One request as the simulator saw it, for assertions.

    Attributes:
        json: the parsed body; ``None`` for a GET or a body that is not JSON.
        outcome: ``"pending"``, ``"completed"``, ``"rejected"`` (401/400), ``"failed"``
            (scripted failure), or ``"disconnected"`` (the client went away first).
        chunks_sent: content chunks streamed (or, not streamed, generated) before the outcome.
    """

    method: str
    path: str
    headers: CIMultiDictProxy[str]
    json: Any
    outcome: str = "pending"
    chunks_sent: int = 0

    @property
    def api_key(self) -> str | None:
        """The bearer token that reached the upstream, or ``None``."""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return (token.strip() or None) if scheme.lower() == "bearer" else None


class _Template:
    """JSON bytes with named holes: rendered once, filled per request by joining bytes."""

    __slots__ = ("_parts", "_slots")
    _HOLE: Final = re.compile(rb'"\\u0000([a-z_]+)"')

    def __init__(self, obj: object, *, prefix: bytes = b"data: ", suffix: bytes = b"\n\n"):
        raw = prefix + orjson.dumps(obj) + suffix
        self._parts: list[bytes] = []
        self._slots: list[str] = []
        position = 0
        for match in self._HOLE.finditer(raw):
            self._parts.append(raw[position : match.start()])
            self._slots.append(match.group(1).decode())
            position = match.end()
        self._parts.append(raw[position:])

    def render(self, values: Mapping[str, bytes]) -> bytes:
        pieces = [self._parts[0]]
        for slot, part in zip(self._slots, self._parts[1:], strict=True):
            pieces += (values[slot], part)
        return b"".join(pieces)


def _hole(name: str) -> str:
    return "\x00" + name


def _json(obj: object) -> _Template:
    return _Template(obj, prefix=b"", suffix=b"")


def _event(name: str, obj: object) -> _Template:
    return _Template(obj, prefix=f"event: {name}\ndata: ".encode())


@dataclass(frozen=True, slots=True)
class _Stream:
    """The SSE events of one streamed answer, as bytes.

    Attributes:
        head: events before the first content chunk.
        chunk: content event ``i`` (0-based).
        tail: the events that end a stream after ``n`` content chunks (finish, usage, done).
        error: the error event that ends a stream after ``n`` content chunks.
    """

    head: bytes
    chunk: Callable[[int], bytes]
    tail: Callable[[int], bytes]
    error: Callable[[int], bytes]


_ID, _CREATED, _MODEL, _USAGE, _FINISH, _CONTENT = (
    _hole("id"),
    _hole("created"),
    _hole("model"),
    _hole("usage"),
    _hole("finish"),
    _hole("content"),
)
_MSG_ID, _ITEM_STATUS, _SEQ = _hole("msg_id"), _hole("item_status"), _hole("seq")


def _error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error envelope, with the ``type`` and ``code`` OpenAI uses for ``status``."""
    kind, code = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        404: ("invalid_request_error", "model_not_found"),
        429: ("requests", "rate_limit_exceeded"),
    }.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _error_response(status: int, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(_error_body(status, message)),
        content_type="application/json",
    )


class _ChoicesFormat:
    """Chat Completions and legacy Completions: one object, or a stream of choice chunks, a
    chunk with ``finish_reason``, then (when asked) a chunk with ``choices: []`` and the usage,
    then ``[DONE]``. Subclasses give the object names and the choice shapes."""

    id_prefix: str
    object_name: str
    chunk_object_name: str

    def __init__(self, scenario: Scenario) -> None:
        head = {"id": _ID, "object": self.object_name, "created": _CREATED, "model": _MODEL}
        chunk_head = {**head, "object": self.chunk_object_name}
        fingerprint = {"system_fingerprint": _FINGERPRINT}
        body: dict[str, Any] = {**head, "choices": [self.body_choice()], **fingerprint}
        if not scenario.omit_usage:
            body["usage"] = _USAGE
        self._body = _json(body)

        def chunk(choice: dict[str, Any], with_usage: bool) -> _Template:
            obj: dict[str, Any] = {**chunk_head, "choices": [choice], **fingerprint}
            if with_usage:
                obj["usage"] = None  # OpenAI sends null on every chunk but the usage chunk
            return _Template(obj)

        self._chunks = {
            flag: [chunk(choice, flag) for choice in self.chunk_choices(scenario)]
            for flag in (False, True)
        }
        self._usage_chunk = _Template({**chunk_head, "choices": [], **fingerprint, "usage": _USAGE})
        self._error = _Template(_error_body(500, scenario.fail_message))

    def body_choice(self) -> dict[str, Any]:
        raise NotImplementedError

    def chunk_choices(self, scenario: Scenario) -> list[dict[str, Any]]:
        """Choices of the chunks: [opening chunk,] content chunk, finishing chunk."""
        raise NotImplementedError

    def body(self, values: dict[str, bytes], truncated: bool) -> bytes:
        values["finish"] = b'"length"' if truncated else b'"stop"'
        return self._body.render(values)

    def stream(self, values: dict[str, bytes], include_usage: bool, truncated: bool) -> _Stream:
        values["finish"] = b'"length"' if truncated else b'"stop"'
        *opening, middle, last = self._chunks[include_usage]
        content = middle.render(values)
        usage = self._usage_chunk.render(values) if include_usage else b""
        tail = last.render(values) + usage + _DONE
        error = self._error.render(values)
        return _Stream(
            head=b"".join(template.render(values) for template in opening),
            chunk=lambda _: content,
            tail=lambda _: tail,
            error=lambda _: error,
        )


class _ChatFormat(_ChoicesFormat):
    """Chat Completions: ``chat.completion`` and ``chat.completion.chunk`` objects."""

    id_prefix = "chatcmpl-sim"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def body_choice(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": _CONTENT,
            "refusal": None,
            "annotations": [],
        }
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": _FINISH}

    def chunk_choices(self, scenario: Scenario) -> list[dict[str, Any]]:
        return [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            for delta, finish in (
                ({"role": "assistant", "content": "", "refusal": None}, None),
                ({"content": scenario.chunk_text}, None),
                ({}, _FINISH),
            )
        ]

    @staticmethod
    def prompt_of(body: Mapping[str, Any]) -> object:
        return body.get("messages")

    @staticmethod
    def max_tokens(body: Mapping[str, Any]) -> object:
        return body.get("max_completion_tokens", body.get("max_tokens"))

    @staticmethod
    def usage(prompt: int, completion: int, scenario: Scenario) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": scenario.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": scenario.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }


class _CompletionsFormat(_ChoicesFormat):
    """Legacy Completions: ``text_completion`` objects, streamed or not."""

    id_prefix = "cmpl-sim"
    object_name = chunk_object_name = "text_completion"

    def body_choice(self) -> dict[str, Any]:
        return {"text": _CONTENT, "index": 0, "logprobs": None, "finish_reason": _FINISH}

    def chunk_choices(self, scenario: Scenario) -> list[dict[str, Any]]:
        return [
            {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
            for text, finish in ((scenario.chunk_text, None), ("", _FINISH))
        ]

    @staticmethod
    def prompt_of(body: Mapping[str, Any]) -> object:
        return body.get("prompt")

    @staticmethod
    def max_tokens(body: Mapping[str, Any]) -> object:
        return body.get("max_tokens")

    @staticmethod
    def usage(prompt: int, completion: int, scenario: Scenario) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


class _ResponsesFormat:
    """Responses API: a ``response`` object, or its SSE event sequence ending in
    ``response.completed`` (``response.incomplete`` when cut by ``max_output_tokens``)."""

    id_prefix = "resp_sim"

    def __init__(self, scenario: Scenario) -> None:
        def part(text: str) -> dict[str, Any]:
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

        def item(content: list[Any], status: str) -> dict[str, Any]:
            return {
                "id": _MSG_ID,
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": content,
            }

        done_item = item([part(_CONTENT)], _ITEM_STATUS)
        usage = None if scenario.omit_usage else _USAGE
        final = {
            False: _response_object("completed", [done_item], usage, None),
            True: _response_object(
                "incomplete", [done_item], usage, {"reason": "max_output_tokens"}
            ),
        }
        in_progress = _response_object("in_progress", [], None, None)
        at = {"item_id": _MSG_ID, "output_index": 0, "content_index": 0}

        def event(name: str, seq: int | str, **fields: Any) -> _Template:
            return _event(name, {"type": name, "sequence_number": seq, **fields})

        self._body = {flag: _json(obj) for flag, obj in final.items()}
        self._head = [
            event("response.created", 0, response=in_progress),
            event("response.in_progress", 1, response=in_progress),
            event("response.output_item.added", 2, output_index=0, item=item([], "in_progress")),
            event("response.content_part.added", 3, **at, part=part("")),
        ]
        self._delta = event(
            "response.output_text.delta", _SEQ, **at, delta=scenario.chunk_text, logprobs=[]
        )
        self._tail = [
            event("response.output_text.done", _SEQ, **at, text=_CONTENT, logprobs=[]),
            event("response.content_part.done", _SEQ, **at, part=part(_CONTENT)),
            event("response.output_item.done", _SEQ, output_index=0, item=done_item),
        ]
        self._final = {
            False: event("response.completed", _SEQ, response=final[False]),
            True: event("response.incomplete", _SEQ, response=final[True]),
        }
        self._error = event(
            "error", _SEQ, code="server_error", message=scenario.fail_message, param=None
        )

    @staticmethod
    def _values(values: dict[str, bytes], truncated: bool) -> None:
        values["msg_id"] = b'"msg_' + values["id"][1:]
        values["item_status"] = b'"incomplete"' if truncated else b'"completed"'

    def body(self, values: dict[str, bytes], truncated: bool) -> bytes:
        self._values(values, truncated)
        return self._body[truncated].render(values)

    def stream(self, values: dict[str, bytes], include_usage: bool, truncated: bool) -> _Stream:
        self._values(values, truncated)
        first = len(self._head)  # sequence_number of the first delta
        ending = [*self._tail, self._final[truncated]]

        def numbered(template: _Template, seq: int) -> bytes:
            return template.render({**values, "seq": str(seq).encode()})

        def tail(sent: int) -> bytes:
            return b"".join(numbered(t, first + sent + i) for i, t in enumerate(ending))

        return _Stream(
            head=b"".join(template.render(values) for template in self._head),
            chunk=lambda index: numbered(self._delta, first + index),
            tail=tail,
            error=lambda sent: numbered(self._error, first + sent),
        )

    @staticmethod
    def prompt_of(body: Mapping[str, Any]) -> object:
        return [body.get("instructions"), body.get("input")]

    @staticmethod
    def max_tokens(body: Mapping[str, Any]) -> object:
        return body.get("max_output_tokens")

    @staticmethod
    def usage(prompt: int, completion: int, scenario: Scenario) -> dict[str, Any]:
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": scenario.cached_tokens},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": scenario.reasoning_tokens},
            "total_tokens": prompt + completion,
        }


def _response_object(
    status: str, output: list[Any], usage: object, incomplete_details: object
) -> dict[str, Any]:
    return {
        "id": _ID,
        "object": "response",
        "created_at": _CREATED,
        "status": status,
        "error": None,
        "incomplete_details": incomplete_details,
        "instructions": None,
        "model": _MODEL,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "metadata": {},
    }


_Format = _ChatFormat | _CompletionsFormat | _ResponsesFormat
_Kind = Literal["chat", "completions", "responses", "embeddings"]


class _Script:
    """A scenario with every response it can produce already rendered to bytes."""

    __slots__ = ("content", "formats", "scenario")

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.content = orjson.dumps(scenario.chunk_text * scenario.chunks)
        self.formats: dict[str, _Format] = {
            "chat": _ChatFormat(scenario),
            "completions": _CompletionsFormat(scenario),
            "responses": _ResponsesFormat(scenario),
        }


class SimulatorState:
    """Everything the simulator app holds: scenarios, received requests, disconnects.

    Reach it as ``app[SIMULATOR_STATE]``; a :class:`Simulator` is one. Arguments as for
    :func:`create_simulator_app`.

    Attributes:
        disconnects: answers abandoned because the client went away before they ended.
    """

    def __init__(
        self,
        default: Scenario | None = None,
        *,
        require_auth: bool = True,
        models: Sequence[str] = DEFAULT_MODELS,
        max_recorded: int = 10_000,
        embedding_dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS,
    ) -> None:
        self.require_auth = require_auth
        self.embedding_dimensions = embedding_dimensions
        self.disconnects = 0
        self._default = _Script(default or Scenario())
        self._queue: deque[_Script] = deque()
        self._recorded: deque[ReceivedRequest] = deque(maxlen=max_recorded)
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._vectors: dict[tuple[int, bool], bytes] = {}
        models_list = [
            {"id": model, "object": "model", "created": 1_715_367_049, "owned_by": "simulator"}
            for model in models
        ]
        self.models_body = orjson.dumps({"object": "list", "data": models_list})
        self.model_bodies = {entry["id"]: orjson.dumps(entry) for entry in models_list}

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Requests received, oldest first (the last ``max_recorded`` of them)."""
        return list(self._recorded)

    def push(self, *scenarios: Scenario) -> None:
        """Queue scenarios for the next requests, one each, in order; then the default."""
        self._queue.extend(_Script(scenario) for scenario in scenarios)

    def set_default(self, scenario: Scenario) -> None:
        """Answer requests with ``scenario`` whenever the queue is empty."""
        self._default = _Script(scenario)

    def clear(self) -> None:
        """Forget queued scenarios, received requests and the disconnect count."""
        self._queue.clear()
        self._recorded.clear()
        self.disconnects = 0

    async def wait_until(self, predicate: Callable[[], bool], *, timeout_s: float = 5.0) -> None:
        """Wait until ``predicate()`` holds, re-checked whenever a request arrives or ends.

        Raises:
            TimeoutError: still false after ``timeout_s`` seconds.
        """
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_for_disconnects(self, count: int = 1, *, timeout_s: float = 5.0) -> None:
        """Wait until at least ``count`` clients went away mid-answer."""
        await self.wait_until(lambda: self.disconnects >= count, timeout_s=timeout_s)

    def next_script(self) -> _Script:
        return self._queue.popleft() if self._queue else self._default

    def next_id(self, prefix: str) -> bytes:
        return orjson.dumps(f"{prefix}{next(self._ids):012d}")

    def record(self, record: ReceivedRequest) -> None:
        self._recorded.append(record)
        self._changed.set()

    def conclude(self, record: ReceivedRequest, outcome: str) -> None:
        """Set a pending request's outcome; a client gone first counts as a disconnect."""
        if record.outcome != "pending":
            return
        record.outcome = outcome
        if outcome == "disconnected":
            self.disconnects += 1
        self._changed.set()

    def vector(self, dimensions: int, as_base64: bool) -> bytes:
        """One embedding as JSON bytes: a float list, or base64 of little-endian float32."""
        key = (dimensions, as_base64)
        if key not in self._vectors:
            # Multiples of 1/16 survive the float32 round trip of base64 exactly.
            values = [((i % 16) - 8) / 16 for i in range(dimensions)]
            if as_base64:
                packed = array.array("f", values)
                if sys.byteorder == "big":
                    packed.byteswap()
                self._vectors[key] = orjson.dumps(base64.b64encode(packed.tobytes()).decode())
            else:
                self._vectors[key] = orjson.dumps(values)
        return self._vectors[key]


SIMULATOR_STATE: Final = web.AppKey("simulator_state", SimulatorState)


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
        headers=CIMultiDictProxy(CIMultiDict(request.headers)),
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
    state.conclude(record, "completed")
    return web.Response(body=fmt.body(values, truncated), content_type="application/json")


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
    """Send a streamed answer as scripted. Without delays, all of it goes in one write."""
    response = web.StreamResponse(headers=_SSE_HEADERS)
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
        await response.write(b"".join(pending))
        record.chunks_sent = stop_at
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


def approximate_prompt_tokens(prompt: object) -> int:
    """``1 + characters // 4`` over every string in ``prompt``; a token id counts as 4.

    Cheap and deterministic, not a tokenization; tests that need exact numbers set
    ``Scenario.prompt_tokens`` or ``Scenario.usage``.
    """
    return 1 + _characters(prompt) // 4


def _characters(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return 4
    if isinstance(value, list):
        return sum(_characters(item) for item in value)
    if isinstance(value, dict):
        return sum(_characters(item) for item in value.values())
    return 0


# --- running it -----------------------------------------------------------------------


class Simulator(SimulatorState):
    """The simulator on a free loopback port, started and stopped by a test or benchmark.

    It is the app's state, so scripting and assertions go straight to it::

        async with Simulator() as sim:
            client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test")
            sim.push(Scenario(chunks=3, fail_after_chunks=1))
            ...
            assert sim.requests[-1].api_key == "sk-test"
            await sim.wait_for_disconnects(1)
    """

    def __init__(
        self,
        default: Scenario | None = None,
        *,
        require_auth: bool = True,
        models: Sequence[str] = DEFAULT_MODELS,
        max_recorded: int = 10_000,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """Build the app; nothing listens until :meth:`start`. ``port=0`` picks a free one."""
        super().__init__(
            default, require_auth=require_auth, models=models, max_recorded=max_recorded
        )
        self.app = _build_app(self)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``, the ``base_url`` for the ``openai`` client."""
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        """Listen on ``host:port``; after this, :attr:`port` is the bound port."""
        # A short shutdown_timeout: stop() must not wait a minute for scripted hangs.
        runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and cancel answers still running. Safe to call twice."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _banner(base_url: str, require_auth: bool) -> str:
    rule = "!" * 78
    auth = "any 'Authorization: Bearer <token>'" if require_auth else "no authentication"
    return "\n".join(
        [
            rule,
            "!!  SIMULATED UPSTREAM: every answer is canned text, no model is called.",
            f"!!  OpenAI-compatible API at {base_url} ({auth}).",
            "!!  Set UPSTREAM_BASE_URL and UPSTREAM_API_KEY for a real provider.",
            rule,
        ]
    )


def main(argv: Iterable[str] | None = None) -> None:
    """``python -m gateway.simulator``: serve the simulator until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.simulator",
        description="A local, fake OpenAI-compatible upstream for development and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--chunks", type=int, default=16, help="content chunks per answer")
    parser.add_argument("--chunk-text", default=" hello", help="text of every chunk")
    parser.add_argument("--delay-s", type=float, default=0.0, help="seconds before each chunk")
    parser.add_argument("--no-auth", action="store_true", help="accept requests without a key")
    args = parser.parse_args(None if argv is None else list(argv))
    app = create_simulator_app(
        Scenario(chunks=args.chunks, chunk_text=args.chunk_text, delay_s=args.delay_s),
        require_auth=not args.no_auth,
        max_recorded=0,
    )
    print(_banner(f"http://{args.host}:{args.port}/v1", not args.no_auth), file=sys.stderr)
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        loop=loop,
    )


if __name__ == "__main__":
    main()
