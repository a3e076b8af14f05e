"""Reading token usage out of OpenAI responses and stream events, and bounding it.

Chat and completions report ``usage.{prompt_tokens, completion_tokens,
prompt_tokens_details.cached_tokens}``; the Responses API reports ``usage.{input_tokens,
output_tokens, input_tokens_details.cached_tokens}``; embeddings report ``prompt_tokens`` only.

The upstream's answer is untrusted input: nothing here raises on any JSON shape. A usage
report is charged only when every count in it is an integer from 0 to
``MAX_REPORTED_TOKENS`` (``parse_usage``; otherwise it is ``UnusableUsage`` and the gateway
charges its own count), and never above what the request could produce (``usage_bound``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from billing.metering.estimate import Estimate

#: The largest token count a usage report may carry: the usage row's token columns are
#: PostgreSQL ``integer`` (``migrations/0001``), and a count the row cannot hold could not be
#: posted. A larger count makes the report unusable.
MAX_REPORTED_TOKENS: Final = 2**31 - 1

#: A reported prompt is charged at most ``PROMPT_BOUND_FACTOR`` x our own count +
#: ``PROMPT_BOUND_SLACK_TOKENS``: our count (tiktoken, ``billing.metering.tokens``) can fall
#: short of the upstream's (tool definitions rendered its way, images, parts we do not count),
#: but not by half, nor by more than a thousand tokens on a short prompt.
PROMPT_BOUND_FACTOR: Final = 2
PROMPT_BOUND_SLACK_TOKENS: Final = 1_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request; ``prompt_tokens`` includes ``cached_tokens``."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def within(self, bound: Usage) -> bool:
        """Whether neither the prompt nor the completion count is above ``bound``'s."""
        return (
            self.prompt_tokens <= bound.prompt_tokens
            and self.completion_tokens <= bound.completion_tokens
        )

    def clamped_to(self, bound: Usage) -> Usage:
        """These counts, each at most ``bound``'s; the cached part at most the prompt."""
        prompt = min(self.prompt_tokens, bound.prompt_tokens)
        completion = min(self.completion_tokens, bound.completion_tokens)
        return Usage(prompt, completion, min(self.cached_tokens, prompt))


def usage_bound(estimate: Estimate) -> Usage:
    """The most usage a request can be charged for, whatever the upstream reports.

    Prompt: ``PROMPT_BOUND_FACTOR`` x our count + ``PROMPT_BOUND_SLACK_TOKENS``. Completion:
    the request's output cap (its ``max_*tokens``, never above the rate card's) x ``n``, the
    ``Estimate``'s ``max_completion_tokens``, which the hold was placed for.
    """
    return Usage(
        PROMPT_BOUND_FACTOR * estimate.prompt_tokens + PROMPT_BOUND_SLACK_TOKENS,
        estimate.max_completion_tokens,
    )


@dataclass(frozen=True, slots=True)
class UnusableUsage:
    """A usage report that cannot be charged: a count that is not an integer from 0 to
    ``MAX_REPORTED_TOKENS`` (a string, a float, a boolean, null, a negative number).

    Attributes:
        reason: what is wrong, for the log, e.g. ``"'prompt_tokens' is -1000"``.
    """

    reason: str


@dataclass(slots=True)
class UsageStats:
    """Counters for metrics: upstream usage reports charged at ``usage_bound``
    (``usage_source = clamped``) and reports not used at all (``UnusableUsage``, charged at
    our own count)."""

    clamped: int = 0
    unusable: int = 0


class _UnusableCountError(Exception):
    """A count in a usage report is not a usable integer (the message says which)."""


_RESPONSES_KEYS = ("input_tokens", "output_tokens", "input_tokens_details")
_CHAT_KEYS = ("prompt_tokens", "completion_tokens", "prompt_tokens_details")


def parse_usage(usage: Any) -> Usage | UnusableUsage | None:
    """A ``Usage`` from an OpenAI ``usage`` object of any endpoint; None if absent (not an
    object, or no ``input_tokens`` / ``prompt_tokens``); ``UnusableUsage`` if a count is
    not an integer from 0 to ``MAX_REPORTED_TOKENS`` (``bool`` is not an integer here).

    A missing completion count is 0 (embeddings report none); a missing or null details
    object, or cached count, is 0.
    """
    if not isinstance(usage, dict):
        return None
    for keys in (_RESPONSES_KEYS, _CHAT_KEYS):
        if keys[0] in usage:
            try:
                return _read_counts(usage, *keys)
            except _UnusableCountError as exc:
                return UnusableUsage(str(exc))
    return None


