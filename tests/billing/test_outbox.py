"""The settlement record: its wire form, the posting row the poster splices, and the ties
between its one Python definition and what SQL and Lua read."""

from __future__ import annotations

import re
import typing
from importlib import resources

import asyncpg
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.metering import outbox
from billing.metering.outbox import STREAM_FIELDS, SettlementRecord
from tests.billing.money import usage_record

_records = st.builds(
    usage_record,
    request_id=st.text(min_size=1, max_size=40),
    account_id=st.integers(min_value=1, max_value=2**63 - 1),
    cost_millicredits=st.integers(min_value=0, max_value=2**62),
    hold_millicredits=st.integers(min_value=0, max_value=2**62),
)

# Python annotation -> the SQL type of the same values.
_SQL_TYPES = {
    "str": "text",
    "str | None": "text",
    "int": "bigint",
    "int | None": "bigint",
}
# The latency is an integer column (int4) in usage_events; token counts are bigint (0005).
_INTEGER_FIELDS = {"upstream_latency_ms"}


@given(_records)
def test_record_round_trips_every_field(record: SettlementRecord) -> None:
    payload = record.to_json()
    assert orjson.loads(payload) == list(record)
    assert SettlementRecord.from_json(payload) == record


@given(_records, st.integers(min_value=0, max_value=2**62))
def test_posting_row_appends_charged_to_the_record(record: SettlementRecord, charged: int) -> None:
    row = outbox.posting_row(record.to_json(), charged_millicredits=charged)
    assert orjson.loads(row) == [*record, charged]


def test_record_payload_is_under_half_the_size_of_a_keyed_object() -> None:
    record = usage_record(request_id="req_" + "0" * 32, account_id=123_456, cost_millicredits=252)
    assert len(record.to_json()) < 0.5 * len(orjson.dumps(record._asdict()))


@pytest.mark.parametrize(
    "payload", ["not json", '"a string"', "[]", '{"request_id": "r"}', '["r", 1, 2]']
)
def test_from_json_refuses_what_is_not_a_record(payload: str) -> None:
    with pytest.raises(ValueError):
        SettlementRecord.from_json(payload)


@pytest.mark.parametrize("payload", ["not json", '{"request_id": "r"}', "[1, 2]", '["r", 1'])
def test_posting_row_refuses_what_is_not_shaped_like_a_record(payload: str) -> None:
    with pytest.raises(ValueError):
        outbox.posting_row(payload, charged_millicredits=1)


async def test_record_fields_match_the_sql_settlement_record_type(pool: asyncpg.Pool) -> None:
    """One record in two languages: the SQL composite type ``settlement_record`` has the
    Python record's fields, in the same order, with the same value types. Reordering,
    renaming or adding a field on either side alone fails here."""
    async with pool.acquire() as conn:
        attributes = await conn.fetch(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod)
                 FROM pg_attribute a
                WHERE a.attrelid = 'settlement_record'::regclass
                  AND a.attnum > 0 AND NOT a.attisdropped
                ORDER BY a.attnum"""
        )
    hints = typing.get_type_hints(SettlementRecord)
    expected = [
        (name, "integer" if name in _INTEGER_FIELDS else _SQL_TYPES[_hint(hints[name])])
        for name in SettlementRecord._fields
    ]
    assert [(r[0], r[1]) for r in attributes] == expected


async def test_sql_reads_every_field_of_a_record_as_python_wrote_it(pool: asyncpg.Pool) -> None:
    """``settlement_record_from_json`` (the one SQL reader of the wire form) gives back each
    field the gateway wrote, under its own name."""
    record = usage_record(request_id="req-tie", account_id=42, cost_millicredits=1_234)
    record = record._replace(api_key_id=7, rate_card_id=3, upstream_latency_ms=None)
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT (settlement_record_from_json($1::jsonb)).*", record.to_json()
        )
    assert row is not None
    assert dict(row) == record._asdict()


def test_settle_script_writes_the_stream_fields_python_reads() -> None:
    """settle.lua's XADD names its fields literally; they must be ``STREAM_FIELDS``, in the
    order record, charged, account."""
    script = resources.files("billing.metering").joinpath("lua", "settle.lua").read_text("utf-8")
    xadds = re.findall(r"'XADD',\s*KEYS\[4\],\s*'\*',\s*(.*)\)", script)
    assert len(xadds) == 1
    written = re.findall(r"'([a-z]+)',\s*([^,]+)", xadds[0])
    assert [name for name, _value in written] == list(STREAM_FIELDS)
    assert [value.strip() for _name, value in written] == ["ARGV[4]", "charged", "ARGV[5]"]


def _hint(annotation: object) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("Optional[int]", "int | None")
