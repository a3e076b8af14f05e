"""Buying credits end to end: the gateway's purchase endpoint and return page, the admin
service's webhook, the official Stripe client against the local stand-in, real Postgres
and Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from admin_api.app import create_admin_app
from billing import api_keys, ledger
from billing.admin_tokens import Role, create_admin_token
from billing.audit import CLI_ACTOR
from devtools.stripe_sim import TEST_API_KEY, WEBHOOK_SECRET, StripeStub, event_body, sign
from gateway.app import create_app
from runtime import appkeys
from runtime.settings import Settings

STARTER_MC = 9_990_000
PUBLIC_BASE_URL = "http://gateway.test"


class Shop:
    """The gateway and admin service, a buyer with an API key, and Stripe's side."""

    def __init__(self, gateway: TestClient, admin: TestClient, stub: StripeStub) -> None:
        self.gateway = gateway
        self.admin = admin
        self.stub = stub
        self.pool: asyncpg.Pool = gateway.app[appkeys.DB_POOL]
        self.account_id = 0
        self.key = ""

    async def add_buyer(self) -> tuple[int, str]:
        async with self.pool.acquire() as conn:
            account_id = await ledger.create_account(conn, f"{time.monotonic_ns()}@example.com")
            key, _ = await api_keys.create_api_key(conn, account_id, name="buyer")
        return account_id, key

    async def buy(self, body: dict[str, Any], key: str | None = None):
        return await self.gateway.post(
            "/api/billing/checkout",
            json=body,
            headers={"Authorization": f"Bearer {key or self.key}"},
        )

    async def started(self, code: str = "starter", **extra: Any) -> dict[str, Any]:
        response = await self.buy({"packageCode": code, **extra})
        assert response.status == 201, await response.text()
        return await response.json()

    def success_path(self, checkout: dict[str, Any]) -> str:
        """The success URL Stripe redirects to, as a path on the gateway."""
        session = self.stub.sessions[checkout["checkoutSessionId"]]
        url = session["success_url"].replace("{CHECKOUT_SESSION_ID}", session["id"])
        assert url.startswith(PUBLIC_BASE_URL + "/credits?")
        parts = urlsplit(url)
        return f"{parts.path}?{parts.query}"

    async def page(self, path: str) -> tuple[int, str]:
        response = await self.gateway.get(path)
        return response.status, await response.text()

    async def webhook(self, event: dict[str, Any]):
        payload = event_body(event)
        return await self.admin.post(
            "/stripe/webhook",
            data=payload,
            headers={"Stripe-Signature": sign(payload, WEBHOOK_SECRET)},
        )

    async def purchase_entries(self, account_id: int | None = None) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT * FROM ledger_entries WHERE account_id = $1 AND entry_type = 'purchase'",
            account_id or self.account_id,
        )

    async def balance(self, account_id: int | None = None) -> int:
        posted = await ledger.posted_balance(self.pool, account_id or self.account_id)
        return posted.balance_millicredits


