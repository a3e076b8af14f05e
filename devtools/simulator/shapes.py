"""OpenAI's response shapes (Chat Completions, legacy Completions, Responses), as bytes.

A format renders everything a :class:`~devtools.simulator.scenario.Scenario` can answer to
JSON or SSE byte templates once, with named holes (id, created, model, usage, content,
finish reason); a request fills the holes and joins bytes. :class:`_Script` holds a scenario
with all its formats rendered. The embeddings body is small enough to build per request (in
:mod:`devtools.simulator.server`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from devtools.simulator.scenario import Scenario

_DONE: Final = b"data: [DONE]\n\n"
_FINGERPRINT: Final = "fp_simulator"


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
        late_trailer: bytes sent in a write of their own after ``tail`` (see
            ``Scenario.stream_trailer_delay_s``).
    """

    head: bytes
    chunk: Callable[[int], bytes]
    tail: Callable[[int], bytes]
    error: Callable[[int], bytes]
    late_trailer: bytes = b""


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


class _ChoicesFormat:
    """Chat Completions and legacy Completions: one object, or a stream of choice chunks, a
    chunk with ``finish_reason``, then (when asked) a chunk with ``choices: []`` and the usage,
    then ``[DONE]``. Subclasses give the object names and the choice shapes."""

    id_prefix: str
    object_name: str
    chunk_object_name: str

    def __init__(self, scenario: Scenario) -> None:
        late = scenario.stream_trailer_delay_s is not None
        self._trailer = b"" if late else scenario.stream_trailer
        self._late_trailer = scenario.stream_trailer if late else b""
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
        tail = last.render(values) + usage + _DONE + self._trailer
        error = self._error.render(values)
        return _Stream(
            head=b"".join(template.render(values) for template in opening),
            chunk=lambda _: content,
            tail=lambda _: tail,
            error=lambda _: error,
            late_trailer=self._late_trailer,
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
