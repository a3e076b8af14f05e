"""The purchase and bookkeeping sections of ``creditgate qa`` (docs/qa.md): Stripe fulfilment
exactly once, the Credits page's numbers against the admin API, the ledger against the
balance and the usage rows, a reconciliation run, and the samples the report shows."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from creditgate.qa.client import POLL_S, SETTLE_TIMEOUT_S
from creditgate.qa.report import Section

if TYPE_CHECKING:
    from creditgate.qa.run import QaRun


async def purchase(qa: QaRun, section: Section) -> None:
    """One checkout paid (on the simulated Stripe only) and its event delivered again:
    exactly one purchase entry, the balance up once by the package's total."""
    assert qa.main is not None
    status, _, me = await qa.client.gateway("GET", "/api/billing/me", qa.main.key)
    package = min(me["packages"], key=lambda p: int(p["priceMinorUnits"]))
    before = await qa.client.admin("GET", f"/accounts/{qa.main.id}")
    status, _, started = await qa.client.gateway(
        "POST", "/api/billing/checkout", qa.main.key, {"packageCode": package["code"]}
    )
    if not section.check(f"checkout of {package['code']} starts (201)", status == 201, status):
        return
    url = str(started["checkoutUrl"])
    async with qa.client.http.get(url) as response:
        simulated = "Simulated Stripe" in await response.text()
    if not simulated:
        section.skip(
            f"real Stripe: open {url} and pay (test card 4242 4242 4242 4242), then resend the "
            "event (`stripe events resend evt_...`) and run the reconciliation section; the "
            "script pays only on the simulated Stripe"
        )
        return
    async with qa.client.http.post(url + "/pay", allow_redirects=False) as response:
        section.check(
            "paid on the simulated Stripe's Checkout page",
            response.status == 303,
            response.status,
        )
    first = await purchase_entries(qa, section, 1)
    await replay(qa, section, url, str(started["checkoutSessionId"]))
    await asyncio.sleep(1.0)  # a duplicate would post now
    entries = await purchase_entries(qa, section, 1)
    after = await qa.client.admin("GET", f"/accounts/{qa.main.id}")
    section.check(
        "exactly one purchase ledger entry",
        len(entries) == len(first) == 1,
        [e["id"] for e in entries],
    )
    rose = int(after["balanceMillicredits"]) - int(before["balanceMillicredits"])
    section.check(
        "balance rose once, by the package's total",
        rose == int(package["totalMillicredits"]),
        {
            "roseMillicredits": str(rose),
            "packageTotalMillicredits": package["totalMillicredits"],
        },
    )
    section.samples["purchaseEntry"] = entries[0] if entries else None


async def purchase_entries(qa: QaRun, section: Section, wanted: int) -> list[dict[str, Any]]:
    """The main account's purchase entries, once at least ``wanted`` are posted."""
    assert qa.main is not None
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        entries = await qa.client.admin_all(f"/accounts/{qa.main.id}/ledger", entryType="purchase")
        if len(entries) >= wanted or time.monotonic() > deadline:
            section.check("purchase fulfilled by the webhook", len(entries) >= wanted, len(entries))
            return entries
        await asyncio.sleep(POLL_S)


async def replay(qa: QaRun, section: Section, checkout_url: str, session_id: str) -> None:
    """Deliver the session's ``checkout.session.completed`` again (the simulated Stripe's
    ``POST /v1/events/{id}/retry``, as ``stripe events resend``)."""
    key = qa.options.stripe_api_key
    if key is None:
        section.skip(
            "webhook replay not checked: give --stripe-api-key (the simulated Stripe's key)"
        )
        return
    parts = urlsplit(checkout_url)
    base = f"{parts.scheme}://{parts.netloc}"
    headers = {"Authorization": f"Bearer {key}"}
    async with qa.client.http.get(
        f"{base}/v1/events", params={"type": "checkout.session.completed"}, headers=headers
    ) as response:
        events = (await response.json())["data"] if response.status == 200 else []
    event = next((e for e in events if e["data"]["object"]["id"] == session_id), None)
    if not section.check("the completion event is listed", event is not None, session_id):
        return
    assert event is not None
    async with qa.client.http.post(
        f"{base}/v1/events/{event['id']}/retry", headers=headers
    ) as response:
        section.check("the same event delivered again", response.status == 200, event["id"])


