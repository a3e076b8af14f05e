"""The Credits page in chromium against the live stack (tests/browser/conftest.py): signing in
by portal link and by key, the balance, the estimator, buying with the simulated Stripe (Pay:
pending, then the new balance; Cancel: the message), the usage table's filters, pages and CSV,
amounts beyond 2^53, accessibility (axe-core) and the README's screenshots.

A Content-Security-Policy violation or an uncaught script error fails any of these tests (the
``make_page`` fixture)."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Page, ViewportSize, expect

from billing.metering.pricing import charge_millicredits
from billing.metering.rate_cards import rate_cards_in_force
from billing.purchases.packages import get_package
from billing.purchases.purchase_records import attach_checkout_session, create_purchase
from tests.browser.conftest import BrowserAccount, LiveStack, PageErrors

PHONE_375: ViewportSize = {"width": 375, "height": 812}
STARTER_MC = 9_990_000
MAX_SAFE_INTEGER = 2**53 - 1


async def open_with_portal_link(
    live: LiveStack, page: Page, account: BrowserAccount, return_to: str | None = None
) -> None:
    """Open a portal link, confirm on its page (Continue), and wait for the signed-in page."""
    await page.goto(await live.portal_link(account.account_id, return_to))
    await page.get_by_role("button", name="Continue to your Credits page").click()
    await expect(page.locator("#account")).to_be_visible()
    await expect(page.locator("#sign-in")).to_be_hidden()


async def sign_in_with_key(page: Page, live: LiveStack, account: BrowserAccount, path: str) -> None:
    """Open ``path`` signed out and sign in with the account's key through the form."""
    await page.goto(live.url(path))
    await expect(page.locator("#sign-in")).to_be_visible()
    await page.get_by_label("API key").fill(account.key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#account")).to_be_visible()


def credits_2dp(amount_millicredits: int) -> str:
    cents = (amount_millicredits + 5) // 10
    return f"{cents // 100:,}.{cents % 100:02d}"


def credits_3dp(amount_millicredits: int) -> str:
    return f"{amount_millicredits // 1000:,}.{amount_millicredits % 1000:03d}"


async def test_portal_link_signs_in_and_shows_balance_rates_and_estimate(
    live: LiveStack, page: Page
) -> None:
    account = await live.create_account(1_234_567, email="portal-user@example.com")
    link = await live.portal_link(account.account_id)

    await page.goto(link)
    # The link's page names the account and signs in only on Continue (a POST).
    await expect(page.locator("#portal-email")).to_have_text("portal-user@example.com")
    await page.get_by_role("button", name="Continue to your Credits page").click()

    await expect(page.locator("#account")).to_be_visible()
    assert page.url == live.url("/credits")
    await expect(page.locator("#balance-credits")).to_have_text("1,234.57 Credits")
    await expect(page.locator("#balance-usd")).to_have_text("~$1.23 USD")
    await expect(page.get_by_text("USD equivalent is approximate")).to_be_visible()
    await expect(page.locator("#available-credits")).to_have_text("1,234.57 Credits")
    await expect(page.locator("#held-credits")).to_have_text("0.00 Credits")
    # Under the default threshold (500 credits)? No: 1,234 credits is above it.
    await expect(page.locator("#banner-low-balance")).to_be_hidden()
    await expect(page.locator("#banner-charging-paused")).to_be_hidden()

    # Packages: badges from the packages table, savings against Starter.
    professional = page.locator('li.package[data-code="professional"]')
    await expect(professional.locator(".badge")).to_have_text("Best for frequent use")
    await expect(professional.locator(".total")).to_have_text("52,490 Credits")
    await expect(professional.locator(".bonus")).to_have_text("includes 2,500 bonus credits")
    await expect(professional.locator(".savings")).to_contain_text("vs Starter")
    enterprise = page.locator('li.package[data-code="enterprise"]')
    await expect(enterprise.locator(".badge")).to_have_text("Best value")
    await expect(page.locator('li.package[data-code="starter"] .badge')).to_have_count(0)
    await expect(page.get_by_role("button", name="Buy Starter for $9.99")).to_be_enabled()

    # Rate card: label and id, and the worked example from gpt-4o's current rates.
    rates = page.locator("#rates-table")
    await expect(rates).to_contain_text("Eco (gpt-4o-mini)")
    await expect(rates).to_contain_text("Advanced (gpt-4o)")
    await expect(page.get_by_text("We only charge for actual token usage.")).to_be_visible()
    card = (await rate_cards_in_force(live.gateway.pool))["gpt-4o"]
    example = charge_millicredits(card, prompt_tokens=2_000, completion_tokens=1_000)
    await expect(page.locator("#rates-example")).to_contain_text(
        f"= {credits_3dp(example)} Credits"
    )

    # The estimator: gpt-4o, 1,000 input and 500 output tokens, priced by the server.
    await page.locator("#estimate-model").select_option("gpt-4o")
    await page.get_by_label("Input tokens").fill("1000")
    await page.get_by_label("Output tokens").fill("500")
    await page.get_by_role("button", name="Estimate").click()
    expected = charge_millicredits(card, prompt_tokens=1_000, completion_tokens=500)
    await expect(page.locator("#estimate-result")).to_have_text(
        f"gpt-4o: 1,000 input and 500 output tokens ≈ {credits_3dp(expected)} Credits "
        f"(~${expected / 1_000_000:.4f} USD)."
    )

    # Text instead of tokens: counted by the gateway's tokenizer.
    await page.get_by_label("Or paste text (counted as input)").fill("Hello there, world")
    await page.get_by_role("button", name="Estimate").click()
    await expect(page.locator("#estimate-result")).not_to_contain_text("1,000 input")

    await expect(page.locator("#faq-expiry")).to_have_text("Credits do not expire.")
    # The link was single use: a second visit shows the expired page.
    response = await page.goto(link)
    assert response is not None and response.status == 410
    await expect(
        page.get_by_text("This link has expired or was already used").first
    ).to_be_visible()


async def test_key_sign_in_stores_nothing_and_sign_out_ends_the_session(
    live: LiveStack, page: Page
) -> None:
    account = await live.create_account(100_000)

    await sign_in_with_key(page, live, account, "/credits")

    await expect(page.locator("#api-key")).to_have_value("")
    await expect(page.locator("#balance-credits")).to_have_text("100.00 Credits")
    # Under 500 credits: the low-balance banner, whose button leads to the packages.
    await expect(page.locator("#banner-low-balance")).to_contain_text("below 500 credits")
    await page.get_by_role("button", name="Add credits").click()
    await expect(page.get_by_role("button", name="Buy Starter for $9.99")).to_be_focused()
    stored = await page.evaluate(
        "() => [localStorage.length, sessionStorage.length, document.cookie]"
    )
    assert stored == [0, 0, ""]
    cookies = await page.context.cookies()
    assert [(c["path"], c["httpOnly"]) for c in cookies] == [("/api/billing", True)]
    assert all(account.key not in c["value"] for c in cookies)

    await page.get_by_role("button", name="Sign out").click()

    await expect(page.locator("#sign-in")).to_be_visible()
    await expect(page.locator("#account")).to_be_hidden()
    await page.reload()
    await expect(page.locator("#sign-in")).to_be_visible()


async def test_wrong_key_is_refused_politely(live: LiveStack, page: Page) -> None:
    await page.goto(live.url("/credits"))
    await page.get_by_label("API key").fill("sk-not-a-key")
    await page.get_by_role("button", name="Sign in").click()

    await expect(page.locator("#sign-in-error")).to_have_text(
        "That API key was not accepted. Check it and try again."
    )
    await expect(page.locator("#api-key")).to_have_value("")
    await expect(page.locator("#account")).to_be_hidden()


async def test_buying_shows_pending_then_the_new_balance_and_returns_to_the_app(
    live: LiveStack, page: Page
) -> None:
    live.stripe.async_settle_delay_s = 2.0  # a bank debit: "pending" until it settles
    account = await live.create_account()

    # The portal link leads to the page, which carries the app's returnTo.
    await open_with_portal_link(
        live, page, account, return_to="/credits?returnTo=%2Fapp%2Fhome%3Ftab%3Dusage"
    )
    await expect(page.locator("#return-to")).to_have_attribute("href", "/app/home?tab=usage")
    await page.get_by_role("button", name="Buy Starter for $9.99").click()
    await page.wait_for_url(f"{live.stripe.base_url}/checkout/**")
    await page.get_by_role("button", name="Pay").click()
    await page.wait_for_url(live.url("/credits?**"))

    notice = page.locator("#purchase-notice")
    await expect(notice).to_have_attribute("data-status", "processing")
    await expect(notice).to_contain_text("Purchase pending")
    await expect(notice).to_have_attribute("data-status", "paid")
    await expect(notice).to_contain_text("Payment received. 9,990.00 credits were added")
    await expect(page.locator("#purchase-balance")).to_have_text(
        "Your new balance is 9,990.00 Credits."
    )
    await expect(page.locator("#balance-credits")).to_have_text("9,990.00 Credits")
    assert await live.balance(account.account_id) == STARTER_MC
    # The purchase's returnTo came back with it.
    await expect(page.get_by_role("link", name="Return to app")).to_have_attribute(
        "href", "/app/home?tab=usage"
    )
    # The ledger: the purchase with its receipt; its balance after is the balance above.
    first = page.locator("#ledger-table tbody tr").first
    await expect(first).to_contain_text("Purchase")
    await expect(first.locator("td").nth(3)).to_have_text("9,990.000")
    await expect(first.get_by_role("link", name="Receipt")).to_have_attribute(
        "href", first_receipt(live)
    )


def first_receipt(live: LiveStack) -> str:
    [charge] = live.stripe.charges.values()
    return str(charge["receipt_url"])


async def test_cancelled_checkout_says_nothing_was_charged(live: LiveStack, page: Page) -> None:
    account = await live.create_account(50_000_000)
    await open_with_portal_link(live, page, account)

    await page.get_by_role("button", name="Buy Professional for $49.99").click()
    await page.wait_for_url(f"{live.stripe.base_url}/checkout/**")
    await page.get_by_role("button", name="Cancel").click()
    await page.wait_for_url(live.url("/credits?**checkout=cancelled"))

    notice = page.locator("#purchase-notice")
    await expect(notice).to_have_text(
        "Checkout was cancelled. You have not been charged and no credits were added. "
        "You can buy credits whenever you like."
    )
    await expect(page.locator("#balance-credits")).to_have_text("50,000.00 Credits")
    assert await live.balance(account.account_id) == 50_000_000


async def test_usage_table_filters_pages_details_and_csv(live: LiveStack, page: Page) -> None:
    account = await live.create_account(1_000_000_000)
    start = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    for n in range(26):
        await live.insert_usage(
            account, model="gpt-4o-mini", started_at=start + timedelta(minutes=n)
        )
    charged = [
        await live.insert_usage(
            account,
            model="gpt-4o",
            input_tokens=1_200 + n,
            output_tokens=300,
            started_at=start + timedelta(days=1, minutes=n),
            request_id=f"req_browser_{n}",
        )
        for n in range(2)
    ]
    await open_with_portal_link(live, page, account)
    rows = page.locator("#usage-table tbody tr")

    # Newest first, 25 a page; the next page has the rest.
    await expect(rows).to_have_count(25)
    await expect(rows.first).to_contain_text("gpt-4o")
    await page.get_by_role("button", name="Next page").first.click()
    await expect(rows).to_have_count(3)
    await expect(page.locator("#usage-page")).to_have_text("Page 2")
    await page.locator("#usage-prev").click()
    await expect(rows).to_have_count(25)

    # Filter by model: two rows.
    await page.locator("#usage-model").select_option("gpt-4o")
    await page.locator("#usage-filters").get_by_role("button", name="Apply filters").click()
    await expect(rows).to_have_count(2)
    await expect(page.locator("#usage-next")).to_be_disabled()
    await expect(rows.first.locator("td").nth(4)).to_have_text(credits_3dp(charged[1]))

    # Row details in a dialog, closed with Escape.
    await rows.first.get_by_role("button").click()
    dialog = page.locator("#detail-dialog")
    await expect(dialog).to_be_visible()
    await expect(dialog).to_contain_text("req_browser_1")
    await expect(dialog).to_contain_text("1,201")
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()

    # The CSV link carries the same filters; the file parses back to the two rows.
    async with page.expect_download() as info:
        await page.locator("#usage-csv").click()
    download = await info.value
    path = await download.path()
    table = list(csv.DictReader(io.StringIO(await asyncio.to_thread(Path(path).read_text))))
    assert [(r["model"], r["request_id"]) for r in table] == [
        ("gpt-4o", "req_browser_1"),
        ("gpt-4o", "req_browser_0"),
    ]
    assert [int(r["charged_millicredits"]) for r in table] == charged[::-1]
    assert download.suggested_filename.endswith(".csv")

    # The ledger filters by type: the one adjustment among 28 usage charges.
    ledger = page.locator("#ledger-table tbody tr")
    await expect(ledger).to_have_count(25)
    await page.locator("#ledger-type").select_option("adjustment")
    await page.locator("#ledger-filters").get_by_role("button", name="Apply filters").click()
    await expect(ledger).to_have_count(1)
    await expect(ledger.first.locator("td").nth(2)).to_have_text("1,000,000.000")
    await expect(page.locator("#ledger-csv")).to_have_attribute(
        "href", "/api/billing/ledger?type=adjustment&format=csv"
    )

    # A date range that holds only the gpt-4o-mini day.
    await page.locator("#usage-model").select_option("")
    await page.locator("#usage-since").fill("2026-11-02")
    await page.locator("#usage-until").fill("2026-11-03")
    await page.locator("#usage-filters").get_by_role("button", name="Apply filters").click()
    await expect(rows.first).to_contain_text("gpt-4o-mini")
    await expect(page.locator("#usage-next")).to_be_enabled()


async def test_amount_beyond_2_53_millicredits_is_shown_exactly(
    live: LiveStack, page: Page
) -> None:
    balance = MAX_SAFE_INTEGER + 2  # 9,007,199,254,740,993: not a float
    account = await live.create_account(balance)

    await open_with_portal_link(live, page, account)

    await expect(page.locator("#balance-credits")).to_have_text(f"{credits_2dp(balance)} Credits")
    assert credits_2dp(balance) == "9,007,199,254,740.99"
    await expect(page.locator("#ledger-table tbody tr").first.locator("td").nth(3)).to_have_text(
        "9,007,199,254,740.993"
    )


async def test_accessibility_has_no_serious_violations(
    live: LiveStack, make_page: Callable[..., Awaitable[Page]], page_errors: PageErrors
) -> None:
    account = await live.create_account(2_000_000)
    await live.insert_usage(account, model="gpt-4o")
    signed_out = await make_page()
    await signed_out.goto(live.url("/credits"))
    await expect(signed_out.locator("#sign-in")).to_be_visible()
    page = await make_page()
    await open_with_portal_link(live, page, account)
    await expect(page.locator("#usage-table tbody tr")).to_have_count(1)

    # Phone width, signed in: the rate card stacks (no sideways scrolling); scroll regions
    # that remain (usage, ledger) are focusable.
    phone = await make_page(viewport=PHONE_375)
    await open_with_portal_link(live, phone, account)
    await expect(phone.locator("#usage-table tbody tr")).to_have_count(1)
    await expect(phone.locator("#rates-table tbody tr").first).to_be_visible()
    rates_overflow = await phone.evaluate(
        "() => { const r = document.querySelector('#rates .table-scroll');"
        " return r.scrollWidth - r.clientWidth; }"
    )
    assert rates_overflow <= 0
    await expect(phone.locator("#rates-table td[data-label]").first).to_be_visible()

    for checked in (signed_out, page, phone):
        results = await Axe().run(checked)
        serious = [
            (v["id"], [n["target"] for n in v["nodes"]])
            for v in results.response["violations"]
            if v["impact"] in ("serious", "critical")
        ]
        assert serious == [], checked.viewport_size
    # Keyboard: the skip link is the first stop and leads to the main landmark.
    await page.keyboard.press("Tab")
    await expect(page.locator(".skip-link")).to_be_focused()
    assert page_errors.csp_violations == []


async def test_screenshots_at_desktop_and_phone_width(
    live: LiveStack, make_page: Callable[..., Awaitable[Page]], screenshots: Path
) -> None:
    account = await live.create_account(412_345_678, email="ada@example.com")
    start = datetime.now(UTC) - timedelta(hours=3)
    for n, model in enumerate(["gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o"]):
        await live.insert_usage(account, model=model, started_at=start + timedelta(minutes=7 * n))
    for name, viewport in (("credits-desktop.png", None), ("credits-phone.png", PHONE_375)):
        page = await (make_page(viewport=viewport) if viewport else make_page())
        await open_with_portal_link(live, page, account)
        await expect(page.locator("#usage-table tbody tr")).to_have_count(4)
        await page.screenshot(path=screenshots / name, full_page=True)
        width = await page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= (viewport or {"width": 1280})["width"]  # no sideways scrolling


async def test_monthly_statement_downloads_as_csv_and_pdf(live: LiveStack, page: Page) -> None:
    account = await live.create_account(5_000_000)
    charged = await live.insert_usage(account, model="gpt-4o")
    month = datetime.now(UTC).strftime("%Y-%m")
    await open_with_portal_link(live, page, account)
    await expect(page.locator("#statement-month")).to_have_value(month)

    async with page.expect_download() as info:
        await page.get_by_role("link", name="Download statement CSV").click()
    download = await info.value
    assert download.suggested_filename == f"statement-{month}.csv"
    text = await asyncio.to_thread(Path(await download.path()).read_text)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["item"], int(r["millicredits"])) for r in rows if r["section"] == "usage"] == [
        ("gpt-4o", charged)
    ]

    async with page.expect_download() as info:
        await page.get_by_role("link", name="Download statement PDF").click()
    download = await info.value
    assert download.suggested_filename == f"statement-{month}.pdf"
    assert (await asyncio.to_thread(Path(await download.path()).read_bytes)).startswith(b"%PDF")


