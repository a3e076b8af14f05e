"""CSV exports of the billing API (``?format=csv``): the whole filtered set, streamed from
Postgres in batches, parsed back with the stdlib ``csv`` module."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import aiohttp
import pytest

from billing import ledger
from billing.units import credits_text
from gateway.billing_exports import EXPORT_BATCH_ROWS, LEDGER_CSV_HEADER, USAGE_CSV_HEADER
from tests.gateway.billing_world import (
    BillingClient,
    expected_usage_charge,
    insert_usage,
    key_id,
    post_at,
)

pytestmark = pytest.mark.usefixtures("gw")

DAY1 = datetime(2026, 10, 1, tzinfo=UTC)


def _rows(body: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(body.decode())))


async def test_usage_csv_exports_filtered_set_without_limit(gw) -> None:
    account_id, key = await gw.create_account()
    client = BillingClient(gw, key)
    await insert_usage(
        gw.pool, account_id, await key_id(gw.pool, account_id), count=30, started_at=DAY1
    )
    await insert_usage(gw.pool, account_id, None, count=5, started_at=DAY1, model="gpt-4o")

    async with aiohttp.ClientSession() as http:
        response = await http.get(
            client.root + "/api/billing/usage",
            params={"format": "csv", "model": "gpt-4o-mini", "limit": "1"},
            headers={"Authorization": f"Bearer {key}"},
        )
        body = await response.read()

    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="usage-')
    assert disposition.endswith('.csv"')
    rows = _rows(body)
    assert tuple(rows[0]) == USAGE_CSV_HEADER
    assert len(rows) == 30  # the whole filtered set: limit does not apply to exports
    assert {row["model"] for row in rows} == {"gpt-4o-mini"}
    for row in rows:
        assert row["charged_credits"] == credits_text(int(row["charged_millicredits"]))
        assert Decimal(row["charged_credits"]) * 1000 == int(row["charged_millicredits"])
    assert sum(int(row["charged_millicredits"]) for row in rows) == expected_usage_charge(30)
    assert int(rows[0]["id"]) > int(rows[-1]["id"])


async def test_usage_csv_100k_rows_streamed_in_batches(gw) -> None:
    account_id, key = await gw.create_account()
    client = BillingClient(gw, key)
    count = 100_000
    await insert_usage(gw.pool, account_id, None, count=count, started_at=DAY1)
    other_id, _ = await gw.create_account()
    await insert_usage(gw.pool, other_id, None, count=10, started_at=DAY1)

    http, response = await client.response("/api/billing/usage", format="csv")
    rows = total = chunks = 0
    header: list[str] | None = None
    tail = b""
    try:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(64 * 1024):
            chunks += 1
            *lines, tail = (tail + chunk).split(b"\n")
            for record in csv.reader(line.decode() for line in lines if line.strip()):
                if header is None:
                    header = record
                    continue
                rows += 1
                total += int(record[header.index("charged_millicredits")])
    finally:
        response.release()
        await http.close()

    assert tail.strip() == b""
    assert header == list(USAGE_CSV_HEADER)
    assert rows == count
    assert total == expected_usage_charge(count)
    assert chunks > count // EXPORT_BATCH_ROWS // 10  # it arrived as a stream, not one body


async def test_ledger_csv_exports_with_type_and_date_filters(gw) -> None:
    account_id, key = await gw.create_account()
    client = BillingClient(gw, key)
    for day in range(3):
        await post_at(gw.pool, account_id, "adjustment", 1_234_567, DAY1 + timedelta(days=day))
    await post_at(gw.pool, account_id, "deduction", -1, DAY1 + timedelta(days=2, hours=1))

    status, body = await client.get(
        "/api/billing/ledger", format="csv", type="adjustment", since="2026-10-02"
    )
    _, everything = await client.get("/api/billing/ledger", format="csv")

    assert status == 200
    rows = _rows(body)
    assert tuple(rows[0]) == LEDGER_CSV_HEADER
    assert [row["amount_credits"] for row in rows] == ["1234.567", "1234.567"]
    assert [row["balance_after_millicredits"] for row in rows] == ["3703701", "2469134"]
    assert [row["balance_after_credits"] for row in rows] == ["3703.701", "2469.134"]
    all_rows = _rows(everything)
    assert [row["type"] for row in all_rows] == ["deduction", *["adjustment"] * 3]
    assert all_rows[0]["amount_credits"] == "-0.001"
    assert all_rows[0]["amount_millicredits"] == "-1"


async def test_csv_export_of_empty_set_is_the_header(gw) -> None:
    _, key = await gw.create_account()
    client = BillingClient(gw, key)

    status, body = await client.get("/api/billing/usage", format="csv")

    assert status == 200
    assert body.decode().splitlines() == [",".join(USAGE_CSV_HEADER)]


async def test_csv_text_cells_cannot_start_a_formula(gw) -> None:
    account_id, key = await gw.create_account(1_000)
    client = BillingClient(gw, key)
    async with gw.pool.acquire() as conn:
        await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="adjustment",
            amount_millicredits=5,
            idempotency_key="formula",
            reference='=HYPERLINK("http://evil")',
        )

    _, body = await client.get("/api/billing/ledger", format="csv")

    assert _rows(body)[0]["reference"] == '\'=HYPERLINK("http://evil")'


async def test_csv_export_bad_filter_is_400_before_streaming(gw) -> None:
    _, key = await gw.create_account()
    client = BillingClient(gw, key)

    status, body = await client.get("/api/billing/usage", format="csv", since="nope")

    assert status == 400
    assert body["error"]["param"] == "since"
