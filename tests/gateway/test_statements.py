"""Monthly statements (``billing.statements`` through ``GET /api/billing/statements``): the
totals reconcile with the ledger to the millicredit, month after month, in JSON, CSV and PDF."""

from __future__ import annotations

import csv
import io
import re
import zlib
from datetime import UTC, date, datetime

import pytest

from billing import api_keys, ledger
from billing.purchases.purchase_ledger import (
    DISPUTE_KEY_PREFIX,
    REFUND_KEY_PREFIX,
    share_millicredits,
)
from billing.purchases.purchase_records import apply_checkout_session, apply_dispute, apply_refund
from billing.statements import FIRST_YEAR, LAST_YEAR, month_bounds, monthly_statement, parse_month
from gateway.statement_pdf import statement_pdf
from tests.billing.purchase_world import PROFESSIONAL_MC, World
from tests.gateway.billing_world import (
    BillingClient,
    expected_usage_charge,
    insert_usage,
    post_at,
)

pytestmark = pytest.mark.usefixtures("gw")


def _at(month: int, day: int, hour: int = 12, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=UTC)


async def _two_months(gw) -> tuple[int, BillingClient, dict[str, int]]:
    """An account with September and October 2026 activity (and a little in November)."""
    account_id, key = await gw.create_account()
    pool = gw.pool
    await post_at(pool, account_id, "adjustment", 10_000_000, _at(9, 5))
    await post_at(pool, account_id, "deduction", -1_500, _at(9, 20))
    purchase = await post_at(pool, account_id, "purchase", 9_990_000, _at(9, 30, 23, 59, 59))
    # October: the first instant of the month belongs to it.
    await post_at(pool, account_id, "deduction", -2_001, _at(10, 1, 0))
    await post_at(pool, account_id, "refund", -500_000, _at(10, 10))
    await post_at(pool, account_id, "reversal", -333, _at(10, 11), reverses_entry_id=purchase.id)
    await post_at(pool, account_id, "adjustment", 1, _at(10, 31, 23, 59, 59))
    await post_at(pool, account_id, "adjustment", 7, _at(11, 2))
    await insert_usage(pool, account_id, None, count=1, started_at=_at(9, 20))
    await insert_usage(pool, account_id, None, count=3, started_at=_at(10, 2))
    await insert_usage(
        pool,
        account_id,
        None,
        count=2,
        started_at=_at(10, 3),
        model="gpt-4o",
        base_charge_millicredits=5_000,
    )
    other_id, _ = await gw.create_account(123_456)  # never in this account's statements
    await post_at(pool, other_id, "adjustment", 99, _at(10, 5))
    sept_closing = 10_000_000 - 1_500 + 9_990_000
    return (
        account_id,
        BillingClient(gw, key),
        {
            "sept_closing": sept_closing,
            "oct_closing": sept_closing - 2_001 - 500_000 - 333 + 1,
        },
    )