async def set_flag(live: LiveStack, name: str, value: object) -> None:
    async with live.http.put(
        f"{live.admin_url}/admin/v1/flags/{name}",
        json={"value": value},
        headers={"Authorization": f"Bearer {live.admin_token}"},
    ) as response:
        assert response.status == 200, await response.text()


async def me_of(live: LiveStack, account: BrowserAccount) -> dict[str, object]:
    async with live.http.get(
        live.url("/api/billing/me"), headers={"Authorization": f"Bearer {account.key}"}
    ) as response:
        assert response.status == 200, await response.text()
        body: dict[str, object] = await response.json()
        return body


async def test_purchases_off_disables_buying_and_paused_charging_is_announced(
    live: LiveStack, page: Page
) -> None:
    account = await live.create_account(9_000_000)
    await set_flag(live, "billing.purchase_enabled", False)
    await set_flag(live, "billing.charging_enabled", False)
    # The gateway hears of the change through its control listener.
    for _ in range(100):
        me = await me_of(live, account)
        if not me["purchasesEnabled"] and me["chargingPaused"]:
            break
        await asyncio.sleep(0.1)

    await open_with_portal_link(live, page, account)

    await expect(page.locator("#purchases-off")).to_be_visible()
    await expect(page.locator("button.buy")).to_have_count(3)
    for button in await page.locator("button.buy").all():
        await expect(button).to_be_disabled()
    await expect(page.locator("#banner-charging-paused")).to_contain_text("Charging is paused")
    await expect(page.locator("#banner-low-balance")).to_be_hidden()


