"""The stream scanner that decides which SSE events the gateway must parse."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy import _first_to_inspect

# The definition the scanner implements, as a regular expression (slower, so not used).
# A chunk that names no "*_tokens" key holds no usage parse_usage could accept: only [DONE].
_REFERENCE = re.compile(rb'"usage"[\s:]*\{|data: \[DONE\]')
_DONE_ONLY = re.compile(rb"data: \[DONE\]")

_PIECES = st.sampled_from(
    [
        *(b'"usage"', b":", b" ", b"\n", b"{", b"null", b"data: ", b"[DONE]", b'"x"', b",", b"}"),
        b'"prompt_tokens"',
    ]
)


def _reference(data: bytes) -> int:
    match = (_REFERENCE if b'_tokens"' in data else _DONE_ONLY).search(data)
    return match.start() if match else -1


def test_plain_chunk_with_null_usage_is_not_inspected():
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
    assert _first_to_inspect(chunk) == -1


def test_usage_object_is_found_at_its_key():
    head = b'data: {"choices":[],"usage":null}\n\n'
    chunk = head + b'data: {"choices":[],"usage" : {"prompt_tokens":3}}\n\n'
    assert _first_to_inspect(chunk) == chunk.index(b'"usage" : {')


def test_usage_object_without_token_counts_is_not_inspected():
    assert _first_to_inspect(b'data: {"usage":{}}\n\n') == -1


def test_done_is_found_when_no_usage_comes_first():
    chunk = b'data: {"usage":null}\n\ndata: [DONE]\n\n'
    assert _first_to_inspect(chunk) == chunk.index(b"data: [DONE]")


def test_usage_as_a_string_value_is_not_a_usage_object():
    assert _first_to_inspect(b'data: {"type":"usage","x":{"input_tokens":1}}\n\n') == -1


@given(st.lists(_PIECES, max_size=30).map(b"".join))
def test_scanner_agrees_with_the_regular_expression(data: bytes):
    assert _first_to_inspect(data) == _reference(data)