async def test_statements_reconcile_with_the_ledger_across_months(gw) -> None:
    account_id, client, expected = await _two_months(gw)

    _, sept = await client.get("/api/billing/statements/2026-09")
    status, oct_ = await client.get("/api/billing/statements/2026-10")
    _, nov = await client.get("/api/billing/statements/2026-11")

    assert status == 200
    assert oct_["object"] == "statement"
    assert oct_["month"] == "2026-10"
    assert oct_["periodStart"] == "2026-10-01T00:00:00+00:00"
    assert oct_["periodEnd"] == "2026-11-01T00:00:00+00:00"
    assert sept["openingBalanceMillicredits"] == "0"
    assert sept["purchasesMillicredits"] == "9990000"
    assert sept["deductionsMillicredits"] == "-1500"
    assert sept["adjustmentsMillicredits"] == "10000000"
    assert sept["closingBalanceMillicredits"] == str(expected["sept_closing"])
    assert oct_["openingBalanceMillicredits"] == sept["closingBalanceMillicredits"]
    assert oct_["purchasesMillicredits"] == "0"
    assert oct_["deductionsMillicredits"] == "-2001"
    assert oct_["refundsMillicredits"] == "-500000"
    assert oct_["reversalsMillicredits"] == "-333"
    assert oct_["adjustmentsMillicredits"] == "1"
    assert oct_["closingBalanceMillicredits"] == str(expected["oct_closing"])
    assert nov["openingBalanceMillicredits"] == oct_["closingBalanceMillicredits"]
    for statement in (sept, oct_, nov):
        movements = sum(
            int(statement[f"{name}Millicredits"])
            for name in ("purchases", "deductions", "refunds", "adjustments", "reversals")
        )
        assert int(statement["openingBalanceMillicredits"]) + movements == int(
            statement["closingBalanceMillicredits"]
        )
    # Each closing balance is the ledger's own balance at the month's end...
    for statement in (sept, oct_):
        end = month_bounds(parse_month(statement["month"]))[1]
        balance_at_end = await gw.pool.fetchval(
            "SELECT balance_after_millicredits FROM ledger_entries "
            "WHERE account_id = $1 AND created_at < $2 ORDER BY id DESC LIMIT 1",
            account_id,
            end,
        )
        assert int(statement["closingBalanceMillicredits"]) == balance_at_end
    # ... and the last one's is the posted balance.
    assert int(nov["closingBalanceMillicredits"]) == await gw.balance(account_id)


async def test_statement_usage_totals_per_model(gw) -> None:
    _, client, _ = await _two_months(gw)

    _, oct_ = await client.get("/api/billing/statements/2026-10")

    by_model = {usage["model"]: usage for usage in oct_["usage"]}
    assert list(by_model) == ["gpt-4o", "gpt-4o-mini"]
    mini = by_model["gpt-4o-mini"]
    assert mini["requests"] == 3
    assert mini["inputTokens"] == 101 + 102 + 103
    assert mini["cachedInputTokens"] == 1 + 2 + 3
    assert mini["outputTokens"] == 21 + 22 + 23
    assert mini["chargedMillicredits"] == str(expected_usage_charge(3))
    assert by_model["gpt-4o"]["chargedMillicredits"] == str(expected_usage_charge(2, 5_000))


async def test_statement_csv_has_summary_and_usage_rows(gw) -> None:
    _, client, expected = await _two_months(gw)

    http, response = await client.response("/api/billing/statements/2026-10", format="csv")
    try:
        body = (await response.read()).decode()
        disposition = response.headers["Content-Disposition"]
        content_type = response.headers["Content-Type"]
    finally:
        response.release()
        await http.close()

    assert disposition == 'attachment; filename="statement-2026-10.csv"'
    assert content_type.startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body)))
    summary = {row["item"]: row for row in rows if row["section"] == "summary"}
    assert summary["Closing balance"]["millicredits"] == str(expected["oct_closing"])
    assert summary["Closing balance"]["credits"] == "19486.167"
    assert summary["Refunds"]["credits"] == "-500.000"
    assert summary["Opening balance"]["credits"] == "19988.500"
    usage = [row for row in rows if row["section"] == "usage"]
    assert [row["item"] for row in usage] == ["gpt-4o", "gpt-4o-mini"]
    assert usage[1]["requests"] == "3"


def _pdf_text(pdf: bytes) -> bytes:
    """The page content of a PDF as fpdf2 writes it (Flate streams inflated)."""
    parts = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            parts.append(zlib.decompress(stream))
        except zlib.error:
            parts.append(stream)
    return b"\n".join(parts)


