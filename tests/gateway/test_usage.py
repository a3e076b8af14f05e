"""Reading upstream usage and text: any JSON shape is read without raising, only usable counts
are charged, and the bound a request's usage is charged at most."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.metering.estimate import Estimate
from gateway.usage import (
    MAX_REPORTED_TOKENS,
    UnusableUsage,
    Usage,
    generated_text,
    parse_usage,
    response_text,
    usage_bound,
    usage_event,
)

# The names OpenAI's shapes use, so arbitrary values land where the parsers look.
_NAMES = [
    "usage",
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "input_tokens",
    "output_tokens",
    "input_tokens_details",
    "cached_tokens",
    "choices",
    "delta",
    "message",
    "text",
    "content",
    "tool_calls",
    "function",
    "name",
    "arguments",
    "output",
    "response",
    "type",
]
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: beyond 2**64 too (orjson reads those as floats)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(_NAMES) | st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=30,
)


def _event(value: Any, name: str | None = None) -> bytes:
    # The standard library writes any integer; orjson refuses those above 64 bits.
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + json.dumps(value).encode() + b"\n\n"


@given(JSON)
def test_parse_usage_any_json_never_raises_and_returns_only_usable_counts(value: Any):
    usage = parse_usage(value)
    assert usage is None or isinstance(usage, Usage | UnusableUsage)
    if isinstance(usage, Usage):
        for count in (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens):
            assert type(count) is int
            assert 0 <= count <= MAX_REPORTED_TOKENS


@given(JSON, st.sampled_from([None, "response.completed", "response.failed"]))
def test_usage_event_any_json_never_raises(value: Any, name: str | None):
    for data in ({"usage": value}, {"response": {"usage": value}}, value):
        found = usage_event(_event(data, name))
        assert found is None or isinstance(found[0], Usage | UnusableUsage)


@given(st.lists(JSON, max_size=5))
def test_generated_text_any_json_events_never_raises(values: list[Any]):
    events = [_event(value) for value in values] + [b"data: [DONE]\n\n", b"data: {not json\n\n"]
    assert isinstance(generated_text(events), str)


@given(JSON)
def test_response_text_any_json_never_raises(value: Any):
    assert isinstance(response_text(value), str)


@pytest.mark.parametrize(
    "shape",
    [
        {"choices": 5},
        {"choices": "text"},
        {"choices": {"message": {"content": "x"}}},
        {"choices": [{"message": {"content": 5, "tool_calls": 7}}]},
        {"output": 3},
        {"output": [{"content": {"text": "x"}}]},
    ],
)
def test_response_text_wrong_shapes_hold_no_text(shape: dict[str, Any]):
    assert response_text(shape) == ""


def test_response_text_reads_chat_text_and_tool_calls_and_responses_output():
    chat = {
        "choices": [
            {
                "message": {
                    "content": "Hi",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                }
            }
        ]
    }
    assert response_text(chat) == "Hif{}"
    assert response_text({"output": [{"content": [{"text": "a"}, {"text": "b"}]}]}) == "ab"


def test_generated_text_tool_calls_not_a_list_keeps_the_rest():
    events = [
        _event({"choices": [{"delta": {"content": "Hi"}}]}),
        _event({"choices": [{"delta": {"tool_calls": 5}}]}),
        _event({"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "{}"}}]}}]}),
    ]
    assert generated_text(events) == "Hi{}"


@pytest.mark.parametrize(
    "count", [-1000, "1000", 1000.0, True, None, [1], MAX_REPORTED_TOKENS + 1, 2**64]
)
@pytest.mark.parametrize("field", ["prompt_tokens", "completion_tokens"])
def test_parse_usage_count_not_a_usable_integer_is_unusable(count: Any, field: str):
    usage = {"prompt_tokens": 10, "completion_tokens": 5, field: count}
    parsed = parse_usage(usage)
    assert isinstance(parsed, UnusableUsage)
    assert field in parsed.reason


def test_parse_usage_cached_count_or_details_of_wrong_type_is_unusable():
    base = {"input_tokens": 10, "output_tokens": 5}
    assert isinstance(
        parse_usage({**base, "input_tokens_details": {"cached_tokens": "3"}}), UnusableUsage
    )
    assert isinstance(parse_usage({**base, "input_tokens_details": [3]}), UnusableUsage)


def test_parse_usage_absent_parts_are_zero():
    assert parse_usage({"prompt_tokens": 7, "total_tokens": 7}) == Usage(7, 0)  # embeddings
    assert parse_usage(
        {"prompt_tokens": 7, "completion_tokens": 2, "prompt_tokens_details": None}
    ) == Usage(7, 2)
    assert parse_usage(
        {"input_tokens": 7, "output_tokens": 2, "input_tokens_details": {"cached_tokens": None}}
    ) == Usage(7, 2)
    assert parse_usage({"prompt_tokens": 0, "completion_tokens": 0}) == Usage(0, 0)


def test_parse_usage_without_a_prompt_count_is_absent():
    assert parse_usage({}) is None
    assert parse_usage({"completion_tokens": 5}) is None
    assert parse_usage([{"prompt_tokens": 5}]) is None


def test_usage_event_above_64_bits_is_unusable():
    usage = b'{"prompt_tokens":18446744073709551616,"completion_tokens":1}'
    event = b'data: {"choices":[],"usage":' + usage + b"}\n\n"
    found = usage_event(event)
    assert found is not None
    assert isinstance(found[0], UnusableUsage)
    assert found[1] is True  # still the usage-only chunk


def test_usage_bound_is_twice_our_prompt_plus_1000_and_the_output_cap():
    bound = usage_bound(Estimate(prompt_tokens=300, max_completion_tokens=40))
    assert bound == Usage(1_600, 40)
    assert Usage(1_600, 40).within(bound)
    assert not Usage(1_601, 40).within(bound)
    assert not Usage(10, 41).within(bound)
    assert Usage(2_000_000_000, 2_000_000_000, 1_700).clamped_to(bound) == Usage(1_600, 40, 1_600)
    assert Usage(5, 50, 3).clamped_to(bound) == Usage(5, 40, 3)
