"""One ``creditgate qa`` run (``QaRun``): its throwaway accounts, its sections in order
(``money_sections``, ``purchase_sections``), the cleanup, and the report."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from creditgate.qa import money_sections, purchase_sections
from creditgate.qa.client import POLL_S, SETTLE_TIMEOUT_S, Account, Client, Options, QaError
from creditgate.qa.report import Section, redact

#: Credits of the main throwaway account: enough for every call of a run.
START_CREDITS = "200"

#: A section: it checks one item of the checklist on the run's accounts into its ``Section``.
SectionBody = Callable[["QaRun", Section], Awaitable[None]]


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

    async def section(self, name: str, body: SectionBody) -> Section:
        """Run one section; an exception fails it (the run goes on)."""
        section = Section(name)
        try:
            await body(self, section)
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
            await asyncio.sleep(POLL_S)

    async def rate_cards(self) -> dict[str, dict[str, Any]]:
        """The rate cards in force, by model."""
        cards = (await self.client.admin("GET", "/rate-cards"))["data"]
        return {card["model"]: card for card in cards if not card["scheduled"]}

    # -- the run -----------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Every section (``--smoke``: the T-0 subset), then clean up; returns the report."""
        try:
            setup = await self.section("setup", QaRun.setup)
            if setup.status != "fail":
                await self.sections_in_order()
        finally:
            await self.section("cleanup", QaRun.cleanup)
        return self.report()

    async def sections_in_order(self) -> None:
        plan: list[tuple[str, SectionBody]]
        if self.options.smoke:
            plan = [
                ("credits page", purchase_sections.credits_page),
                ("reference charges", money_sections.charges),
                ("402 body and link", money_sections.payment_required),
                ("stripe fulfilment exactly once", purchase_sections.purchase),
                ("account ledger", purchase_sections.account_ledger),
                ("samples", purchase_sections.samples),
            ]
        else:
            plan = [
                ("package totals", money_sections.packages),
                ("reference charges", money_sections.charges),
                ("402 body and link", money_sections.payment_required),
                ("concurrency: balance for one call", money_sections.concurrency),
                ("rate snapshots survive a rate change", money_sections.rate_snapshots),
                ("stripe fulfilment exactly once", purchase_sections.purchase),
                ("credits page", purchase_sections.credits_page),
                ("reconciliation", purchase_sections.reconciliation),
                ("samples", purchase_sections.samples),
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

    def redacted_report(self) -> dict[str, Any]:
        """The report with every API key and the admin token cut to a prefix."""
        return redact(self.report(), [a.key for a in self.accounts] + [self.options.admin_token])


async def run_qa(options: Options) -> dict[str, Any]:
    """One QA run against ``options.gateway`` and ``options.admin``; returns the report
    (keys redacted)."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        qa = QaRun(Client(http, options))
        await qa.run()
        return qa.redacted_report()