async def test_statement_pdf_contains_the_exact_totals(gw) -> None:
    account_id, client, _ = await _two_months(gw)

    http, response = await client.response("/api/billing/statements/2026-10", format="pdf")
    try:
        pdf = await response.read()
        disposition = response.headers["Content-Disposition"]
        content_type = response.headers["Content-Type"]
    finally:
        response.release()
        await http.close()

    assert pdf.startswith(b"%PDF")
    assert content_type == "application/pdf"
    assert disposition == 'attachment; filename="statement-2026-10.pdf"'
    text = _pdf_text(pdf)
    for amount in (b"19988.500", b"19486.167", b"-500.000", b"-2.001", b"-0.333", b"0.001"):
        assert amount in text
    assert b"Closing balance" in text
    assert b"gpt-4o-mini" in text
    # Uncompressed, the same text is in the bytes as they are.
    statement = await monthly_statement(gw.pool, account_id, date(2026, 10, 1))
    plain = statement_pdf(statement, compress=False)
    assert plain.startswith(b"%PDF")
    assert b"19486.167" in plain


async def test_statement_of_a_month_without_activity(gw) -> None:
    _, key = await gw.create_account(2_500)
    client = BillingClient(gw, key)

    _, empty = await client.get("/api/billing/statements/2001-01")
    status, pdf = await client.get("/api/billing/statements/2001-01", format="pdf")

    assert empty["openingBalanceMillicredits"] == "0"
    assert empty["closingBalanceMillicredits"] == "0"
    assert empty["usage"] == []
    assert status == 200
    assert b"No usage this month." in _pdf_text(pdf)


@pytest.mark.parametrize(
    ("month", "query", "param"),
    [
        ("2026-13", {}, "month"),
        ("2026-1", {}, "month"),
        ("26-10", {}, "month"),
        ("1899-12", {}, "month"),
        ("9999-12", {}, "month"),
        ("9999-12", {"format": "csv"}, "month"),
        ("9999-12", {"format": "pdf"}, "month"),
        ("9001-01", {}, "month"),
        ("２０２６-10", {}, "month"),
        ("2026-10", {"format": "docx"}, "format"),
    ],
)
async def test_statement_bad_month_or_format_is_400(gw, month, query, param) -> None:
    _, key = await gw.create_account()

    status, body = await BillingClient(gw, key).get(f"/api/billing/statements/{month}", **query)

    assert status == 400
    assert body["error"]["param"] == param


def test_month_bounds_wrap_the_year() -> None:
    assert month_bounds(date(2026, 12, 1)) == (_at(12, 1, 0), datetime(2027, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="YYYY-MM"):
        parse_month("2026-00")


def test_parse_month_takes_the_documented_range() -> None:
    assert parse_month(f"{FIRST_YEAR}-01") == date(FIRST_YEAR, 1, 1)
    assert month_bounds(parse_month(f"{LAST_YEAR}-12"))[1] == datetime(
        LAST_YEAR + 1, 1, 1, tzinfo=UTC
    )
    for text in (f"{LAST_YEAR + 1}-01", "9999-12", f"{FIRST_YEAR - 1}-12", "２０２６-10"):
        with pytest.raises(ValueError, match="YYYY-MM"):
            parse_month(text)


async def _post(gw, account_id: int, entry_type: str, amount: int, key: str, **kw) -> int:
    async with gw.pool.acquire() as conn:
        posted = await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type=entry_type,
            amount_millicredits=amount,
            idempotency_key=key,
            **kw,
        )
    return posted.entry.id