def _read_counts(
    usage: dict[str, Any], prompt_key: str, completion_key: str, details_key: str
) -> Usage:
    """Raises: _UnusableCountError."""
    prompt = _count(usage, prompt_key)
    completion = _count(usage, completion_key) if completion_key in usage else 0
    details = usage.get(details_key)
    if details is None:
        return Usage(prompt, completion)
    if not isinstance(details, dict):
        raise _UnusableCountError(f"{details_key!r} is {_describe(details)}")
    cached = 0 if details.get("cached_tokens") is None else _count(details, "cached_tokens")
    return Usage(prompt, completion, cached)


def _count(obj: dict[str, Any], key: str) -> int:
    """``obj[key]`` if it is an integer from 0 to ``MAX_REPORTED_TOKENS``.

    Raises: _UnusableCountError.
    """
    value = obj.get(key)
    if type(value) is int and 0 <= value <= MAX_REPORTED_TOKENS:
        return value
    raise _UnusableCountError(f"{key!r} is {_describe(value)}")


def _describe(value: Any) -> str:
    """A short description of a JSON value for a log line (never the whole of a large one)."""
    if value is None:
        return "null"
    if isinstance(value, int) and not -(2**64) < value < 2**64:
        return "an integer beyond 64 bits"  # (orjson reads those as floats)
    if isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return f"a JSON {'array' if isinstance(value, list) else 'object'}"


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


def usage_event(event: bytes) -> tuple[Usage | UnusableUsage, bool] | None:
    """If this SSE event carries the request's final usage: ``(usage, is_usage_only_chunk)``,
    the usage as ``parse_usage`` reads it (``UnusableUsage`` when a count is not usable).

    ``is_usage_only_chunk`` marks the extra chat/completions chunk (``choices: []``) that
    ``stream_options.include_usage`` adds, which clients that did not ask for it never see.
    Responses API usage comes in ``response.completed`` / ``response.incomplete`` /
    ``response.failed`` events, which are always forwarded. Never raises.
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


def _objects(value: Any) -> list[dict[str, Any]]:
    """The objects in ``value`` if it is an array (anything else holds none)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _strings(out: list[str], *values: Any) -> None:
    """Append those of ``values`` that are strings."""
    out.extend(value for value in values if isinstance(value, str))


def generated_text(events: list[bytes]) -> str:
    """The text generated so far in forwarded stream events (chat deltas, completion text,
    tool-call names and arguments, Responses output deltas), for counting when usage never
    arrived. Never raises: fields of another shape than OpenAI's hold no text."""
    out: list[str] = []
    for event in b"".join(events).split(b"\n\n"):
        obj = _event_object(event)  # None for [DONE], blank and non-JSON events
        if obj is None:
            continue
        delta = obj.get("delta")
        if isinstance(delta, str):  # Responses API *.delta events
            out.append(delta)
            continue
        for choice in _objects(obj.get("choices")):
            _strings(out, choice.get("text"))
            delta = choice.get("delta")
            if isinstance(delta, dict):
                _append_message_text(delta, out)
    return "".join(out)


def _append_message_text(message: dict[str, Any], out: list[str]) -> None:
    """Append a chat message's (or stream delta's) content and tool calls' names and
    arguments."""
    _strings(out, message.get("content"))
    for call in _objects(message.get("tool_calls")):
        function = call.get("function")
        if isinstance(function, dict):
            _strings(out, function.get("name"), function.get("arguments"))


def response_text(obj: Any) -> str:
    """The generated text of a non-streamed response (for estimating when usage is absent or
    unusable): chat messages and their tool calls, completion text, Responses output text.
    Never raises: any JSON value is accepted, and fields of another shape hold no text."""
    if not isinstance(obj, dict):
        return ""
    out: list[str] = []
    for choice in _objects(obj.get("choices")):
        message = choice.get("message")
        if isinstance(message, dict):
            _append_message_text(message, out)
        _strings(out, choice.get("text"))
    for item in _objects(obj.get("output")):
        for part in _objects(item.get("content")):
            _strings(out, part.get("text"))
    return "".join(out)
