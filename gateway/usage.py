"""Reading token usage out of OpenAI responses and stream events.

Chat and completions report ``usage.{prompt_tokens, completion_tokens,
prompt_tokens_details.cached_tokens}``; the Responses API reports ``usage.{input_tokens,
output_tokens, input_tokens_details.cached_tokens}``; embeddings report ``prompt_tokens`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request; ``prompt_tokens`` includes ``cached_tokens``."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def parse_usage(usage: Any) -> Usage | None:
    """A ``Usage`` from an OpenAI ``usage`` object of any endpoint, or None if absent."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage:
        details = usage.get("input_tokens_details") or {}
        return Usage(
            _int(usage.get("input_tokens")),
            _int(usage.get("output_tokens")),
            _int(details.get("cached_tokens") if isinstance(details, dict) else 0),
        )
    if "prompt_tokens" in usage:
        details = usage.get("prompt_tokens_details") or {}
        return Usage(
            _int(usage.get("prompt_tokens")),
            _int(usage.get("completion_tokens")),
            _int(details.get("cached_tokens") if isinstance(details, dict) else 0),
        )
    return None


DONE_EVENT = b"data: [DONE]"
_USAGE_KEY = b'"usage"'
_TOKENS_KEY_END = b'_tokens"'
_JSON_SPACE_OR_COLON = frozenset(b" \t\r\n:")


def tail_to_inspect(complete: bytes) -> int:
    """Where the run of events at the end of ``complete`` that must be looked at begins:
    events with a usage object (not ``null``) or ``data: [DONE]``, and blank ones between
    them; ``len(complete)`` when the last event is an ordinary one.

    ``complete`` is whole SSE events (it ends with a blank line). Usage and ``[DONE]`` end a
    stream, so only the tail is looked at, walking back one event at a time: under load the
    upstream's whole answer arrives as one chunk, and scanning all of it (or running a regular
    expression over each event) would cost far more per answer than the tail.
    """
    start = len(complete)
    while start > 0:
        boundary = complete.rfind(b"\n\n", 0, start - 2)
        event_start = boundary + 2 if boundary >= 0 else 0
        if complete[event_start:start].strip() and not _needs_look(complete, event_start, start):
            break
        start = event_start
    return start


def _needs_look(data: bytes, start: int, end: int) -> bool:
    """Whether the event ``data[start:end]`` is ``data: [DONE]`` or holds a usage object.

    Every usage object ``parse_usage`` accepts names a ``*_tokens`` key, so an event without
    ``_tokens"`` needs no closer look. A JSON string cannot contain an unescaped
    ``"usage"``, so a match is always a key; its value must be an object, not ``null``.
    """
    if data.find(DONE_EVENT, start, end) >= 0:
        return True
    if data.find(_TOKENS_KEY_END, start, end) < 0:
        return False
    at = data.find(_USAGE_KEY, start, end)
    while at >= 0:
        i = at + len(_USAGE_KEY)
        while i < end and data[i] in _JSON_SPACE_OR_COLON:
            i += 1
        if i < end and data[i] == 0x7B:  # "{"
            return True
        at = data.find(_USAGE_KEY, i, end)
    return False


def event_data(event: bytes) -> bytes | None:
    """The ``data:`` payload of one SSE event (lines joined), or None when it has none."""
    parts = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


def usage_event(event: bytes) -> tuple[Usage, bool] | None:
    """If this SSE event carries the request's final usage: ``(usage, is_usage_only_chunk)``.

    ``is_usage_only_chunk`` marks the extra chat/completions chunk (``choices: []``) that
    ``stream_options.include_usage`` adds, which clients that did not ask for it never see.
    Responses API usage comes in ``response.completed`` / ``response.incomplete`` /
    ``response.failed`` events, which are always forwarded.
    """
    # Cheap rejections first (this runs on the last events of every stream): every usage
    # object parse_usage accepts names a "*_tokens" key.
    if _USAGE_KEY not in event or _TOKENS_KEY_END not in event:
        return None
    responses_final = b"response." in event and (
        b"response.completed" in event
        or b"response.incomplete" in event
        or b"response.failed" in event
    )
    obj = _event_object(event)
    if obj is None:
        return None
    if responses_final:
        response = obj.get("response")
        usage = parse_usage(response.get("usage")) if isinstance(response, dict) else None
        return (usage, False) if usage is not None else None
    usage = parse_usage(obj.get("usage"))
    return (usage, not obj.get("choices")) if usage is not None else None


def _event_object(event: bytes) -> dict[str, Any] | None:
    """The JSON object in an SSE event's data, or None (no data, not JSON, not an object)."""
    data = event_data(event)
    if data is None:
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def generated_text(events: list[bytes]) -> str:
    """The text generated so far in forwarded stream events (chat deltas, completion text,
    tool-call arguments, Responses output deltas), for counting when usage never arrived."""
    out: list[str] = []
    for event in b"".join(events).split(b"\n\n"):
        obj = _event_object(event)  # None for [DONE], blank and non-JSON events
        if obj is None:
            continue
        if isinstance(obj.get("delta"), str):  # Responses API *.delta events
            out.append(obj["delta"])
            continue
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict):
                _append_choice_text(choice, out)
    return "".join(out)


def _append_choice_text(choice: dict[str, Any], out: list[str]) -> None:
    """Append a stream chunk's choice's text: completion text, chat content, tool calls."""
    if isinstance(choice.get("text"), str):
        out.append(choice["text"])
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return
    if isinstance(delta.get("content"), str):
        out.append(delta["content"])
    for call in delta.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            out.append(str(function.get("name") or ""))
            out.append(str(function.get("arguments") or ""))


def response_text(obj: dict[str, Any]) -> str:
    """The generated text of a non-streamed response (for estimating when usage is absent)."""
    out: list[str] = []
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                out.append(message["content"])
            if isinstance(choice.get("text"), str):
                out.append(choice["text"])
    for item in obj.get("output") or ():
        if isinstance(item, dict):
            for part in item.get("content") or ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(part["text"])
    return "".join(out)