async def test_held_credits_show_beside_the_available_balance(live: LiveStack, page: Page) -> None:
    account = await live.create_account(100_000)
    await live.gateway.holds.reserve(account.account_id, 25_500, request_id="req_in_flight")

    await open_with_portal_link(live, page, account)

    await expect(page.locator("#balance-credits")).to_have_text("100.00 Credits")
    await expect(page.locator("#held-credits")).to_have_text("25.50 Credits")
    await expect(page.locator("#available-credits")).to_have_text("74.50 Credits")


async def started_purchase(live: LiveStack, account: BrowserAccount) -> str:
    """A pending Starter purchase of the account with a Checkout Session; its public id."""
    async with live.gateway.pool.acquire() as conn:
        purchase = await create_purchase(
            conn,
            account_id=account.account_id,
            package=await get_package(conn, "starter"),
            return_path="/app/private",
        )
        await attach_checkout_session(
            conn, purchase.id, checkout_session_id="cs_test_private", checkout_url="https://x.test"
        )
    return purchase.public_id


async def test_a_purchase_is_shown_only_to_its_own_account(
    live: LiveStack, make_page: Callable[..., Awaitable[Page]]
) -> None:
    owner = await live.create_account(1_000_000)
    other = await live.create_account(2_000_000)
    public_id = await started_purchase(live, owner)
    path = f"/credits?purchase={public_id}"

    # Signed out, and signed in to another account: nothing about the purchase.
    anonymous = await make_page()
    await anonymous.goto(live.url(path))
    await expect(anonymous.locator("#sign-in")).to_be_visible()
    stranger = await make_page()
    await sign_in_with_key(stranger, live, other, path)
    await expect(stranger.locator("#balance-credits")).to_have_text("2,000.00 Credits")
    for page in (anonymous, stranger):
        await expect(page.locator("#purchase-notice")).to_be_hidden()
        await expect(page.locator("#purchase-text")).to_have_text("")
        await expect(page.locator("#return-to")).to_have_count(0)
        await expect(page.locator("#purchase-notice")).to_have_text("")
        assert "/app/private" not in await page.content()

    # Its owner (the session cookie reaches the API): the purchase's status.
    mine = await make_page()
    await sign_in_with_key(mine, live, owner, path)
    await expect(mine.locator("#purchase-notice")).to_be_visible()
    await expect(mine.locator("#purchase-text")).to_have_text(
        "This purchase has not been paid yet."
    )


