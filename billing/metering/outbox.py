"""The settlement record the gateway appends to the Redis outbox, and the outbox entry's form.

Each settled request becomes one entry of its account's shard's outbox stream
(``billing.metering.redis_keys.outbox_key``) with three fields
(``STREAM_FIELDS``, written by ``billing/metering/lua/settle.lua``):

    p  the request's ``SettlementRecord`` as a compact JSON array (``SettlementRecord.to_json``)
    c  what the settle script charged, in millicredits
    a  the account id

The settlement poster (``billing.metering.posting``) splices each payload unread into a
posting row, the record with ``charged_millicredits`` appended (``posting_row``), and posts
the batch to the SQL function ``post_settlements``, which reads each record through the one
function ``settlement_record_from_json`` into the composite type ``settlement_record``. That type
has this record's fields in this order (``migrations/0003_create_settlement_record.sql``;
``tests/billing/test_outbox.py`` compares them through ``pg_attribute``).
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

import orjson


class SettlementRecord(NamedTuple):
    """One settled request's usage, as the gateway writes it to the outbox.

    Rates are millicredits per 1,000 tokens from the rate card applied; amounts are
    millicredits; times are Unix milliseconds.

    Attributes:
        prompt_tokens, cached_tokens, completion_tokens: the usage as the upstream reported
            it (as counted by us when ``usage_source`` is ``"estimated"``);
            ``cached_tokens`` is never more than ``prompt_tokens``.
        rounding_mode: ``"exact"`` or ``"ceil"`` (``billing.metering.pricing.RoundingMode``).
        cost_millicredits: the usage at the rate card, before any cap; for ``"clamped"``,
            the charge of the counts bounded by ``gateway.usage.usage_bound``, not of the
            token fields (nothing downstream recomputes it from them).
        hold_millicredits: the hold placed for the request (0 when charging is off).
        usage_source: ``"upstream"`` (reported), ``"clamped"`` (reported above what the
            request could produce, charged at the bound) or ``"estimated"`` (counted by us:
            no usable report).
        status: ``completed``, ``client_disconnected``, ``upstream_error`` or ``uncharged``.
        upstream_latency_ms: from sending the request upstream to the end of its response.
    """

    request_id: str
    account_id: int
    api_key_id: int | None
    model: str
    endpoint: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    rate_card_id: int | None
    input_millicredits_per_1k_tokens: int
    cached_input_millicredits_per_1k_tokens: int
    output_millicredits_per_1k_tokens: int
    rounding_mode: str
    cost_millicredits: int
    hold_millicredits: int
    usage_source: str
    status: str
    started_at_ms: int
    finished_at_ms: int
    upstream_latency_ms: int | None

    def to_json(self) -> str:
        """The outbox payload: a JSON array of the fields in order (no names: fewer bytes
        than an object, and faster for Postgres to parse)."""
        return orjson.dumps(tuple(self)).decode()

    @classmethod
    def from_json(cls, payload: str | bytes) -> SettlementRecord:
        """Read a payload written by ``to_json`` (tools and tests; the poster never does).

        Raises:
            ValueError: not a JSON array of ``len(SettlementRecord._fields)`` values
                (``orjson.JSONDecodeError`` is a ``ValueError``).
        """
        value = orjson.loads(payload)
        if not isinstance(value, list) or len(value) != len(cls._fields):
            raise ValueError(f"not a settlement record: {str(payload)[:60]!r}")
        return cls(*value)


class StreamFields(NamedTuple):
    """The outbox stream entry's field names (short: Redis stores them with every entry)."""

    record: str
    charged_millicredits: str
    account_id: str


#: The names ``settle.lua`` writes and the poster reads (a test reads them in settle.lua).
STREAM_FIELDS: Final = StreamFields(record="p", charged_millicredits="c", account_id="a")


# A payload's head: the request id (a JSON string, escapes included) and the account id, the
# record's first two fields; read without parsing the rest of the record.
_PAYLOAD_HEAD = re.compile(r'\["[^"\\]*(?:\\.[^"\\]*)*",(\d+),')


def posting_row(payload: str, *, charged_millicredits: int, account_id: int | None = None) -> str:
    """The JSON row ``post_settlements`` reads: the record's array with
    ``charged_millicredits`` appended (SQL reads it from the end, and the record through
    ``settlement_record_from_json``). A batch's rows are applied in their order.

    The payload is spliced as text, not read: decoding and re-encoding every settlement
    would be most of the poster's work. Only its head is checked (an array whose first value,
    the request id, is a string, and whose second, the account id, is ``account_id`` when
    given: the outbox entry's account, whose ``pending`` holds the charge); Postgres refuses a
    payload of that shape with wrong values, and the poster isolates it from its batch and
    dead-letters it (``billing.metering.posting``).

    Raises:
        ValueError: the payload does not start with a request id and an account id and end
            with ``]``, or its account id is not ``account_id``.
    """
    head = _PAYLOAD_HEAD.match(payload)
    if head is None or not payload.endswith("]"):
        raise ValueError(f"not a settlement record payload: {payload[:60]!r}")
    if account_id is not None and int(head[1]) != account_id:
        raise ValueError(f"the entry's account {account_id} is not its record's account {head[1]}")
    return f"{payload[:-1]},{charged_millicredits}]"
