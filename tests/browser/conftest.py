"""Browser tests: the whole stack live on loopback ports, driven by Playwright's chromium.

- ``live``: a :class:`LiveStack`: the gateway and the admin service served by real aiohttp
  servers on free loopback ports, wired to this test's Postgres database and Redis
  (``tests/conftest.py``), the simulated upstream, and the simulated Stripe
  (``devtools.stripe_sim``), whose Checkout page posts signed webhooks to the admin service.
  ``PUBLIC_BASE_URL`` is the gateway's real URL, so Stripe's redirects land on it.
  Helpers: ``create_account``, ``portal_link``, ``insert_usage``, ``balance``, ``url``.
- ``browser``: Debian's ``chromium`` (found on PATH; Playwright's own browser downloads are not
  used), headless, one per test (pytest-asyncio's loops are per test).
- ``make_page(viewport)`` / ``page`` (desktop width): a page in a fresh browser context, its
  console errors, uncaught exceptions and Content-Security-Policy violations captured in
  ``page_errors``; a CSP violation or an uncaught exception fails the test at teardown.
- ``screenshots``: ``docs/screenshots/``, where tests write the README's screenshots.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, ConsoleMessage, Page, ViewportSize, async_playwright

from admin_api.app import create_admin_app
from admin_api.stripe_webhook import WEBHOOK_PATH
from billing import api_keys, ledger
from billing.admin_tokens import Role, create_admin_token
from billing.audit import CLI_ACTOR
from billing.metering import outbox, posting
from billing.metering.pricing import charge_millicredits
from billing.metering.rate_cards import rate_cards_in_force
from billing.purchases.fulfilment import publish_balance
from devtools.localservices import free_port
from devtools.simulator import Simulator
from devtools.stripe_sim import TEST_API_KEY, WEBHOOK_SECRET, StripeStub
from tests.harness import GatewayHarness

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS_DIR = REPO_ROOT / "docs" / "screenshots"
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
#: Playwright's wait for a selector, navigation or expectation (ms); generous for 2 busy cores.
DEFAULT_TIMEOUT_MS = 15_000
#: The simulated Stripe's webhook retries in a test: quick, and a few.
WEBHOOK_RETRY_DELAYS_S = (0.2, 0.5, 1.0)


class BrowserAccount(NamedTuple):
    """An account made for a browser test, with one API key."""

    account_id: int
    key: str
    key_id: int


@dataclass
class LiveStack:
    """The running stack of one test, and helpers to set up what a page shows.

    Attributes:
        base_url: the gateway's origin (``PUBLIC_BASE_URL``), e.g. ``http://127.0.0.1:40123``.
        admin_url: the admin service's origin.
        admin_token: an admin-role token for the admin API.
        stripe: the simulated Stripe (its sessions, ``deliveries`` of webhooks).
        gateway: the in-process gateway (``pool``, ``redis``, ``holds``, ``settings``).
        sim: the simulated upstream.
        http: an aiohttp client session for calls a test makes itself.
    """

    base_url: str
    admin_url: str
    admin_token: str
    stripe: StripeStub
    gateway: GatewayHarness
    sim: Simulator
    http: aiohttp.ClientSession = field(repr=False)

    def url(self, path: str) -> str:
        """An absolute URL on the gateway for ``path`` (``/credits?...``)."""
        return self.base_url + path

    async def create_account(
        self, credits_millicredits: int = 0, *, email: str | None = None
    ) -> BrowserAccount:
        """A new account (a unique email unless given) granted ``credits_millicredits`` by an
        ``adjustment`` entry, with one API key."""
        email = email or f"{uuid.uuid4().hex[:12]}@example.com"
        async with self.gateway.pool.acquire() as conn:
            account_id = await ledger.create_account(conn, email)
            if credits_millicredits:
                result = await ledger.post_entry(
                    conn,
                    account_id=account_id,
                    entry_type="adjustment",
                    amount_millicredits=credits_millicredits,
                    idempotency_key=f"browser-grant:{uuid.uuid4()}",
                )
                await publish_balance(self.gateway.holds, account_id, result.posted)
            key, record = await api_keys.create_api_key(conn, account_id, name="browser")
        return BrowserAccount(account_id, key, record.id)

    async def portal_link(self, account_id: int, return_to: str | None = None) -> str:
        """A single-use portal link for the account, from the admin API
        (``POST /admin/v1/accounts/{id}/portal-sessions``)."""
        body: dict[str, Any] = {} if return_to is None else {"returnTo": return_to}
        async with self.http.post(
            f"{self.admin_url}/admin/v1/accounts/{account_id}/portal-sessions",
            json=body,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        ) as response:
            text = await response.text()
            assert response.status == 201, f"portal-sessions answered {response.status}: {text}"
            url: str = (await response.json())["url"]
        return url

    async def insert_usage(
        self,
        account: BrowserAccount,
        *,
        model: str = "gpt-4o-mini",
        input_tokens: int = 1_000,
        cached_input_tokens: int = 0,
        output_tokens: int = 500,
        started_at: datetime | None = None,
        request_id: str | None = None,
        usage_source: str = "upstream",
    ) -> int:
        """One settled request of ``account``'s key, posted as the settlement poster posts
        it (a usage event and its deduction, priced by the rate card in force); returns the
        charge in millicredits (capped by the balance, as settlement caps it)."""
        cards = await rate_cards_in_force(self.gateway.pool)
        card = cards[model]
        cost = charge_millicredits(
            card,
            prompt_tokens=input_tokens,
            completion_tokens=output_tokens,
            cached_tokens=cached_input_tokens,
        )
        started_ms = int((started_at or datetime.now(UTC)).timestamp() * 1000)
        record = outbox.SettlementRecord(
            request_id=request_id or f"req_{uuid.uuid4().hex}",
            account_id=account.account_id,
            api_key_id=account.key_id,
            model=model,
            endpoint="chat.completions",
            prompt_tokens=input_tokens,
            cached_tokens=cached_input_tokens,
            completion_tokens=output_tokens,
            rate_card_id=card.id,
            input_millicredits_per_1k_tokens=card.input_millicredits_per_1k_tokens,
            cached_input_millicredits_per_1k_tokens=card.cached_rate,
            output_millicredits_per_1k_tokens=card.output_millicredits_per_1k_tokens,
            rounding_mode="exact",
            cost_millicredits=cost,
            hold_millicredits=0,
            usage_source=usage_source,
            status="completed",
            started_at_ms=started_ms,
            finished_at_ms=started_ms + 1_500,
            upstream_latency_ms=1_200,
        )
        row = outbox.posting_row(record.to_json(), charged_millicredits=cost)
        async with self.gateway.pool.acquire() as conn:
            [result] = await posting.post_settlements(conn, f"[{row}]")
        await publish_balance(self.gateway.holds, account.account_id, result.balance)
        return result.charged_millicredits

    async def balance(self, account_id: int) -> int:
        """The account's posted balance in Postgres (millicredits)."""
        return await self.gateway.balance(account_id)


