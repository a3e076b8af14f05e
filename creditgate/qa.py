"""``creditgate qa``: the go-live QA script, an HTTP client of a deployed gateway and its admin
service (docs/qa.md).

It creates its own throwaway accounts through the admin API (``qa+<run id>@creditgate.invalid``),
runs one section per item of the owners' QA checklist and prints pass, fail or skip per section
(``--json``: one JSON report); exit status 1 when a section fails. The accounts are suspended at
the end, never deleted (they are real rows of a real ledger).

The charges are recomputed here from the usage the upstream reported and each usage row's rate
snapshot, with integer arithmetic written from docs/design.md ("Units and arithmetic"), not with
``billing.metering.pricing``: the script is the independent check of that code.

The full run publishes a slightly higher rate card for ``--rate-model`` for a moment, and the
original rates back (use it in staging); ``--smoke`` (the runbook's T-0 check) never does: one
call, one 402, and a purchase only when the gateway's Stripe is the simulated one.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

#: Millicredits per credit; a USD cent buys 10 credits (1,000 credits = $1).
MC_PER_CREDIT = 1000
MC_PER_CENT = 10 * MC_PER_CREDIT
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
#: Credits of the main throwaway account: enough for every call of a run.
START_CREDITS = "200"
#: ``max_tokens`` of every call the script makes (keeps holds and charges small).
MAX_TOKENS = 16
#: Seconds to wait for settlements to reach Postgres (usage rows, ledger entries).
SETTLE_TIMEOUT_S = 30.0
_POLL_S = 0.2


class QaError(Exception):
    """A call answered something the script cannot go on from (the section fails)."""


@dataclass(slots=True)
class Section:
    """One section's outcome: its checks (name, ok, detail) and notes."""

    name: str
    status: str = "pass"
    checks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: Any = None) -> bool:
        """Record one assertion; a failed one fails the section."""
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        if not ok:
            self.status = "fail"
        return bool(ok)

    def skip(self, note: str) -> None:
        """The section could not run here (not a failure); ``note`` says why."""
        if self.status == "pass":
            self.status = "skip"
        self.notes.append(note)

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "status": self.status, "checks": self.checks}
        if self.notes:
            doc["notes"] = self.notes
        if self.samples:
            doc["samples"] = self.samples
        return doc


@dataclass(frozen=True, slots=True)
class Options:
    """The command line's options."""

    gateway: str
    admin: str
    admin_token: str
    smoke: bool = False
    rate_model: str | None = None
    stripe_api_key: str | None = None


@dataclass(slots=True)
class Account:
    """A throwaway account and its API key."""

    id: int
    key: str
    key_prefix: str


def credits_to_mc(text: str | float | int) -> int:
    """Credits (a decimal string, at most 3 decimals) to integer millicredits."""
    value = Decimal(str(text)) * MC_PER_CREDIT
    if value != value.to_integral_value():
        raise ValueError(f"{text} credits is not a whole number of millicredits")
    return int(value)


def mc_to_credits(mc: int) -> str:
    """Integer millicredits as a credits string with 3 decimals."""
    sign = "-" if mc < 0 else ""
    whole, frac = divmod(abs(mc), MC_PER_CREDIT)
    return f"{sign}{whole}.{frac:03d}"


