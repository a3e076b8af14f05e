"""The money sections of ``creditgate qa`` (docs/qa.md): package totals, reference charges
against the upstream's usage and each row's rate snapshot, the 402 body and its link, one
hold's worth of balance under two concurrent calls, and rate snapshots across a rate change."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from creditgate.qa.charges import MC_PER_CENT, credits_to_mc, expected_charge_mc, mc_to_credits
from creditgate.qa.client import POLL_S, SETTLE_TIMEOUT_S, QaError
from creditgate.qa.report import Section

if TYPE_CHECKING:
    from creditgate.qa.run import QaRun

#: The owners' package totals (seed 000), compared for information only.
SEED_PACKAGE_TOTALS_MC = {
    "starter": 9_990_000,
    "professional": 52_490_000,
    "enterprise": 109_990_000,
}
#: The owners' worked examples (seed 000): model, prompt, output, credits exact / ceil, and
#: the rates (credits per 1k in / out) the examples assume.
SEED_EXAMPLES = (
    ("gpt-4o-mini", 1000, 1000, "12.000", "12", ("2.4", "9.6")),
    ("gpt-4o", 10_000, 2000, "360.000", "360", ("20", "80")),
    ("gpt-4o-mini", 750, 200, "3.720", "4", ("2.4", "9.6")),
    ("gpt-4o", 1234, 567, "70.040", "71", ("20", "80")),
)


async def packages(qa: QaRun, section: Section) -> None:
    """Each active package's price x 1,000 + bonus = its credits, and the Credits page
    shows the same packages as the admin API."""
    admin = (await qa.client.admin("GET", "/packages"))["data"]
    active = {p["code"]: p for p in admin if p["active"]}
    section.check("active packages configured", bool(active), sorted(active))
    for code, package in active.items():
        price_mc = int(package["priceMinorUnits"]) * MC_PER_CENT
        base, bonus = int(package["baseMillicredits"]), int(package["bonusMillicredits"])
        total = int(package["totalMillicredits"])
        section.check(
            f"{code}: price x 1,000 + bonus = credits",
            base == price_mc and total == base + bonus,
            {
                "price": package["price"],
                "baseCredits": package["baseCredits"],
                "bonusCredits": package["bonusCredits"],
                "totalCredits": package["totalCredits"],
            },
        )
        if code in SEED_PACKAGE_TOTALS_MC:
            seeded = SEED_PACKAGE_TOTALS_MC[code] == total
            section.notes.append(
                f"{code}: {mc_to_credits(total)} credits "
                f"({'as' if seeded else 'differs from'} the checklist's "
                f"{mc_to_credits(SEED_PACKAGE_TOTALS_MC[code])})"
            )
    assert qa.main is not None
    status, _, me = await qa.client.gateway("GET", "/api/billing/me", qa.main.key)
    section.check("/api/billing/me answers 200", status == 200, status)
    fields = ("priceMinorUnits", "baseMillicredits", "bonusMillicredits", "totalMillicredits")
    page = {p["code"]: tuple(str(p[f]) for f in fields) for p in me["packages"]}
    configured = {c: tuple(str(p[f]) for f in fields) for c, p in active.items()}
    section.check(
        "Credits page packages = the admin API's active packages",
        page == configured,
        {"page": page, "admin": configured},
    )


async def charges(qa: QaRun, section: Section) -> None:
    """Calls through the gateway; each usage row's tokens and charge match the upstream's
    usage at the row's rate snapshot (and, in a full run, the checklist's worked examples)."""
    assert qa.main is not None
    calls = 1 if qa.options.smoke else 2
    for _ in range(calls):
        status, headers, body = await qa.client.chat(qa.main.key, qa.rate_model)
        if not section.check("call through the gateway answers 200", status == 200, status):
            return
        qa.calls.append((headers["x-request-id"], body["usage"]))
    rows = {r["requestId"]: r for r in await qa.settled(qa.main, len(qa.calls))}
    for request_id, usage in qa.calls[-calls:]:
        check_charge(qa, section, rows.get(request_id), usage)
    if not qa.options.smoke:
        await worked_examples(qa, section)


def check_charge(
    qa: QaRun, section: Section, row: dict[str, Any] | None, usage: dict[str, Any]
) -> None:
    """One usage row against the usage the upstream reported and its rate snapshot."""
    if not section.check("usage row recorded", row is not None):
        return
    assert row is not None
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reported = (usage["prompt_tokens"], cached, usage["completion_tokens"])
    recorded = (row["promptTokens"], row["cachedTokens"], row["completionTokens"])
    section.check(
        f"{row['requestId']}: tokens = the upstream's usage",
        reported == recorded,
        {"upstream": reported, "row": recorded},
    )
    rates = (
        credits_to_mc(row["inputCreditsPer1kTokens"]),
        credits_to_mc(row["cachedInputCreditsPer1kTokens"]),
        credits_to_mc(row["outputCreditsPer1kTokens"]),
    )
    expected = expected_charge_mc(
        prompt=reported[0],
        cached=cached,
        completion=reported[2],
        rates_mc=rates,
        rounding_mode=qa.rounding_mode,
    )
    section.check(
        f"{row['requestId']}: rounding mode = the flag",
        row["roundingMode"] == qa.rounding_mode,
        row["roundingMode"],
    )
    charged = int(row["chargedMillicredits"]) + int(row["shortfallMillicredits"])
    section.check(
        f"{row['requestId']}: charge = recomputed in millicredits",
        int(row["costMillicredits"]) == expected == charged,
        {
            "expectedMillicredits": str(expected),
            "costMillicredits": row["costMillicredits"],
            "chargedMillicredits": row["chargedMillicredits"],
            "ratesMillicreditsPer1k": rates,
        },
    )


async def worked_examples(qa: QaRun, section: Section) -> None:
    """The checklist's examples with the configured cards (arithmetic only)."""
    cards = await qa.rate_cards()
    for model, prompt, completion, exact, ceil, seed_rates in SEED_EXAMPLES:
        card = cards.get(model)
        if card is None:
            section.notes.append(f"arithmetic only: {model} has no card in force; example skipped")
            continue
        rates = (
            card["inputMillicreditsPer1kTokens"],
            card["inputMillicreditsPer1kTokens"],
            card["outputMillicreditsPer1kTokens"],
        )
        got = mc_to_credits(
            expected_charge_mc(
                prompt=prompt,
                cached=0,
                completion=completion,
                rates_mc=rates,
                rounding_mode=qa.rounding_mode,
            )
        )
        want = exact if qa.rounding_mode == "exact" else ceil
        name = f"arithmetic only: {model} {prompt} in + {completion} out = {got} credits"
        if (rates[0], rates[2]) == (credits_to_mc(seed_rates[0]), credits_to_mc(seed_rates[1])):
            section.check(name, credits_to_mc(got) == credits_to_mc(want), {"checklist": want})
        else:
            section.notes.append(f"{name} (the checklist's {want} assumes other rates)")