@pytest.fixture
async def live(make_gateway: Any, sim: Simulator) -> AsyncIterator[LiveStack]:
    """The gateway, the admin service, the simulated Stripe and upstream, all listening."""
    gateway_port, admin_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{gateway_port}"
    admin_url = f"http://127.0.0.1:{admin_port}"
    stripe = StripeStub(
        webhook_url=admin_url + WEBHOOK_PATH,
        webhook_secret=WEBHOOK_SECRET,
        retry_delays_s=WEBHOOK_RETRY_DELAYS_S,
    )
    await stripe.start()
    gateway: GatewayHarness = await make_gateway(
        port=gateway_port,
        admin_port=admin_port,
        public_base_url=base_url,
        stripe_api_key=TEST_API_KEY,
        stripe_webhook_secrets=(WEBHOOK_SECRET,),
        stripe_api_base=stripe.base_url,
    )
    admin = web.AppRunner(
        create_admin_app(gateway.settings),
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=1,
    )
    await admin.setup()
    await web.TCPSite(admin, "127.0.0.1", admin_port).start()
    async with gateway.pool.acquire() as conn:
        admin_token, _ = await create_admin_token(
            conn, CLI_ACTOR, role=Role.ADMIN, name="browser-tests"
        )
    http = aiohttp.ClientSession()
    try:
        yield LiveStack(base_url, admin_url, admin_token, stripe, gateway, sim, http)
    finally:
        await http.close()
        await stripe.stop()  # first: no webhook retry outlives the admin service
        await admin.cleanup()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium, headless, driven by Playwright."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(
            "chromium is not on PATH: the browser tests drive the system's chromium "
            "(Playwright's browser downloads are not used). Install it: `make system-deps`.",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox"], headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class PageErrors:
    """What the pages of one test reported.

    Attributes:
        console_errors: console messages of type ``error`` that are not CSP violations (a
            failed fetch's 401 shows here too: tests decide what they expect).
        csp_violations: console reports of Content-Security-Policy violations.
        uncaught: uncaught JavaScript exceptions.
    """

    console_errors: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    uncaught: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        """Start recording ``page``'s errors."""
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.uncaught.append(str(error)))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        if "Content Security Policy" in message.text:
            self.csp_violations.append(message.text)
        else:
            self.console_errors.append(f"{message.text} ({message.location.get('url')})")


@pytest.fixture
def page_errors() -> PageErrors:
    return PageErrors()


@pytest.fixture
async def make_page(
    browser: Browser, page_errors: PageErrors
) -> AsyncIterator[Callable[..., Awaitable[Page]]]:
    """Factory: ``await make_page(viewport=PHONE)`` opens a page in a fresh context (its own
    cookies); every page's errors go to ``page_errors``. A CSP violation or an uncaught
    exception on any of them fails the test when it ends."""
    contexts = []

    async def make(viewport: ViewportSize = DESKTOP, **context_options: Any) -> Page:
        context = await browser.new_context(viewport=viewport, **context_options)
        context.set_default_timeout(DEFAULT_TIMEOUT_MS)
        contexts.append(context)
        page = await context.new_page()
        page_errors.watch(page)
        return page

    yield make
    for context in contexts:
        await context.close()
    assert not page_errors.csp_violations, f"CSP violations: {page_errors.csp_violations}"
    assert not page_errors.uncaught, f"uncaught JavaScript errors: {page_errors.uncaught}"


@pytest.fixture
async def page(make_page: Callable[..., Awaitable[Page]]) -> Page:
    """A desktop-width page."""
    return await make_page()


@pytest.fixture
def screenshots() -> Path:
    """``docs/screenshots/`` (created if missing): the README links the files written here."""
    SCREENSHOTS_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS_DIR