def expected_charge_mc(
    *,
    prompt: int,
    cached: int,
    completion: int,
    rates_mc: tuple[int, int, int],
    rounding_mode: str,
) -> int:
    """The charge in millicredits: ``(prompt - cached) * in + cached * cached_in +
    completion * out`` per 1,000 tokens, rounded up once, to the millicredit (``exact``) or
    to the whole credit (``ceil``)."""
    input_mc, cached_mc, output_mc = rates_mc
    cached = min(cached, prompt)
    raw = (prompt - cached) * input_mc + cached * cached_mc + completion * output_mc  # mc/1000
    unit = 1000 * (MC_PER_CREDIT if rounding_mode == "ceil" else 1)
    return -(-raw // unit) * (unit // 1000)


def _redact(doc: dict[str, Any], secrets_: list[str]) -> dict[str, Any]:
    text = orjson.dumps(doc).decode()
    for secret in secrets_:
        if secret:
            text = text.replace(secret, secret[:12] + "...redacted")
    redacted: dict[str, Any] = orjson.loads(text)
    return redacted


class Client:
    """The gateway's and the admin service's HTTP APIs, as the script uses them."""

    def __init__(self, http: aiohttp.ClientSession, options: Options) -> None:
        self.http = http
        self.options = options

    async def admin(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        idempotent: bool = False,
        params: dict[str, str] | None = None,
    ) -> Any:
        """An admin API call; returns its JSON. Raises QaError on a non-2xx answer.
        ``idempotent``: send a new ``Idempotency-Key``."""
        url = self.options.admin.rstrip("/") + "/admin/v1" + path
        headers = {"Authorization": f"Bearer {self.options.admin_token}"}
        if idempotent:
            headers["Idempotency-Key"] = f"qa-{secrets.token_hex(12)}"
        async with self.http.request(
            method, url, json=json, headers=headers, params=params or None
        ) as response:
            body = await response.read()
            if not 200 <= response.status < 300:
                raise QaError(f"{method} {path}: {response.status} {body[:500]!r}")
            return orjson.loads(body) if body else None

    async def admin_all(self, path: str, **params: str) -> list[dict[str, Any]]:
        """Every row of a cursor-paged admin listing."""
        rows: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page_params = {**params, "limit": "200"} | ({"cursor": cursor} if cursor else {})
            page = await self.admin("GET", path, params=page_params)
            rows.extend(page["data"])
            cursor = page["nextCursor"]
            if cursor is None:
                return rows

    async def gateway(
        self, method: str, path: str, key: str, json: Any = None
    ) -> tuple[int, dict[str, str], Any]:
        """A gateway call with an API key: ``(status, headers, JSON body or None)``."""
        url = self.options.gateway.rstrip("/") + path
        async with self.http.request(
            method, url, json=json, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            body = await response.read()
            try:
                doc = orjson.loads(body) if body else None
            except orjson.JSONDecodeError:
                doc = None
            return response.status, {k.lower(): v for k, v in response.headers.items()}, doc

    async def chat(self, key: str, model: str) -> tuple[int, dict[str, str], Any]:
        """One small chat completion through the gateway."""
        body = {
            "model": model,
            "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": f"creditgate qa {secrets.token_hex(4)}"}],
        }
        return await self.gateway("POST", "/v1/chat/completions", key, body)