async def payment_required(qa: QaRun, section: Section) -> None:
    """A call without credits answers 402 with the body's fields and a Credits link
    that opens."""
    low = await qa.new_account("low", None)
    status, headers, answer = await qa.client.chat(low.key, qa.rate_model)
    section.check("a call without credits answers 402", status == 402, status)
    body: dict[str, Any] = answer if isinstance(answer, dict) else {}
    error = body.get("error") or {}
    section.check(
        "error.code insufficient_credits",
        error.get("code") == "insufficient_credits",
        error.get("code"),
    )
    for name in ("requiredCredits", "currentCredits", "buyCreditsUrl"):
        section.check(f"body has {name}", name in body and name in error, body.get(name))
    section.check(
        "requiredCredits > currentCredits",
        float(body.get("requiredCredits", 0)) > float(body.get("currentCredits", 0)),
    )
    section.check("x-request-id on the 402", "x-request-id" in {h.lower() for h in headers})
    url = str(body.get("buyCreditsUrl", ""))
    async with qa.client.http.get(url) as response:
        section.check(
            "buyCreditsUrl opens (the Credits page)",
            response.status == 200,
            {"url": url, "status": response.status},
        )
    section.samples["402"] = body


async def concurrency(qa: QaRun, section: Section) -> None:
    """With balance for one hold, two concurrent calls: one 200, one 402, and the
    balance never below zero."""
    account = await qa.new_account("race", None)
    status, _, body = await qa.client.chat(account.key, qa.rate_model)
    if not section.check("probe call answers 402 with the hold it needs", status == 402, status):
        return
    required = int(body["requiredMillicredits"])
    grant = required + required // 2  # one hold fits, two do not
    await qa.client.admin(
        "POST",
        f"/accounts/{account.id}/adjustments",
        {
            "direction": "credit",
            "amountCredits": mc_to_credits(grant),
            "reason": f"creditgate qa {qa.run_id}",
        },
        idempotent=True,
    )
    results = await asyncio.gather(*(qa.client.chat(account.key, qa.rate_model) for _ in range(2)))
    statuses = sorted(r[0] for r in results)
    section.check("exactly one 200 and one 402", statuses == [200, 402], statuses)
    await qa.settled(account, 1)
    detail = await qa.client.admin("GET", f"/accounts/{account.id}")
    for name in ("balanceMillicredits", "availableMillicredits"):
        section.check(f"{name} never below zero", int(detail[name]) >= 0, detail[name])
    section.check(
        "no shortfall", detail["shortfallMillicredits"] == "0", detail["shortfallMillicredits"]
    )


