"""The stream scanner that decides which SSE events the gateway must parse."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.usage import tail_to_inspect

CONTENT = b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
CONTENT_SPACED = b'data: {"choices": [{"delta": {"content": "max_tokens"}}], "usage": null}\n\n'
USAGE = b'data: {"choices":[],"usage" : {"prompt_tokens":3,"completion_tokens":2}}\n\n'
RESPONSES_DONE = b'event: response.completed\ndata: {"response":{"usage":{"input_tokens":1}}}\n\n'
DONE = b"data: [DONE]\n\n"
BLANK = b"\n\n"
# Looked at: usage objects and [DONE], and blank events between them.
_SPECIAL = {USAGE, RESPONSES_DONE, DONE, BLANK}


def test_plain_chunk_with_null_usage_is_not_inspected():
    assert tail_to_inspect(CONTENT) == len(CONTENT)


def test_usage_and_done_at_the_end_of_a_whole_answer_are_inspected():
    chunk = CONTENT * 20 + USAGE + DONE
    assert tail_to_inspect(chunk) == len(CONTENT) * 20


def test_done_alone_is_inspected():
    assert tail_to_inspect(DONE) == 0


def test_usage_object_without_token_counts_is_not_inspected():
    assert tail_to_inspect(b'data: {"usage":{}}\n\n') == len(b'data: {"usage":{}}\n\n')


def test_usage_as_a_string_value_is_not_a_usage_object():
    event = b'data: {"type":"usage","x":{"input_tokens":1}}\n\n'
    assert tail_to_inspect(event) == len(event)


def test_trailing_blank_lines_do_not_hide_done():
    chunk = CONTENT + DONE + BLANK + BLANK
    assert tail_to_inspect(chunk) == len(CONTENT)


@given(
    st.lists(
        st.sampled_from([CONTENT, CONTENT_SPACED, USAGE, RESPONSES_DONE, DONE, BLANK]),
        min_size=1,
        max_size=30,
    )
)
def test_the_trailing_run_of_usage_done_and_blank_events_is_inspected(events: list[bytes]):
    expected = len(b"".join(events))
    for event in reversed(events):
        if event not in _SPECIAL:
            break
        expected -= len(event)
    assert tail_to_inspect(b"".join(events)) == expected