async def test_estimator_refuses_counts_that_are_not_whole_numbers(
    live: LiveStack, page: Page
) -> None:
    account = await live.create_account(1_000_000)
    estimates: list[str] = []
    page.on(
        "request",
        lambda request: estimates.append(request.url) if "/estimate" in request.url else None,
    )
    await open_with_portal_link(live, page, account)
    field = page.get_by_label("Input tokens")
    error = page.locator("#estimate-input-error")

    for bad in ("-5", "1.5", "1e3", ""):
        await field.fill(bad)
        await page.get_by_role("button", name="Estimate").click()
        await expect(error).to_have_text(
            "Enter a whole number of tokens, 0 or more, in digits only "
            "(no sign, decimals or exponent)."
        )
        await expect(field).to_have_attribute("aria-invalid", "true")
        await expect(field).to_be_focused()
        await expect(page.locator("#estimate-result")).to_have_text("")
    await field.fill("2000000000")
    await page.get_by_role("button", name="Estimate").click()
    await expect(error).to_have_text("Enter at most 1,000,000,000 tokens.")
    assert estimates == []

    await field.fill("1000")
    await page.get_by_role("button", name="Estimate").click()
    await expect(page.locator("#estimate-result")).to_contain_text("1,000 input")
    await expect(error).to_be_hidden()
    assert len(estimates) == 1