async def credits_page(qa: QaRun, section: Section) -> None:
    """The Credits page's balances and rates equal the admin API's; the ledger sums to
    the balance."""
    assert qa.main is not None
    await qa.settled(qa.main, len(qa.calls))
    status, _, me = await qa.client.gateway("GET", "/api/billing/me", qa.main.key)
    if not section.check("/api/billing/me answers 200", status == 200, status):
        return
    for name in (
        "balanceMillicredits",
        "balanceCredits",
        "balanceUsd",
        "packages",
        "activeRates",
    ):
        section.check(f"has {name}", name in me)
    section.check("millicredits are strings", isinstance(me["balanceMillicredits"], str))
    detail = await qa.client.admin("GET", f"/accounts/{qa.main.id}")
    for name in (
        "balanceMillicredits",
        "heldMillicredits",
        "availableMillicredits",
        "pendingSettlementMillicredits",
    ):
        section.check(
            f"{name}: page = admin API",
            me[name] == detail[name],
            {"page": me[name], "admin": detail[name]},
        )
    await check_ledger_sum(qa, section, me["balanceMillicredits"])
    cards = await qa.rate_cards()
    shown = {
        r["model"]: (
            r["inputCreditsPer1k"],
            r["cachedInputCreditsPer1k"],
            r["outputCreditsPer1k"],
        )
        for r in me["activeRates"]
    }
    in_force = {
        m: (
            c["inputCreditsPer1kTokens"],
            c["cachedInputCreditsPer1kTokens"] or c["inputCreditsPer1kTokens"],
            c["outputCreditsPer1kTokens"],
        )
        for m, c in cards.items()
        if m in shown
    }
    section.check(
        "rates shown = the cards in force",
        shown == in_force and bool(shown),
        {"page": shown, "admin": in_force},
    )


async def check_ledger_sum(qa: QaRun, section: Section, balance_mc: str) -> None:
    """The main account's ledger entries sum to ``balance_mc``."""
    assert qa.main is not None
    entries = await qa.client.admin_all(f"/accounts/{qa.main.id}/ledger")
    total = sum(int(e["amountMillicredits"]) for e in entries)
    section.check(
        "ledger entries sum to the balance",
        str(total) == balance_mc,
        {"ledgerSumMillicredits": str(total), "balanceMillicredits": balance_mc},
    )


async def account_ledger(qa: QaRun, section: Section) -> None:
    """Smoke: the call's usage row and its deduction entry agree; the ledger sums to the
    balance."""
    assert qa.main is not None
    rows = await qa.settled(qa.main, len(qa.calls))
    entries = await qa.client.admin_all(f"/accounts/{qa.main.id}/ledger", entryType="deduction")
    deducted = {e["reference"]: -int(e["amountMillicredits"]) for e in entries}
    for row in rows:
        section.check(
            f"{row['requestId']}: deduction = usage charge",
            deducted.get(row["requestId"], 0) == int(row["chargedMillicredits"]),
        )
    detail = await qa.client.admin("GET", f"/accounts/{qa.main.id}")
    await check_ledger_sum(qa, section, detail["balanceMillicredits"])


async def reconciliation(qa: QaRun, section: Section) -> None:
    """A reconciliation run finds no mismatch; the ledger sums to the balance."""
    assert qa.main is not None
    await qa.settled(qa.main, len(qa.calls))
    run = await qa.client.admin("POST", "/reconciliation-runs", {})
    failing = {k: v for k, v in run["mismatchCounts"].items() if v}
    section.check(
        "reconciliation run ok",
        run["ok"] is True,
        {"runId": run["id"], "mismatchCounts": failing, "mismatches": run["mismatches"][:5]},
    )
    detail = await qa.client.admin("GET", f"/accounts/{qa.main.id}")
    await check_ledger_sum(qa, section, detail["balanceMillicredits"])


async def samples(qa: QaRun, section: Section) -> None:
    """A billing summary, a ledger row and a usage row, shown in the report."""
    assert qa.main is not None
    status, _, me = await qa.client.gateway("GET", "/api/billing/me", qa.main.key)
    section.check("/api/billing/me answers 200", status == 200, status)
    ledger = await qa.client.admin("GET", f"/accounts/{qa.main.id}/ledger", params={"limit": "1"})
    usage = await qa.client.admin("GET", f"/accounts/{qa.main.id}/usage", params={"limit": "1"})
    summary = {
        k: v
        for k, v in me.items()
        if k not in ("packages", "activeRates", "recentLedger", "recentUsage")
    }
    section.samples.update(
        billingSummary=summary,
        ledgerRow=ledger["data"][0] if ledger["data"] else None,
        usageRow=usage["data"][0] if usage["data"] else None,
    )
    section.check("a billing summary, a ledger row and a usage row", all(section.samples.values()))