def shop_settings(
    database_url: str, redis_url: str, stub: StripeStub, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "upstream_api_key": "sk-upstream",
        "upstream_base_url": "http://127.0.0.1:9/v1",
        "public_base_url": PUBLIC_BASE_URL,
        "stripe_api_key": TEST_API_KEY,
        "stripe_webhook_secrets": (WEBHOOK_SECRET,),
        "stripe_api_base": stub.base_url,
        "auth_cache_ttl_s": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


async def open_shop(aiohttp_client: Any, settings: Settings, stub: StripeStub) -> Shop:
    gateway = await aiohttp_client(create_app(settings))
    admin = await aiohttp_client(create_admin_app(settings))
    shop = Shop(gateway, admin, stub)
    shop.account_id, shop.key = await shop.add_buyer()
    return shop


@pytest.fixture
async def shop(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> Shop:
    return await open_shop(
        aiohttp_client, shop_settings(database_url, redis_url, stripe_stub), stripe_stub
    )


async def test_packages_list_money_as_strings(shop: Shop) -> None:
    response = await shop.gateway.get("/api/billing/packages")

    assert response.status == 200
    data = (await response.json())["data"]
    assert [p["code"] for p in data] == ["starter", "professional", "enterprise"]
    enterprise = data[2]
    assert enterprise["price"] == "99.99"
    assert enterprise["priceMinorUnits"] == "9999"
    assert enterprise["totalMillicredits"] == "109990000"
    assert enterprise["totalCredits"] == 109_990
    assert enterprise["bonusMillicredits"] == "10000000"
    assert enterprise["badge"] == "Best value"
    assert enterprise["savingsPercent"] == "9.1"
    assert data[1]["totalMillicredits"] == "52490000"


async def test_checkout_creates_session_from_the_servers_own_prices(shop: Shop) -> None:
    checkout = await shop.started("starter", amount=1, credits=10**9, priceMinorUnits=1)

    assert checkout["status"] == "pending"
    assert checkout["checkoutUrl"].startswith(f"{shop.stub.base_url}/checkout/cs_test_")
    [(_, path, params, headers)] = [r for r in shop.stub.requests if r[0] == "POST"]
    assert path == "/v1/checkout/sessions"
    assert params["mode"] == "payment"
    assert params["client_reference_id"] == str(shop.account_id)
    assert params["metadata"] == {
        "purchase_id": checkout["purchaseId"],
        "package_code": "starter",
        "account_id": str(shop.account_id),
    }
    assert params["line_items"][0]["price_data"]["unit_amount"] == "999"
    assert params["line_items"][0]["price_data"]["currency"] == "usd"
    assert headers["Idempotency-Key"] == f"checkout:{checkout['purchaseId']}"
    assert params["success_url"] == (
        f"{PUBLIC_BASE_URL}/credits?purchase={checkout['purchaseId']}"
        "&session_id={CHECKOUT_SESSION_ID}"
    )
    assert params["cancel_url"].endswith("&checkout=cancelled")
    row = await shop.pool.fetchrow(
        "SELECT * FROM purchases WHERE public_id = $1", checkout["purchaseId"]
    )
    assert (row["status"], row["price_minor_units"], row["total_millicredits"]) == (
        "pending",
        999,
        STARTER_MC,
    )
    assert row["checkout_session_id"] == checkout["checkoutSessionId"]


async def test_fifty_webhooks_racing_the_success_return_grant_once(shop: Shop) -> None:
    checkout = await shop.started("starter")
    status, page = await shop.page(shop.success_path(checkout).split("&session_id")[0])
    # Without its session id the page shows nothing about it (its script asks the API).
    assert status == 200 and 'data-status=""' in page and 'data-lookup="true"' in page
    paid = shop.stub.pay(checkout["checkoutSessionId"])
    event = shop.stub.event("checkout.session.completed", paid)

    results = await asyncio.gather(
        *(shop.webhook(event) for _ in range(50)), shop.page(shop.success_path(checkout))
    )

    webhooks, (status, page) = results[:-1], results[-1]
    assert [r.status for r in webhooks] == [200] * 50
    assert status == 200
    assert len(await shop.purchase_entries()) == 1
    assert await shop.balance() == STARTER_MC
    status, page = await shop.page(shop.success_path(checkout))
    assert 'data-status="paid"' in page
    assert "9,990.00 credits were added" in page
    state = await shop.gateway.app[appkeys.HOLDS].account_state(shop.account_id)
    assert state.balance_millicredits == STARTER_MC


async def test_success_return_before_the_webhook_shows_credits_at_once(shop: Shop) -> None:
    checkout = await shop.started("professional", returnPath="/dashboard?tab=credits")
    shop.stub.pay(checkout["checkoutSessionId"])

    status, page = await shop.page(shop.success_path(checkout))

    assert status == 200
    assert 'data-status="paid"' in page
    assert 'href="/dashboard?tab=credits">Return to app</a>' in page
    assert await shop.balance() == 52_490_000
    response = await shop.gateway.get(
        f"/api/billing/purchases/{checkout['purchaseId']}",
        headers={"Authorization": f"Bearer {shop.key}"},
    )
    body = await response.json()
    assert body["status"] == "paid"
    assert body["balanceMillicredits"] == "52490000"
    assert body["receiptUrl"].startswith("https://pay.stripe.com/receipts/")

    late = shop.stub.event(
        "checkout.session.completed", shop.stub.session(checkout["checkoutSessionId"])
    )
    response = await shop.webhook(late)
    assert response.status == 200
    assert len(await shop.purchase_entries()) == 1
    assert await shop.balance() == 52_490_000


async def test_async_payment_shows_pending_until_the_webhook(shop: Shop) -> None:
    checkout = await shop.started("starter")
    shop.stub.pay(checkout["checkoutSessionId"], asynchronous=True)

    status, page = await shop.page(shop.success_path(checkout))
    assert status == 200
    assert 'data-status="processing"' in page and "Purchase pending" in page
    assert await shop.balance() == 0

    succeeded = shop.stub.settle_async(checkout["checkoutSessionId"], succeeded=True)
    await shop.webhook(shop.stub.event("checkout.session.async_payment_succeeded", succeeded))

    _, page = await shop.page(shop.success_path(checkout))
    assert 'data-status="paid"' in page
    assert await shop.balance() == STARTER_MC


async def test_cancelled_checkout_grants_nothing_and_says_so(shop: Shop) -> None:
    checkout = await shop.started("starter")
    cancel_url = shop.stub.sessions[checkout["checkoutSessionId"]]["cancel_url"]

    status, page = await shop.page(cancel_url.removeprefix(PUBLIC_BASE_URL))

    assert status == 200
    assert "Checkout was cancelled. You have not been charged" in page
    assert await shop.balance() == 0


async def test_checkout_rejects_bad_requests(shop: Shop) -> None:
    cases = [
        ({"packageCode": "platinum"}, 400, "unknown_package"),
        ({}, 400, "missing_package_code"),
        ({"packageCode": 5}, 400, "missing_package_code"),
        ({"packageCode": "starter", "returnPath": "//evil.example"}, 400, "invalid_return_path"),
        ({"packageCode": "starter", "returnPath": "https://evil.example/"}, 400, None),
    ]
    for body, status, code in cases:
        response = await shop.buy(body)
        assert response.status == status, body
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error"
        if code:
            assert error["code"] == code
    response = await shop.gateway.post(
        "/api/billing/checkout", data=b"{nope", headers={"Authorization": f"Bearer {shop.key}"}
    )
    assert response.status == 400
    response = await shop.gateway.post("/api/billing/checkout", json={"packageCode": "starter"})
    assert response.status == 401
    assert await shop.pool.fetchval("SELECT count(*) FROM purchases") == 0


async def test_purchase_of_another_account_is_not_found(shop: Shop) -> None:
    checkout = await shop.started("starter")
    _, other_key = await shop.add_buyer()

    response = await shop.gateway.get(
        f"/api/billing/purchases/{checkout['purchaseId']}",
        headers={"Authorization": f"Bearer {other_key}"},
    )

    assert response.status == 404
    assert (await response.json())["error"]["code"] == "purchase_not_found"


async def test_checkout_disabled_answers_503(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> None:
    settings = shop_settings(database_url, redis_url, stripe_stub, purchases_enabled=False)
    shop = await open_shop(aiohttp_client, settings, stripe_stub)

    response = await shop.buy({"packageCode": "starter"})

    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "purchases_unavailable"
    assert "temporarily disabled" in error["message"]
    assert shop.stub.requests == []


async def test_checkout_with_unknown_stripe_price_answers_502(shop: Shop) -> None:
    await shop.pool.execute(
        "UPDATE packages SET stripe_price_id = 'price_gone' WHERE code = 'starter'"
    )

    response = await shop.buy({"packageCode": "starter"})

    assert response.status == 502
    assert (await response.json())["error"]["code"] == "checkout_failed"
    row = await shop.pool.fetchrow("SELECT status, failure_reason FROM purchases")
    assert row["status"] == "failed" and "price_gone" in row["failure_reason"]


async def test_checkout_with_a_stripe_price_id_charges_that_price(shop: Shop) -> None:
    shop.stub.prices["price_starter"] = {"unit_amount": 999, "currency": "usd"}
    await shop.pool.execute(
        "UPDATE packages SET stripe_price_id = 'price_starter' WHERE code = 'starter'"
    )
    checkout = await shop.started("starter")
    [params] = [r[2] for r in shop.stub.requests if r[0] == "POST"]
    assert params["line_items"] == [{"price": "price_starter", "quantity": "1"}]

    shop.stub.pay(checkout["checkoutSessionId"])
    await shop.page(shop.success_path(checkout))

    assert await shop.balance() == STARTER_MC


async def test_checkout_with_stripe_down_answers_503(shop: Shop) -> None:
    shop.stub.fail_with = 503

    response = await shop.buy({"packageCode": "starter"})

    assert response.status == 503
    assert (await response.json())["error"]["code"] == "purchases_unavailable"
    assert await shop.pool.fetchval("SELECT status FROM purchases") == "failed"


async def test_success_return_while_stripe_is_down_shows_pending(shop: Shop) -> None:
    checkout = await shop.started("starter")
    shop.stub.pay(checkout["checkoutSessionId"])
    shop.stub.fail_with = 503

    status, page = await shop.page(shop.success_path(checkout))

    assert status == 200
    assert 'data-status="pending"' in page and "Purchase pending" in page
    assert await shop.balance() == 0


async def test_return_with_another_session_id_does_not_ask_stripe(shop: Shop) -> None:
    checkout = await shop.started("starter")
    other = await shop.started("starter")
    shop.stub.pay(other["checkoutSessionId"])
    path = shop.success_path(checkout).replace(
        checkout["checkoutSessionId"], other["checkoutSessionId"]
    )

    status, page = await shop.page(path)

    # Not its session: nothing about the purchase, and Stripe is not asked.
    assert status == 200 and 'data-status=""' in page and "9,990.00" not in page
    assert [r for r in shop.stub.requests if r[0] == "GET"] == []
    assert await shop.balance() == 0
    status, page = await shop.page("/credits?purchase=pur_unknown&session_id=cs_unknown")
    assert status == 200 and 'data-status=""' in page


# -- package versions, edited through the admin API --------------------------------------


async def admin_headers(shop: Shop) -> dict[str, str]:
    async with shop.pool.acquire() as conn:
        token, _ = await create_admin_token(conn, CLI_ACTOR, role=Role.ADMIN, name="catalog")
    return {"Authorization": f"Bearer {token}"}


async def test_purchase_keeps_its_package_version_after_an_admin_edit(shop: Shop) -> None:
    headers = await admin_headers(shop)
    bought = await shop.pool.fetchval("SELECT id FROM packages WHERE code = 'starter'")
    checkout = await shop.started("starter")

    response = await shop.admin.patch(
        "/admin/v1/packages/starter",
        json={"priceMinorUnits": "1099", "bonusCredits": "1000", "tagline": "Try <it>"},
        headers=headers,
    )
    assert response.status == 200, await response.text()
    newer = await response.json()

    # Buyers see the new version at once.
    listed = (await (await shop.gateway.get("/api/billing/packages")).json())["data"]
    assert (listed[0]["code"], listed[0]["price"], listed[0]["totalMillicredits"]) == (
        "starter",
        "10.99",
        str(STARTER_MC + 1_000_000),
    )
    assert listed[0]["tagline"] == "Try <it>"
    # The checkout started before the edit is paid and fulfilled as bought.
    paid = shop.stub.pay(checkout["checkoutSessionId"])
    assert (await shop.webhook(shop.stub.event("checkout.session.completed", paid))).status == 200
    assert await shop.balance() == STARTER_MC
    row = await shop.pool.fetchrow(
        "SELECT * FROM purchases WHERE public_id = $1", checkout["purchaseId"]
    )
    assert (row["status"], row["package_id"], row["price_minor_units"]) == ("paid", bought, 999)
    assert row["total_millicredits"] == STARTER_MC
    # The next purchase is of the new version, at its price.
    again = await shop.started("starter")
    [*_, (_, _, params, _)] = [r for r in shop.stub.requests if r[0] == "POST"]
    assert params["line_items"][0]["price_data"]["unit_amount"] == "1099"
    later = await shop.pool.fetchrow(
        "SELECT * FROM purchases WHERE public_id = $1", again["purchaseId"]
    )
    assert (later["package_id"], later["total_millicredits"]) == (
        newer["id"],
        STARTER_MC + 1_000_000,
    )


async def test_deactivated_package_is_neither_offered_nor_sold(shop: Shop) -> None:
    headers = await admin_headers(shop)

    response = await shop.admin.post("/admin/v1/packages/enterprise/deactivate", headers=headers)
    assert response.status == 200, await response.text()

    listed = (await (await shop.gateway.get("/api/billing/packages")).json())["data"]
    assert [p["code"] for p in listed] == ["starter", "professional"]
    response = await shop.buy({"packageCode": "enterprise"})
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "unknown_package"
    assert shop.stub.requests == []
