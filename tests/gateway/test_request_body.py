"""The body the gateway forwards for a stream whose client did not ask for usage."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy import _asking_for_usage

ASKED = {"include_usage": True}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(
    extra=st.dictionaries(st.text().filter(lambda k: k != "stream_options"), json_values),
    indent=st.sampled_from([None, orjson.OPT_INDENT_2]),
    leading=st.sampled_from([b"", b" ", b"\n\t "]),
)
def test_body_without_stream_options_gets_the_member_spliced_in(extra, indent, leading):
    body = {"model": "gpt-4o-mini", **extra, "stream": True}
    raw = leading + (orjson.dumps(body, option=indent) if indent else orjson.dumps(body))
    forwarded = _asking_for_usage(raw, dict(body), {})
    assert orjson.loads(forwarded) == {**body, "stream_options": ASKED}
    # Spliced, not re-encoded: the client's bytes are all still there, in order.
    assert forwarded.replace(b'"stream_options":{"include_usage":true},', b"", 1) == raw


def test_body_with_stream_options_keeps_the_clients_options():
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": False, "x": 1}}
    forwarded = _asking_for_usage(orjson.dumps(body), body, body["stream_options"])
    assert orjson.loads(forwarded)["stream_options"] == {"include_usage": True, "x": 1}