class QaRun:
    """One run: the throwaway accounts, the sections in order, the report."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.options = client.options
        self.run_id = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
        self.sections: list[Section] = []
        self.accounts: list[Account] = []
        self.main: Account | None = None
        self.rounding_mode = "exact"
        self.rate_model = ""
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (request id, upstream usage)

    # -- plumbing ----------------------------------------------------------------------

    async def section(self, name: str, body: Callable[[Section], Awaitable[None]]) -> Section:
        """Run one section; an exception fails it (the run goes on)."""
        section = Section(name)
        try:
            await body(section)
        except (
            QaError,
            aiohttp.ClientError,
            TimeoutError,
            LookupError,
            TypeError,
            ValueError,
        ) as exc:
            # One section's surprise (an answer of another shape included) fails that section;
            # the run goes on and the cleanup still runs.
            section.check("ran to the end", False, f"{type(exc).__name__}: {exc}")
        self.sections.append(section)
        return section

    async def new_account(self, label: str, credits: str | None) -> Account:
        """A throwaway account (``qa+<run id>-<label>@creditgate.invalid``) with one key."""
        body: dict[str, Any] = {"email": f"qa+{self.run_id}-{label}@creditgate.invalid"}
        if credits is not None:
            body["startingCredits"] = credits
        created = await self.client.admin("POST", "/accounts", body)
        key = await self.client.admin("POST", f"/accounts/{created['id']}/keys", {"name": "qa"})
        account = Account(int(created["id"]), key["key"], key["keyPrefix"])
        self.accounts.append(account)
        return account

    async def settled(self, account: Account, usage_rows: int) -> list[dict[str, Any]]:
        """Wait until ``usage_rows`` usage rows are posted and nothing is held or pending;
        returns the account's usage rows, newest first."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            rows = await self.client.admin_all(f"/accounts/{account.id}/usage")
            detail = await self.client.admin("GET", f"/accounts/{account.id}")
            quiet = detail["heldMillicredits"] == detail["pendingSettlementMillicredits"] == "0"
            if len(rows) >= usage_rows and quiet:
                return rows
            if time.monotonic() > deadline:
                raise QaError(
                    f"account {account.id}: settlements not posted after {SETTLE_TIMEOUT_S} s"
                )
            await asyncio.sleep(_POLL_S)

    async def rate_cards(self) -> dict[str, dict[str, Any]]:
        """The rate cards in force, by model."""
        cards = (await self.client.admin("GET", "/rate-cards"))["data"]
        return {card["model"]: card for card in cards if not card["scheduled"]}

    # -- the run -----------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Every section (``--smoke``: the T-0 subset), then clean up; returns the report."""
        try:
            setup = await self.section("setup", self.setup)
            if setup.status != "fail":
                await self.sections_in_order()
        finally:
            await self.section("cleanup", self.cleanup)
        return self.report()

    async def sections_in_order(self) -> None:
        if self.options.smoke:
            plan = [
                ("credits page", self.credits_page),
                ("reference charges", self.charges),
                ("402 body and link", self.payment_required),
                ("stripe fulfilment exactly once", self.purchase),
                ("account ledger", self.account_ledger),
                ("samples", self.samples),
            ]
        else:
            plan = [
                ("package totals", self.packages),
                ("reference charges", self.charges),
                ("402 body and link", self.payment_required),
                ("concurrency: balance for one call", self.concurrency),
                ("rate snapshots survive a rate change", self.rate_snapshots),
                ("stripe fulfilment exactly once", self.purchase),
                ("credits page", self.credits_page),
                ("reconciliation", self.reconciliation),
                ("samples", self.samples),
            ]
        for name, body in plan:
            await self.section(name, body)

    def report(self) -> dict[str, Any]:
        failed = [s.name for s in self.sections if s.status == "fail"]
        return {
            "runId": self.run_id,
            "mode": "smoke" if self.options.smoke else "full",
            "ok": not failed,
            "failed": failed,
            "roundingMode": self.rounding_mode,
            "rateModel": self.rate_model,
            "accounts": [a.id for a in self.accounts],
            "sections": [s.to_doc() for s in self.sections],
        }

    async def setup(self, section: Section) -> None:
        flags = {f["name"]: f["value"] for f in (await self.client.admin("GET", "/flags"))["data"]}
        self.rounding_mode = str(flags.get("billing.rounding_mode", "exact"))
        section.check(
            "rounding mode read from the flags",
            self.rounding_mode in ("exact", "ceil"),
            self.rounding_mode,
        )
        cards = await self.rate_cards()
        chat = [c for c in cards.values() if c["modelKind"] == "chat"]
        cheapest = min(
            chat,
            key=lambda c: (
                c["inputMillicreditsPer1kTokens"] + c["outputMillicreditsPer1kTokens"],
                c["model"],
            ),
        )
        self.rate_model = self.options.rate_model or cheapest["model"]
        section.check("rate model has a card in force", self.rate_model in cards, self.rate_model)
        self.main = await self.new_account("main", START_CREDITS)
        section.check(
            "throwaway account created",
            True,
            {"accountId": self.main.id, "keyPrefix": self.main.key_prefix},
        )

    async def cleanup(self, section: Section) -> None:
        for account in self.accounts:  # each one, whatever happened to the one before
            try:
                suspended = await self.client.admin(
                    "POST",
                    f"/accounts/{account.id}/suspend",
                    {"reason": f"creditgate qa {self.run_id}"},
                )
            except (QaError, aiohttp.ClientError, TimeoutError) as exc:
                section.check(f"account {account.id} suspended", False, str(exc))
                continue
            section.check(f"account {account.id} suspended", suspended["status"] == "suspended")

    # -- sections ------------------------------------------------------------------------

    async def packages(self, section: Section) -> None:
        admin = (await self.client.admin("GET", "/packages"))["data"]
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
        assert self.main is not None
        status, _, me = await self.client.gateway("GET", "/api/billing/me", self.main.key)
        section.check("/api/billing/me answers 200", status == 200, status)
        fields = ("priceMinorUnits", "baseMillicredits", "bonusMillicredits", "totalMillicredits")
        page = {p["code"]: tuple(str(p[f]) for f in fields) for p in me["packages"]}
        configured = {c: tuple(str(p[f]) for f in fields) for c, p in active.items()}
        section.check(
            "Credits page packages = the admin API's active packages",
            page == configured,
            {"page": page, "admin": configured},
        )

    async def charges(self, section: Section) -> None:
        assert self.main is not None
        calls = 1 if self.options.smoke else 2
        for _ in range(calls):
            status, headers, body = await self.client.chat(self.main.key, self.rate_model)
            if not section.check("call through the gateway answers 200", status == 200, status):
                return
            self.calls.append((headers["x-request-id"], body["usage"]))
        rows = {r["requestId"]: r for r in await self.settled(self.main, len(self.calls))}
        for request_id, usage in self.calls[-calls:]:
            self.check_charge(section, rows.get(request_id), usage)
        if not self.options.smoke:
            await self.worked_examples(section)

    def check_charge(
        self, section: Section, row: dict[str, Any] | None, usage: dict[str, Any]
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
            rounding_mode=self.rounding_mode,
        )
        section.check(
            f"{row['requestId']}: rounding mode = the flag",
            row["roundingMode"] == self.rounding_mode,
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

    async def worked_examples(self, section: Section) -> None:
        """The checklist's examples with the configured cards (arithmetic only)."""
        cards = await self.rate_cards()
        for model, prompt, completion, exact, ceil, seed_rates in SEED_EXAMPLES:
            card = cards.get(model)
            if card is None:
                section.notes.append(
                    f"arithmetic only: {model} has no card in force; example skipped"
                )
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
                    rounding_mode=self.rounding_mode,
                )
            )
            want = exact if self.rounding_mode == "exact" else ceil
            name = f"arithmetic only: {model} {prompt} in + {completion} out = {got} credits"
            if (rates[0], rates[2]) == (credits_to_mc(seed_rates[0]), credits_to_mc(seed_rates[1])):
                section.check(name, credits_to_mc(got) == credits_to_mc(want), {"checklist": want})
            else:
                section.notes.append(f"{name} (the checklist's {want} assumes other rates)")

    async def payment_required(self, section: Section) -> None:
        low = await self.new_account("low", None)
        status, headers, answer = await self.client.chat(low.key, self.rate_model)
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
        async with self.client.http.get(url) as response:
            section.check(
                "buyCreditsUrl opens (the Credits page)",
                response.status == 200,
                {"url": url, "status": response.status},
            )
        section.samples["402"] = body

    async def concurrency(self, section: Section) -> None:
        account = await self.new_account("race", None)
        status, _, body = await self.client.chat(account.key, self.rate_model)
        if not section.check(
            "probe call answers 402 with the hold it needs", status == 402, status
        ):
            return
        required = int(body["requiredMillicredits"])
        grant = required + required // 2  # one hold fits, two do not
        await self.client.admin(
            "POST",
            f"/accounts/{account.id}/adjustments",
            {
                "direction": "credit",
                "amountCredits": mc_to_credits(grant),
                "reason": f"creditgate qa {self.run_id}",
            },
            idempotent=True,
        )
        results = await asyncio.gather(
            *(self.client.chat(account.key, self.rate_model) for _ in range(2))
        )
        statuses = sorted(r[0] for r in results)
        section.check("exactly one 200 and one 402", statuses == [200, 402], statuses)
        await self.settled(account, 1)
        detail = await self.client.admin("GET", f"/accounts/{account.id}")
        for name in ("balanceMillicredits", "availableMillicredits"):
            section.check(f"{name} never below zero", int(detail[name]) >= 0, detail[name])
        section.check(
            "no shortfall", detail["shortfallMillicredits"] == "0", detail["shortfallMillicredits"]
        )

    async def rate_snapshots(self, section: Section) -> None:
        assert self.main is not None
        if not self.calls:
            await self.charges(Section("calls before the change"))
        old = (await self.rate_cards())[self.rate_model]
        new_rates = {
            f"{side}CreditsPer1k": mc_to_credits(
                old[f"{side}MillicreditsPer1kTokens"] * 11 // 10 + 1
            )
            for side in ("input", "output")
        }
        publish = {
            "model": self.rate_model,
            "modelKind": old["modelKind"],
            "maxOutputTokens": old["maxOutputTokens"],
            "displayLabel": old["displayLabel"],
            "inputCreditsPer1kTokens": new_rates["inputCreditsPer1k"],
            "outputCreditsPer1kTokens": new_rates["outputCreditsPer1k"],
            "cachedInputCreditsPer1kTokens": old["cachedInputCreditsPer1kTokens"],
            "upstreamInputUsdPer1kTokens": old["upstreamInputUsdPer1kTokens"],
            "upstreamOutputUsdPer1kTokens": old["upstreamOutputUsdPer1kTokens"],
        }
        await self.client.admin("POST", "/rate-cards", publish)
        try:
            row = await self.call_at_rates(new_rates)
        finally:
            restore = {
                **publish,
                "inputCreditsPer1kTokens": old["inputCreditsPer1kTokens"],
                "outputCreditsPer1kTokens": old["outputCreditsPer1kTokens"],
            }
            await self.client.admin("POST", "/rate-cards", restore)
        section.check("a call after the change carries the new rates", row is not None, new_rates)
        rows = {
            r["requestId"]: r
            for r in await self.client.admin_all(f"/accounts/{self.main.id}/usage")
        }
        for request_id, _ in self.calls:
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
        restored = (await self.rate_cards())[self.rate_model]
        section.check(
            "original rates published back",
            (restored["inputCreditsPer1kTokens"], restored["outputCreditsPer1kTokens"])
            == (old["inputCreditsPer1kTokens"], old["outputCreditsPer1kTokens"]),
        )

    async def call_at_rates(self, rates: dict[str, str]) -> dict[str, Any] | None:
        """Calls until one is charged at ``rates`` (the gateway picks a new card up within
        moments); returns its usage row, None if none was within the settle timeout."""
        assert self.main is not None
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            status, headers, body = await self.client.chat(self.main.key, self.rate_model)
            if status != 200:
                raise QaError(f"call at the new rates answered {status}: {body}")
            rows = await self.settled(self.main, len(self.calls) + 1)
            row = {r["requestId"]: r for r in rows}.get(headers["x-request-id"])
            if row is None:
                raise QaError(f"no usage row for {headers['x-request-id']}")
            if (row["inputCreditsPer1kTokens"], row["outputCreditsPer1kTokens"]) == (
                rates["inputCreditsPer1k"],
                rates["outputCreditsPer1k"],
            ):
                return row
            self.calls.append((headers["x-request-id"], body["usage"]))  # still the old card
            await asyncio.sleep(_POLL_S)
        return None

    async def purchase(self, section: Section) -> None:
        assert self.main is not None
        status, _, me = await self.client.gateway("GET", "/api/billing/me", self.main.key)
        package = min(me["packages"], key=lambda p: int(p["priceMinorUnits"]))
        before = await self.client.admin("GET", f"/accounts/{self.main.id}")
        status, _, started = await self.client.gateway(
            "POST", "/api/billing/checkout", self.main.key, {"packageCode": package["code"]}
        )
        if not section.check(f"checkout of {package['code']} starts (201)", status == 201, status):
            return
        url = str(started["checkoutUrl"])
        async with self.client.http.get(url) as response:
            simulated = "Simulated Stripe" in await response.text()
        if not simulated:
            section.skip(
                f"real Stripe: open {url} and pay (test card 4242 4242 4242 4242), then resend the "
                "event (`stripe events resend evt_...`) and run the reconciliation section; the "
                "script pays only on the simulated Stripe"
            )
            return
        async with self.client.http.post(url + "/pay", allow_redirects=False) as response:
            section.check(
                "paid on the simulated Stripe's Checkout page",
                response.status == 303,
                response.status,
            )
        first = await self.purchase_entries(section, 1)
        await self.replay(section, url, str(started["checkoutSessionId"]))
        await asyncio.sleep(1.0)  # a duplicate would post now
        entries = await self.purchase_entries(section, 1)
        after = await self.client.admin("GET", f"/accounts/{self.main.id}")
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

    async def purchase_entries(self, section: Section, wanted: int) -> list[dict[str, Any]]:
        """The main account's purchase entries, once at least ``wanted`` are posted."""
        assert self.main is not None
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            entries = await self.client.admin_all(
                f"/accounts/{self.main.id}/ledger", entryType="purchase"
            )
            if len(entries) >= wanted or time.monotonic() > deadline:
                section.check(
                    "purchase fulfilled by the webhook", len(entries) >= wanted, len(entries)
                )
                return entries
            await asyncio.sleep(_POLL_S)

    async def replay(self, section: Section, checkout_url: str, session_id: str) -> None:
        """Deliver the session's ``checkout.session.completed`` again (the simulated Stripe's
        ``POST /v1/events/{id}/retry``, as ``stripe events resend``)."""
        key = self.options.stripe_api_key
        if key is None:
            section.skip(
                "webhook replay not checked: give --stripe-api-key (the simulated Stripe's key)"
            )
            return
        parts = urlsplit(checkout_url)
        base = f"{parts.scheme}://{parts.netloc}"
        headers = {"Authorization": f"Bearer {key}"}
        async with self.client.http.get(
            f"{base}/v1/events", params={"type": "checkout.session.completed"}, headers=headers
        ) as response:
            events = (await response.json())["data"] if response.status == 200 else []
        event = next((e for e in events if e["data"]["object"]["id"] == session_id), None)
        if not section.check("the completion event is listed", event is not None, session_id):
            return
        assert event is not None
        async with self.client.http.post(
            f"{base}/v1/events/{event['id']}/retry", headers=headers
        ) as response:
            section.check("the same event delivered again", response.status == 200, event["id"])

    async def credits_page(self, section: Section) -> None:
        assert self.main is not None
        await self.settled(self.main, len(self.calls))
        status, _, me = await self.client.gateway("GET", "/api/billing/me", self.main.key)
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
        detail = await self.client.admin("GET", f"/accounts/{self.main.id}")
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
        await self.check_ledger_sum(section, me["balanceMillicredits"])
        cards = await self.rate_cards()
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

    async def check_ledger_sum(self, section: Section, balance_mc: str) -> None:
        """The main account's ledger entries sum to ``balance_mc``."""
        assert self.main is not None
        entries = await self.client.admin_all(f"/accounts/{self.main.id}/ledger")
        total = sum(int(e["amountMillicredits"]) for e in entries)
        section.check(
            "ledger entries sum to the balance",
            str(total) == balance_mc,
            {"ledgerSumMillicredits": str(total), "balanceMillicredits": balance_mc},
        )

    async def account_ledger(self, section: Section) -> None:
        """Smoke: the call's usage row and its deduction entry agree; the ledger sums to the
        balance."""
        assert self.main is not None
        rows = await self.settled(self.main, len(self.calls))
        entries = await self.client.admin_all(
            f"/accounts/{self.main.id}/ledger", entryType="deduction"
        )
        deducted = {e["reference"]: -int(e["amountMillicredits"]) for e in entries}
        for row in rows:
            section.check(
                f"{row['requestId']}: deduction = usage charge",
                deducted.get(row["requestId"], 0) == int(row["chargedMillicredits"]),
            )
        detail = await self.client.admin("GET", f"/accounts/{self.main.id}")
        await self.check_ledger_sum(section, detail["balanceMillicredits"])

    async def reconciliation(self, section: Section) -> None:
        assert self.main is not None
        await self.settled(self.main, len(self.calls))
        run = await self.client.admin("POST", "/reconciliation-runs", {})
        failing = {k: v for k, v in run["mismatchCounts"].items() if v}
        section.check(
            "reconciliation run ok",
            run["ok"] is True,
            {"runId": run["id"], "mismatchCounts": failing, "mismatches": run["mismatches"][:5]},
        )
        detail = await self.client.admin("GET", f"/accounts/{self.main.id}")
        await self.check_ledger_sum(section, detail["balanceMillicredits"])

    async def samples(self, section: Section) -> None:
        assert self.main is not None
        status, _, me = await self.client.gateway("GET", "/api/billing/me", self.main.key)
        section.check("/api/billing/me answers 200", status == 200, status)
        ledger = await self.client.admin(
            "GET", f"/accounts/{self.main.id}/ledger", params={"limit": "1"}
        )
        usage = await self.client.admin(
            "GET", f"/accounts/{self.main.id}/usage", params={"limit": "1"}
        )
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
        section.check(
            "a billing summary, a ledger row and a usage row", all(section.samples.values())
        )

    def redacted_report(self) -> dict[str, Any]:
        """The report with every API key and the admin token cut to a prefix."""
        return _redact(self.report(), [a.key for a in self.accounts] + [self.options.admin_token])


