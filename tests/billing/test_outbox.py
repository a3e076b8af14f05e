"""The outbox payload formats: what the gateway writes, what the writer reads and splices."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.metering import outbox
from tests.billing.money import usage_record

_records = st.builds(
    usage_record,
    request_id=st.text(min_size=1, max_size=40),
    account_id=st.integers(min_value=1, max_value=2**63 - 1),
    cost_millicredits=st.integers(min_value=0, max_value=2**62),
    hold_millicredits=st.integers(min_value=0, max_value=2**62),
)


@given(_records)
def test_format_2_round_trips_every_field(record):
    payload = outbox.encode(record)
    assert payload.startswith("[2,")
    assert outbox.decode(payload) == record


@given(_records, st.integers(min_value=0, max_value=2**62), st.integers(0, 10_000))
def test_posting_row_appends_charged_and_seq_to_either_format(record, charged, seq):
    expected = [outbox.FORMAT, *(record[name] for name in outbox.FIELDS), charged, seq]
    for payload in (outbox.encode(record), orjson.dumps(record).decode()):
        assert orjson.loads(outbox.posting_row(payload, charged=charged, seq=seq)) == expected


def test_format_2_is_under_half_the_size_of_format_1():
    record = usage_record(request_id="req_" + "0" * 32, account_id=123_456, cost_millicredits=252)
    assert len(outbox.encode(record)) < 0.5 * len(orjson.dumps(record))


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        '"a string"',
        "[]",
        "[3, 1, 2]",  # a format this release does not know
        '["not a settlement"]',
        "[2,1,2,3]",  # format 2 with fields missing
    ],
)
def test_unknown_or_broken_payloads_raise_value_error(payload):
    with pytest.raises(ValueError):
        outbox.decode(payload)
    if not payload.startswith("[2,"):  # format 2 is spliced as text, unread
        with pytest.raises(ValueError):
            outbox.posting_row(payload, charged=1, seq=0)


def test_format_1_payload_missing_a_field_raises_key_error():
    record = usage_record(request_id="r", account_id=1, cost_millicredits=1)
    del record["model"]
    with pytest.raises(KeyError):
        outbox.decode(orjson.dumps(record).decode())
