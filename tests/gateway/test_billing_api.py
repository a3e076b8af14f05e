"""The user billing API (``gateway.billing_api``): ``/me``, usage and ledger lists with their
filters and pages, single rows, the estimator; every answer scoped to the caller."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from billing import ledger
from billing.metering.pricing import charge_millicredits
from gateway import appkeys as gateway_keys
from tests.e2e.test_checkout_flow import (  # the shop (stripe_stub is in tests/conftest.py)
    Shop,
    shop,  # noqa: F401 (a fixture)
)
from tests.gateway.billing_world import BillingClient, insert_usage, key_id, post_at

pytestmark = pytest.mark.usefixtures("gw")

DAY1 = datetime(2026, 10, 1, tzinfo=UTC)


async def _client(gw, credits_millicredits: int = 0) -> tuple[int, BillingClient]:
    account_id, key = await gw.create_account(credits_millicredits)
    return account_id, BillingClient(gw, key)


async def test_me_shows_balance_held_rates_and_recent_rows(gw) -> None:
    account_id, client = await _client(gw, 750_000)
    await insert_usage(
        gw.pool, account_id, await key_id(gw.pool, account_id), count=7, started_at=DAY1
    )
    await gw.holds.reserve(account_id, 50_000, request_id="req-held")

    status, me = await client.get("/api/billing/me")

    assert status == 200
    assert me["object"] == "billing_account"
    assert me["accountId"] == str(account_id)
    assert me["balanceMillicredits"] == "750000"
    assert me["balanceCredits"] == 750.0
    assert me["balanceUsd"] == 0.75
    assert me["heldMillicredits"] == "50000"
    assert me["availableMillicredits"] == "700000"
    assert me["shortfallMillicredits"] == "0"
    assert me["lowBalanceThresholdCredits"] == 500
    assert me["lowBalance"] is False
    assert me["chargingPaused"] is False
    assert me["purchasesEnabled"] is False  # no Stripe configured in this gateway
    assert [p["code"] for p in me["packages"]] == ["starter", "professional", "enterprise"]
    mini = next(rate for rate in me["activeRates"] if rate["model"] == "gpt-4o-mini")
    assert mini["inputCreditsPer1k"] == "2.400"
    assert mini["cachedInputCreditsPer1k"] == "1.200"
    assert mini["outputCreditsPer1k"] == "9.600"
    assert mini["displayName"] in ("gpt-4o-mini", f"{mini['label']} (gpt-4o-mini)")
    assert len(me["recentLedger"]) == 1
    assert me["recentLedger"][0]["amountMillicredits"] == "750000"
    assert len(me["recentUsage"]) == 5
    assert me["recentUsage"][0]["id"] > me["recentUsage"][1]["id"]


async def test_me_low_balance_under_threshold(gw) -> None:
    _, client = await _client(gw, 499_999)

    _, me = await client.get("/api/billing/me")

    assert me["lowBalance"] is True


async def test_billing_api_without_key_is_401(gw) -> None:
    client = BillingClient(gw, "sk-nope")
    for path in (
        "/api/billing/me",
        "/api/billing/usage",
        "/api/billing/ledger",
        "/api/billing/statements/2026-10",
    ):
        status, body = await client.get(path)
        assert status == 401, path
        assert body["error"]["code"] == "invalid_api_key"
    status, _ = await client.post("/api/billing/estimate", {"model": "gpt-4o", "inputTokens": 1})
    assert status == 401


async def test_usage_pages_walk_every_row_once_with_limit_1(gw) -> None:
    account_id, client = await _client(gw)
    await insert_usage(gw.pool, account_id, None, count=3, started_at=DAY1)

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(3):
        params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        status, page = await client.get("/api/billing/usage", **params)
        assert status == 200
        assert page["object"] == "list"
        assert len(page["data"]) == 1
        seen.append(page["data"][0]["id"])
        cursor = page["nextCursor"]
    assert cursor is None  # the last page says so
    assert len(set(seen)) == 3
    assert [int(i) for i in seen] == sorted((int(i) for i in seen), reverse=True)


async def test_usage_row_shape(gw) -> None:
    account_id, client = await _client(gw)
    key = await key_id(gw.pool, account_id)
    await insert_usage(gw.pool, account_id, key, count=1, started_at=DAY1, usage_source="estimated")
    prefix = await gw.pool.fetchval("SELECT key_prefix FROM api_keys WHERE id = $1", key)

    _, page = await client.get("/api/billing/usage")

    (row,) = page["data"]
    assert row == {
        "object": "usage_event",
        "id": row["id"],
        "date": (DAY1 + timedelta(seconds=1)).isoformat(),
        "model": "gpt-4o-mini",
        "inputTokens": 101,
        "cachedInputTokens": 1,
        "outputTokens": 21,
        "chargedMillicredits": "1001",
        "chargedCredits": 1.001,
        "chargedUsd": 0.0,
        "requestId": row["requestId"],
        "keyPrefix": prefix,
        "usageSource": "estimated",
    }
    assert page["nextCursor"] is None


async def test_usage_filters_model_key_and_date_range(gw) -> None:
    account_id, client = await _client(gw)
    key = await key_id(gw.pool, account_id)
    await insert_usage(gw.pool, account_id, key, count=4, started_at=DAY1)
    await insert_usage(gw.pool, account_id, None, count=2, started_at=DAY1, model="gpt-4o")
    await insert_usage(gw.pool, account_id, key, count=3, started_at=DAY1 + timedelta(days=1))
    prefix = await gw.pool.fetchval("SELECT key_prefix FROM api_keys WHERE id = $1", key)

    async def count(**params) -> int:
        status, page = await client.get("/api/billing/usage", limit=100, **params)
        assert status == 200, page
        return len(page["data"])

    assert await count() == 9
    assert await count(model="gpt-4o") == 2
    assert await count(key=prefix) == 7
    assert await count(key=prefix, model="gpt-4o") == 0
    assert await count(key="sk-unknown") == 0
    assert await count(since="2026-10-02") == 3
    assert await count(until="2026-10-02") == 6
    assert await count(since="2026-10-01T00:00:02+00:00", until="2026-10-02") == 4
    assert await count(since="2026-10-01T00:00:02", model="gpt-4o") == 1  # naive = UTC


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"cursor": "abc"}, "cursor"),
        ({"cursor": "0"}, "cursor"),
        ({"cursor": "-5"}, "cursor"),
        ({"cursor": "9" * 30}, "cursor"),
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-01"}, "until"),
        ({"since": "0001-01-01"}, "since"),
        ({"since": "2026-10-02", "until": "2026-10-01"}, "until"),
        ({"format": "xml"}, "format"),
        ({"model": ""}, "model"),
    ],
)
async def test_usage_bad_query_is_400_naming_the_param(gw, params, param) -> None:
    _, client = await _client(gw)

    status, body = await client.get("/api/billing/usage", **params)

    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param


async def test_ledger_lists_entries_with_type_filter_and_receipt_url(gw) -> None:
    account_id, client = await _client(gw, 1_000)
    await gw.pool.execute(
        """INSERT INTO purchases (public_id, account_id, package_id, package_code,
                                  price_minor_units, currency, total_millicredits, status,
                                  checkout_session_id, receipt_url)
           SELECT 'pur_test1', $1, id, code, price_minor_units, currency, total_millicredits,
                  'paid', 'cs_test_1', 'https://pay.stripe.com/receipts/r1'
             FROM packages WHERE code = 'starter'""",
        account_id,
    )
    async with gw.pool.acquire() as conn:
        await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="purchase",
            amount_millicredits=9_990_000,
            idempotency_key="purchase:cs_t1",
            reference="cs_test_1",
        )
        await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="deduction",
            amount_millicredits=-500,
            idempotency_key="d:1",
            reference="cs_test_1",
        )

    _, everything = await client.get("/api/billing/ledger")
    status, purchases = await client.get("/api/billing/ledger", type="purchase")
    bad_status, bad = await client.get("/api/billing/ledger", type="gift")

    assert [row["type"] for row in everything["data"]] == ["deduction", "purchase", "adjustment"]
    assert status == 200
    (purchase,) = purchases["data"]
    assert purchase["object"] == "ledger_entry"
    assert purchase["amountMillicredits"] == "9990000"
    assert purchase["balanceAfterMillicredits"] == "9991000"
    assert purchase["balanceAfterCredits"] == 9991.0
    assert purchase["reference"] == "cs_test_1"
    assert purchase["receiptUrl"] == "https://pay.stripe.com/receipts/r1"
    deduction = everything["data"][0]
    assert deduction["amountMillicredits"] == "-500"
    assert deduction["receiptUrl"] is None  # only purchases carry receipts
    assert (bad_status, bad["error"]["param"]) == (400, "type")


async def test_ledger_date_range_and_pages(gw) -> None:
    account_id, client = await _client(gw)
    for day in range(1, 5):
        await post_at(gw.pool, account_id, "adjustment", day * 1000, DAY1 + timedelta(days=day - 1))

    _, ranged = await client.get("/api/billing/ledger", since="2026-10-02", until="2026-10-04")
    _, first = await client.get("/api/billing/ledger", limit=3)
    _, last = await client.get("/api/billing/ledger", limit=3, cursor=first["nextCursor"])

    assert [row["amountMillicredits"] for row in ranged["data"]] == ["3000", "2000"]
    assert len(first["data"]) == 3
    assert first["nextCursor"] == first["data"][-1]["id"]
    assert [row["amountMillicredits"] for row in last["data"]] == ["1000"]
    assert last["nextCursor"] is None


async def test_another_accounts_rows_are_never_visible(gw) -> None:
    mine, client = await _client(gw, 1_000)
    theirs, _ = await _client(gw, 2_000)
    await insert_usage(gw.pool, theirs, await key_id(gw.pool, theirs), count=2, started_at=DAY1)
    their_usage = await gw.pool.fetchval(
        "SELECT max(id) FROM usage_events WHERE account_id = $1", theirs
    )
    their_entry = await gw.pool.fetchval(
        "SELECT max(id) FROM ledger_entries WHERE account_id = $1", theirs
    )
    their_prefix = await gw.pool.fetchval(
        "SELECT key_prefix FROM api_keys WHERE account_id = $1", theirs
    )
    my_entry = await gw.pool.fetchval(
        "SELECT max(id) FROM ledger_entries WHERE account_id = $1", mine
    )

    usage_status, usage_body = await client.get(f"/api/billing/usage/{their_usage}")
    entry_status, entry_body = await client.get(f"/api/billing/ledger/{their_entry}")
    _, by_key = await client.get("/api/billing/usage", key=their_prefix)
    _, my_ledger = await client.get("/api/billing/ledger")
    own_status, own = await client.get(f"/api/billing/ledger/{my_entry}")
    huge_status, _ = await client.get(f"/api/billing/ledger/{2**63}")

    assert (usage_status, usage_body["error"]["code"]) == (404, "usage_event_not_found")
    assert (entry_status, entry_body["error"]["code"]) == (404, "ledger_entry_not_found")
    assert by_key["data"] == []
    assert [row["amountMillicredits"] for row in my_ledger["data"]] == ["1000"]
    assert (own_status, own["id"]) == (200, str(my_entry))
    assert huge_status == 404


async def test_usage_event_by_id(gw) -> None:
    account_id, client = await _client(gw)
    await insert_usage(gw.pool, account_id, None, count=3, started_at=DAY1)
    middle = await gw.pool.fetchval(
        "SELECT min(id) + 1 FROM usage_events WHERE account_id = $1", account_id
    )

    status, row = await client.get(f"/api/billing/usage/{middle}")
    missing_status, _ = await client.get(f"/api/billing/usage/{middle + 1000}")

    assert (status, row["id"]) == (200, str(middle))
    assert missing_status == 404


async def test_estimate_by_tokens_uses_rate_card_and_rounding(gw) -> None:
    _, client = await _client(gw)

    status, body = await client.post(
        "/api/billing/estimate",
        {"model": "gpt-4o", "inputTokens": 1000, "cachedInputTokens": 400, "outputTokens": 500},
    )

    # gpt-4o: 20 credits/1k input, 10 cached, 80 output: 600*20 + 400*10 + 500*80 = 56,000 mc.
    assert status == 200
    assert body == {
        "object": "estimate",
        "model": "gpt-4o",
        "inputTokens": 1000,
        "cachedInputTokens": 400,
        "outputTokens": 500,
        "estimatedMillicredits": "56000",
        "estimatedCredits": 56.0,
        "estimatedUsd": 0.06,
    }


async def test_estimate_by_text_counts_with_the_gateways_tokenizer(gw) -> None:
    _, client = await _client(gw)
    text = "The quick brown fox jumps over the lazy dog. " * 200 + "héllo wörld 你好"
    expected_tokens = gw.app[gateway_keys.TOKENS].count_text(text, "gpt-4o-mini")

    status, body = await client.post(
        "/api/billing/estimate", {"model": "gpt-4o-mini", "text": text, "outputTokens": 10}
    )

    assert status == 200
    assert body["inputTokens"] == expected_tokens
    assert expected_tokens > 1000
    card = gw.rate_cards.get("gpt-4o-mini")
    assert body["estimatedMillicredits"] == str(
        charge_millicredits(card, prompt_tokens=expected_tokens, completion_tokens=10)
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-9", "inputTokens": 1}, "model"),
        ({"inputTokens": 1}, "model"),
        ({"model": "gpt-4o", "inputTokens": -1}, "inputTokens"),
        ({"model": "gpt-4o", "inputTokens": 1.5}, "inputTokens"),
        ({"model": "gpt-4o", "outputTokens": True}, "outputTokens"),
        ({"model": "gpt-4o", "text": "x", "inputTokens": 3}, "text"),
        ({"model": "gpt-4o", "text": "x" * 100_001}, "text"),
        ({"model": "gpt-4o", "text": 5}, "text"),
        ([1, 2], None),
    ],
)
async def test_estimate_bad_body_is_400(gw, body, param) -> None:
    _, client = await _client(gw)

    status, answer = await client.post("/api/billing/estimate", body)

    assert status == 400
    assert answer["error"]["param"] == param


# -- the review's findings: input Postgres refuses, unknown parameters, digits ----------


def _no_error_logs(caplog) -> None:
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"model": "\x00"}, "model"),
        ({"key": "cg_live_\x00"}, "key"),
        ({"model": "gpt-4o\x00", "format": "csv"}, "model"),
        ({"key": "\x00", "format": "csv"}, "key"),
    ],
)
async def test_usage_nul_in_a_filter_is_400_naming_it(gw, caplog, params, param) -> None:
    _, client = await _client(gw)

    status, body = await client.get("/api/billing/usage", **params)

    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    _no_error_logs(caplog)


async def test_postgres_refused_input_is_400_not_503(gw, caplog) -> None:
    # Past the billing API's own checks, Postgres refuses the NUL byte (SQLSTATE 22021): the
    # caller's input, answered once for every route (runtime.errors), not an outage.
    _, client = await _client(gw)

    purchase_status, purchase = await client.get("/api/billing/purchases/pur_%00")
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            client.root + "/credits", params={"purchase": "pur_\x00", "session_id": "cs_\x00"}
        ) as page,
    ):
        page_status = page.status

    assert purchase_status == 400
    assert purchase["error"]["type"] == "invalid_request_error"
    assert purchase["error"]["code"] == "invalid_value"
    assert page_status == 200  # the page ignores a malformed id (gateway.credits_page)
    _no_error_logs(caplog)


async def test_refused_input_log_line_cannot_be_forged(gw, caplog) -> None:
    # The refused path is logged escaped: a newline in it cannot start a log line of its own.
    _, client = await _client(gw)
    forged = "x%0A2026-12-03 15:30:00,000 ERROR billing FORGED refund issued%00"
    with caplog.at_level(logging.INFO):
        status, _ = await client.get("/api/billing/purchases/" + forged)
    assert status == 400
    [line] = [r.getMessage() for r in caplog.records if "Postgres refused" in r.getMessage()]
    assert len(line.splitlines()) == 1
    assert r"\n2026-12-03" in line
    assert r"\x00" in line


async def test_checkout_nul_in_package_code_is_400_and_starter_savings_are_shown(
    shop: Shop,  # noqa: F811 (the imported fixture)
    caplog,
) -> None:
    refused = await shop.buy({"packageCode": "starter\u0000"})
    started = await shop.started("starter")
    professional = await shop.started("professional")

    assert refused.status == 400
    assert (await refused.json())["error"]["type"] == "invalid_request_error"
    _no_error_logs(caplog)
    # The same package shape as /me and /packages: savings against Starter, "0.0" for itself.
    assert started["package"]["savingsPercent"] == "0.0"
    assert professional["package"]["savingsPercent"] not in (None, "0.0")
    listed = await (await shop.gateway.get("/api/billing/packages")).json()
    by_code = {p["code"]: p["savingsPercent"] for p in listed["data"]}
    assert professional["package"]["savingsPercent"] == by_code["professional"]


@pytest.mark.parametrize(
    ("path", "params", "accepted"),
    [
        ("/api/billing/ledger", {"model": "gpt-4o"}, "type"),
        ("/api/billing/ledger", {"key": "cg_live_x"}, "type"),
        ("/api/billing/usage", {"type": "purchase"}, "model"),
        ("/api/billing/usage", {"Model": "gpt-4o"}, "model"),
        ("/api/billing/me", {"limit": "5"}, "none"),
        ("/api/billing/statements/2026-10", {"fromat": "csv"}, "format"),
    ],
)
async def test_unknown_query_parameter_is_400_naming_it(gw, path, params, accepted) -> None:
    _, client = await _client(gw)

    status, body = await client.get(path, **params)

    (name,) = params
    assert status == 400
    assert body["error"]["param"] == name
    assert body["error"]["code"] == "unknown_parameter"
    assert accepted in body["error"]["message"]


async def test_non_ascii_digits_are_refused(gw) -> None:
    account_id, client = await _client(gw, 1_000)
    entry = await gw.pool.fetchval(
        "SELECT max(id) FROM ledger_entries WHERE account_id = $1", account_id
    )
    arabic = str(entry).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))

    limit_status, limit = await client.get("/api/billing/usage", limit="１")
    cursor_status, cursor = await client.get("/api/billing/ledger", cursor="１")
    month_status, month = await client.get("/api/billing/statements/２０２６-10")
    entry_status, _ = await client.get(f"/api/billing/ledger/{arabic}")
    usage_status, _ = await client.get(f"/api/billing/usage/{arabic}")
    own_status, _ = await client.get(f"/api/billing/ledger/{entry}")

    assert (limit_status, limit["error"]["param"]) == (400, "limit")
    assert (cursor_status, cursor["error"]["param"]) == (400, "cursor")
    assert (month_status, month["error"]["param"]) == (400, "month")
    assert entry_status == usage_status == 404
    assert own_status == 200


async def test_estimate_unknown_field_is_400_naming_it(gw) -> None:
    # A misspelt count ("outputToken") must not give a confident estimate without it.
    _, client = await _client(gw)
    body = {"model": "gpt-4o", "inputTokens": 1000, "outputToken": 100_000}

    status, answer = await client.post("/api/billing/estimate", body)

    assert status == 400
    assert answer["error"]["param"] == "outputToken"
    assert answer["error"]["code"] == "unknown_parameter"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o", "inputTokens": 10, "cachedInputTokens": 11},
        {"model": "gpt-4o", "cachedInputTokens": 1},
        {"model": "gpt-4o", "text": "hi", "cachedInputTokens": 1000},
    ],
)
async def test_estimate_cached_above_input_is_400(gw, body) -> None:
    _, client = await _client(gw)

    status, answer = await client.post("/api/billing/estimate", body)

    assert status == 400
    assert answer["error"]["param"] == "cachedInputTokens"
