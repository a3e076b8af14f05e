"""The framer that cuts upstream chunks into whole SSE events for the stream relay."""

from __future__ import annotations

import itertools

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.sse_framing import DONE_TAIL, SseFramer

CONTENT = b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
NAMED = b'event: response.output_text.delta\ndata: {"delta":"x"}\n\n'
COMMENT = b": keep-alive\n\n"
BLANK = b"\n\n"
DONE = b"data: [DONE]\n\n"
EVENTS = [CONTENT, USAGE, NAMED, COMMENT, BLANK, DONE]
# What a stream can end with when the upstream stops mid-event.
PARTIALS = [b"", b"d", b"data: {", b"data: [DONE]", b"data: [DONE]\n", b"event: x\n", b"  "]

streams = st.builds(
    lambda events, partial: b"".join(events) + partial,
    st.lists(st.sampled_from(EVENTS), max_size=12),
    st.sampled_from(PARTIALS),
)


def _chunks(stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` cut at ``cuts`` (positions, any order, repeats allowed: empty chunks)."""
    points = [0, *sorted(min(cut, len(stream)) for cut in cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


cut_lists = st.lists(st.integers(min_value=0, max_value=2_000), max_size=20)


@given(streams, cut_lists)
# A run of blank lines cut inside: "x\n\n\n" is whole, the last "\n" waits (found by Hypothesis).
@example(CONTENT + BLANK, [len(CONTENT) + 1])
def test_any_split_yields_every_whole_event_and_keeps_the_partial_tail(stream, cuts):
    framer = SseFramer()
    out = [framer.feed(chunk) for chunk in _chunks(stream, cuts)]
    sent = b"".join(out)
    last_end = stream.rfind(b"\n\n")
    whole = stream[: last_end + 2] if last_end >= 0 else b""
    assert sent + framer.tail == stream  # the same bytes, in order, whatever the split
    assert all(piece == b"" or piece.endswith(b"\n\n") for piece in out)
    assert b"\n\n" not in framer.tail  # the partial event waits, no whole one
    # Every whole event went out; at most one "\n" of a closing run of blank lines waits
    # (where the split cut the run: a blank line alone is no event in SSE).
    assert len(sent) >= len(whole) - 1
    assert framer.tail.strip(b"\n") == stream[len(whole) :].strip(b"\n")


@given(streams, cut_lists)
def test_each_piece_ends_on_an_event_boundary_and_the_rest_waits_in_the_tail(stream, cuts):
    framer = SseFramer()
    sent = arrived = 0
    for chunk in _chunks(stream, cuts):
        arrived += len(chunk)
        sent += len(framer.feed(chunk))
        assert sent == 0 or stream[:sent].endswith(b"\n\n")
        assert framer.tail == stream[sent:arrived]
        assert b"\n\n" not in framer.tail  # no whole event is held back


@given(streams, cut_lists)
def test_done_is_final_exactly_when_what_arrived_ends_with_it(stream, cuts):
    framer = SseFramer()
    arrived = b""
    for chunk in _chunks(stream, cuts):
        arrived += chunk
        piece = framer.feed(chunk)
        # An empty chunk completes nothing: the [DONE] before it was in an earlier piece.
        assert framer.is_final(piece) == (bool(piece) and arrived.endswith(DONE_TAIL))


@given(streams, cut_lists, st.lists(st.binary(max_size=40), max_size=5))
def test_after_the_end_every_chunk_is_dropped(stream, cuts, later):
    framer = SseFramer()
    for chunk in _chunks(stream, cuts):
        framer.feed(chunk)
    framer.end()
    assert [framer.feed(chunk) for chunk in [*later, DONE, CONTENT]] == [b""] * (len(later) + 2)
    assert framer.ended


def test_close_completes_a_partial_last_event():
    framer = SseFramer()
    assert framer.feed(CONTENT + b'data: {"x":1}') == CONTENT
    assert framer.close() == b'data: {"x":1}\n\n'
    assert framer.tail == b""


def test_close_drops_a_tail_of_only_whitespace():
    framer = SseFramer()
    assert framer.feed(CONTENT + b" \n") == CONTENT
    assert framer.close() == b""


def test_done_with_a_partial_event_behind_it_is_not_final():
    framer = SseFramer()
    piece = framer.feed(DONE + b"data: {")
    assert piece == DONE
    assert not framer.is_final(piece)


def test_a_chunk_without_a_blank_line_waits_whole():
    framer = SseFramer()
    assert framer.feed(b"data: {") == b""
    assert framer.feed(b'"a":1}\n') == b""
    assert framer.feed(b"\n" + DONE) == b'data: {"a":1}\n\n' + DONE