async def test_statement_shows_refund_and_dispute_reversals_as_refunds_and_disputes(gw) -> None:
    # Customer refunds and disputes are posted as reversals of the purchase entry, keyed by
    # billing.purchases.purchase_ledger's prefixes; the statement sorts them by those keys.
    account_id, key = await gw.create_account()
    grant = await _post(gw, account_id, "purchase", 9_990_000, "purchase:cs_stmt")
    await _post(gw, account_id, "deduction", -1_000, "d:stmt")
    await _post(
        gw, account_id, "reversal", -999_000, f"{REFUND_KEY_PREFIX}re_1", reverses_entry_id=grant
    )
    failed = await _post(
        gw, account_id, "reversal", -500_000, f"{REFUND_KEY_PREFIX}re_2", reverses_entry_id=grant
    )
    await _post(
        gw,
        account_id,
        "reversal",
        500_000,
        f"{REFUND_KEY_PREFIX}re_2:reinstated",
        reverses_entry_id=failed,
    )
    await _post(gw, account_id, "refund", -7, "admin-refund:1")
    opened = await _post(
        gw,
        account_id,
        "reversal",
        -2_000_000,
        f"{DISPUTE_KEY_PREFIX}dp_1:opened",
        reverses_entry_id=grant,
    )
    await _post(
        gw,
        account_id,
        "reversal",
        1_000,
        f"{DISPUTE_KEY_PREFIX}dp_0:won",
        reverses_entry_id=opened,
    )
    await _post(gw, account_id, "reversal", -33, "correction:1", reverses_entry_id=grant)
    await _post(gw, account_id, "adjustment", -11, "shortfall:refund:re_1")
    client = BillingClient(gw, key)
    month = datetime.now(UTC).strftime("%Y-%m")

    _, statement = await client.get(f"/api/billing/statements/{month}")
    _, body = await client.get(f"/api/billing/statements/{month}", format="csv")

    assert statement["purchasesMillicredits"] == "9990000"
    assert statement["deductionsMillicredits"] == "-1000"
    assert statement["refundsMillicredits"] == str(-999_000 - 500_000 + 500_000 - 7)
    assert statement["disputesMillicredits"] == str(-2_000_000 + 1_000)
    assert statement["reversalsMillicredits"] == "-33"
    assert statement["adjustmentsMillicredits"] == "-11"
    movements = sum(
        int(statement[f"{name}Millicredits"])
        for name in ("purchases", "deductions", "refunds", "disputes", "adjustments", "reversals")
    )
    assert int(statement["openingBalanceMillicredits"]) + movements == int(
        statement["closingBalanceMillicredits"]
    )
    assert int(statement["closingBalanceMillicredits"]) == await gw.balance(account_id)
    summary = {
        row["item"]: row["millicredits"]
        for row in csv.DictReader(io.StringIO(body.decode()))
        if row["section"] == "summary"
    }
    assert summary["Refunds"] == statement["refundsMillicredits"]
    assert summary["Disputes"] == statement["disputesMillicredits"]
    assert summary["Reversals"] == "-33"


async def test_statement_of_a_stripe_refund_and_dispute_through_the_purchase_records(gw) -> None:
    # The real path: a paid purchase, then Stripe's refund and dispute objects applied as
    # the webhook applies them (billing.purchases.purchase_records).
    world = World(gw.pool)
    account_id = await world.account()
    _, session_id = await world.checkout(account_id, "professional")
    await world.apply(apply_checkout_session, world.stripe.pay(session_id))
    await world.apply(apply_refund, world.stripe.refund(session_id, 1000))
    await world.apply(apply_dispute, world.stripe.dispute(session_id, amount=500))
    async with gw.pool.acquire() as conn:
        api_key, _ = await api_keys.create_api_key(conn, account_id, name="statements")
    month = datetime.now(UTC).strftime("%Y-%m")

    _, statement = await BillingClient(gw, api_key).get(f"/api/billing/statements/{month}")

    refund_share = share_millicredits(PROFESSIONAL_MC, 1000, 4999)
    dispute_share = share_millicredits(PROFESSIONAL_MC, 500, 4999)
    assert statement["purchasesMillicredits"] == str(PROFESSIONAL_MC)
    assert statement["refundsMillicredits"] == str(-refund_share)
    assert statement["disputesMillicredits"] == str(-dispute_share)
    assert statement["reversalsMillicredits"] == "0"
    assert statement["closingBalanceMillicredits"] == str(
        PROFESSIONAL_MC - refund_share - dispute_share
    )