async def rate_snapshots(qa: QaRun, section: Section) -> None:
    """A published rate change charges new calls at the new rates while earlier usage
    rows keep theirs; the original rates are published back."""
    assert qa.main is not None
    if not qa.calls:
        await charges(qa, Section("calls before the change"))
    old = (await qa.rate_cards())[qa.rate_model]
    new_rates = {
        f"{side}CreditsPer1k": mc_to_credits(old[f"{side}MillicreditsPer1kTokens"] * 11 // 10 + 1)
        for side in ("input", "output")
    }
    publish = {
        "model": qa.rate_model,
        "modelKind": old["modelKind"],
        "maxOutputTokens": old["maxOutputTokens"],
        "displayLabel": old["displayLabel"],
        "inputCreditsPer1kTokens": new_rates["inputCreditsPer1k"],
        "outputCreditsPer1kTokens": new_rates["outputCreditsPer1k"],
        "cachedInputCreditsPer1kTokens": old["cachedInputCreditsPer1kTokens"],
        "upstreamInputUsdPer1kTokens": old["upstreamInputUsdPer1kTokens"],
        "upstreamOutputUsdPer1kTokens": old["upstreamOutputUsdPer1kTokens"],
    }
    await qa.client.admin("POST", "/rate-cards", publish)
    try:
        row = await call_at_rates(qa, new_rates)
    finally:
        restore = {
            **publish,
            "inputCreditsPer1kTokens": old["inputCreditsPer1kTokens"],
            "outputCreditsPer1kTokens": old["outputCreditsPer1kTokens"],
        }
        await qa.client.admin("POST", "/rate-cards", restore)
    section.check("a call after the change carries the new rates", row is not None, new_rates)
    rows = {r["requestId"]: r for r in await qa.client.admin_all(f"/accounts/{qa.main.id}/usage")}
    for request_id, _ in qa.calls:
        earlier = rows[request_id]
        section.check(
            f"{request_id}: still shows the old rates",
            (earlier["inputCreditsPer1kTokens"], earlier["outputCreditsPer1kTokens"])
            == (old["inputCreditsPer1kTokens"], old["outputCreditsPer1kTokens"]),
            {
                "input": earlier["inputCreditsPer1kTokens"],
                "output": earlier["outputCreditsPer1kTokens"],
            },
        )
    restored = (await qa.rate_cards())[qa.rate_model]
    section.check(
        "original rates published back",
        (restored["inputCreditsPer1kTokens"], restored["outputCreditsPer1kTokens"])
        == (old["inputCreditsPer1kTokens"], old["outputCreditsPer1kTokens"]),
    )


async def call_at_rates(qa: QaRun, rates: dict[str, str]) -> dict[str, Any] | None:
    """Calls until one is charged at ``rates`` (the gateway picks a new card up within
    moments); returns its usage row, None if none was within the settle timeout."""
    assert qa.main is not None
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        status, headers, body = await qa.client.chat(qa.main.key, qa.rate_model)
        if status != 200:
            raise QaError(f"call at the new rates answered {status}: {body}")
        rows = await qa.settled(qa.main, len(qa.calls) + 1)
        row = {r["requestId"]: r for r in rows}.get(headers["x-request-id"])
        if row is None:
            raise QaError(f"no usage row for {headers['x-request-id']}")
        if (row["inputCreditsPer1kTokens"], row["outputCreditsPer1kTokens"]) == (
            rates["inputCreditsPer1k"],
            rates["outputCreditsPer1k"],
        ):
            return row
        qa.calls.append((headers["x-request-id"], body["usage"]))  # still the old card
        await asyncio.sleep(POLL_S)
    return None
