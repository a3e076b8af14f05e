"""The browser harness itself: a purchase paid on the simulated Stripe's Checkout page, in
chromium, reaches the admin service as a signed webhook and grows the balance."""

from __future__ import annotations

from playwright.async_api import Page, expect

from tests.browser.conftest import LiveStack

STARTER_MC = 9_990_000


async def test_checkout_page_pay_sends_a_webhook_the_admin_service_applies(
    live: LiveStack, page: Page
) -> None:
    account = await live.create_account()
    async with live.http.post(
        live.url("/api/billing/checkout"),
        json={"packageCode": "starter"},
        headers={"Authorization": f"Bearer {account.key}"},
    ) as response:
        assert response.status == 201, await response.text()
        checkout = await response.json()
    assert checkout["checkoutUrl"] == (
        f"{live.stripe.base_url}/checkout/{checkout['checkoutSessionId']}"
    )

    await page.goto(checkout["checkoutUrl"])
    await expect(page.get_by_role("note")).to_have_text("Simulated Stripe: no real payment")
    await expect(page.locator(".amount")).to_have_text("9.99 USD")
    await expect(page.get_by_text("Starter: 9,990 credits")).to_be_visible()
    await page.get_by_role("button", name="Pay").click()
    await page.wait_for_url(live.url("/credits?**"))

    assert page.url == live.url(
        f"/credits?purchase={checkout['purchaseId']}&session_id={checkout['checkoutSessionId']}"
    )
    [delivery] = live.stripe.deliveries
    assert (delivery.event_type, delivery.attempts, delivery.delivered) == (
        "checkout.session.completed",
        [200],
        True,
    )
    stored = await live.gateway.pool.fetchrow(
        "SELECT event_type, outcome FROM stripe_events WHERE event_id = $1", delivery.event_id
    )
    assert (stored["event_type"], stored["outcome"]) == ("checkout.session.completed", "processed")
    assert await live.balance(account.account_id) == STARTER_MC