async def test_date_range_is_checked_in_the_page_words(live: LiveStack, page: Page) -> None:
    account = await live.create_account(1_000_000)
    await open_with_portal_link(live, page, account)
    await expect(page.locator("#usage-csv")).to_have_attribute(
        "href", "/api/billing/usage?format=csv"
    )
    asked: list[str] = []
    page.on(
        "request", lambda request: asked.append(request.url) if "since=" in request.url else None
    )

    for name in ("usage", "ledger"):
        await page.locator(f"#{name}-since").fill("2026-11-03")
        await page.locator(f"#{name}-until").fill("2026-11-02")
        await page.locator(f"#{name}-filters").get_by_role("button", name="Apply filters").click()
        await expect(page.locator(f"#{name}-range-error")).to_have_text(
            "The “From” date must be earlier than the “To” date."
        )
        await expect(page.locator(f"#{name}-csv")).not_to_have_attribute("href", re.compile(".*"))
        await expect(page.locator("#page-error")).to_be_hidden()
    assert asked == []

    await page.locator("#usage-until").fill("2026-11-04")
    await page.locator("#usage-filters").get_by_role("button", name="Apply filters").click()
    await expect(page.locator("#usage-range-error")).to_be_hidden()
    await expect(page.locator("#usage-csv")).to_have_attribute(
        "href", "/api/billing/usage?since=2026-11-03&until=2026-11-04&format=csv"
    )
    await expect(page.locator("#usage-empty")).to_be_visible()