async def run_qa(options: Options) -> dict[str, Any]:
    """One QA run against ``options.gateway`` and ``options.admin``; returns the report
    (keys redacted)."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        qa = QaRun(Client(http, options))
        await qa.run()
        return qa.redacted_report()


def summary_text(report: dict[str, Any]) -> str:
    """The report for people: one line per section, the failed checks under it, notes and
    samples."""
    lines = [
        f"creditgate qa {report['mode']} run {report['runId']} (rounding {report['roundingMode']}, "
        f"rate model {report['rateModel']}, accounts {report['accounts']})",
        "",
    ]
    for section in report["sections"]:
        passed = sum(1 for c in section["checks"] if c["ok"])
        lines.append(
            f"{section['status'].upper():5} {section['name']} "
            f"({passed}/{len(section['checks'])} checks)"
        )
        for check in section["checks"]:
            if not check["ok"]:
                detail = orjson.dumps(check["detail"]).decode()
                lines.append(f"      FAILED {check['name']}: {detail[:400]}")
        lines.extend(f"      note: {note}" for note in section.get("notes", []))
        for name, sample in section.get("samples", {}).items():
            lines.append(f"      {name}: {orjson.dumps(sample).decode()}")
    lines.append("")
    lines.append("RESULT: " + ("PASS" if report["ok"] else "FAIL: " + ", ".join(report["failed"])))
    return "\n".join(lines) + "\n"
