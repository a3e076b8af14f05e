"""``POST /stripe/webhook`` on the admin app: signatures, exactly-once fulfilment, refunds,
disputes, Redis, against real Postgres and Redis and the local Stripe stand-in."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from admin_api.app import create_admin_app
from billing import api_keys, ledger
from billing.errors import AccountSuspendedError
from billing.ledger import PostedBalance
from billing.metering.holds import HoldStore
from billing.metering.redis_keys import account_key
from billing.purchases.fulfilment import publish_balance, start_checkout
from billing.purchases.stripe_client import StripeClient
from devtools.stripe_sim import (
    OLD_WEBHOOK_SECRET,
    TEST_API_KEY,
    WEBHOOK_SECRET,
    StripeStub,
    event_body,
    sign,
)
from runtime import appkeys
from runtime.settings import Settings

STARTER_MC = 9_990_000


def make_settings(database_url: str, redis_url: str, stub: StripeStub, **overrides: Any):
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "upstream_api_key": "sk-upstream",
        "public_base_url": "http://gateway.test",
        "stripe_api_key": TEST_API_KEY,
        "stripe_webhook_secrets": (WEBHOOK_SECRET,),
        "stripe_api_base": stub.base_url,
    }
    values.update(overrides)
    return Settings(**values)


class Admin:
    """The admin app under test plus handles for setting up purchases and asserting."""

    def __init__(self, client: TestClient, stub: StripeStub, settings: Settings) -> None:
        self.client = client
        self.stub = stub
        self.settings = settings
        self.pool: asyncpg.Pool = client.app[appkeys.DB_POOL]
        self.holds: HoldStore = client.app[appkeys.HOLDS]
        self.stripe: StripeClient = client.app[appkeys.STRIPE]

    async def deliver(
        self,
        event: dict[str, Any] | None = None,
        *,
        body: bytes | None = None,
        secret: str = WEBHOOK_SECRET,
        timestamp: int | None = None,
        header: str | None = None,
    ):
        payload = event_body(event) if body is None else body
        signature = sign(payload, secret, timestamp) if header is None else header
        return await self.client.post(
            "/stripe/webhook",
            data=payload,
            headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
        )

    async def account(self, credits_millicredits: int = 0) -> int:
        async with self.pool.acquire() as conn:
            account_id = await ledger.create_account(conn, f"{time.monotonic_ns()}@example.com")
            await api_keys.create_api_key(conn, account_id)
            if credits_millicredits:
                await ledger.post_entry(
                    conn,
                    account_id=account_id,
                    entry_type="adjustment",
                    amount_millicredits=credits_millicredits,
                    idempotency_key=f"grant:{account_id}",
                )
        return account_id

    async def checkout(self, account_id: int, code: str = "starter") -> str:
        """Start a purchase through the real Stripe client and the stand-in; returns the
        Checkout Session id."""
        started = await start_checkout(
            self.pool,
            self.stripe,
            account_id=account_id,
            package_code=code,
            return_path=None,
            public_base_url=self.settings.public_base_url,
        )
        return started.session.id

    async def paid(self, account_id: int, code: str = "starter") -> str:
        session_id = await self.checkout(account_id, code)
        event = self.stub.event("checkout.session.completed", self.stub.pay(session_id))
        assert (await self.deliver(event)).status == 200
        return session_id

    async def counts(self) -> tuple[int, int]:
        events = await self.pool.fetchval("SELECT count(*) FROM stripe_events")
        entries = await self.pool.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE entry_type <> 'adjustment'"
        )
        return events, entries

    async def balance(self, account_id: int) -> PostedBalance:
        return await ledger.posted_balance(self.pool, account_id)


async def _admin(aiohttp_client: Any, settings: Settings, stub: StripeStub) -> Admin:
    client = await aiohttp_client(create_admin_app(settings))
    return Admin(client, stub, settings)


@pytest.fixture
async def admin(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> Admin:
    return await _admin(
        aiohttp_client, make_settings(database_url, redis_url, stripe_stub), stripe_stub
    )


async def test_webhook_paid_checkout_grants_credits_and_updates_redis(admin: Admin) -> None:
    account = await admin.account()
    session_id = await admin.checkout(account)
    event = admin.stub.event("checkout.session.completed", admin.stub.pay(session_id))

    response = await admin.deliver(event)

    assert response.status == 200
    assert await response.json() == {"received": True, "duplicate": False, "outcome": "processed"}
    posted = await admin.balance(account)
    assert posted.balance_millicredits == STARTER_MC
    state = await admin.holds.account_state(account)
    assert (state.balance_millicredits, state.version) == (STARTER_MC, posted.version)
    purchase = await admin.pool.fetchrow(
        "SELECT * FROM purchases WHERE checkout_session_id = $1", session_id
    )
    charge = admin.stub.charge_of(session_id)
    assert purchase["status"] == "paid"
    assert purchase["charge_id"] == charge["id"]
    assert purchase["receipt_url"] == charge["receipt_url"]
    stats = admin.client.app[appkeys.PURCHASE_STATS]
    assert stats.purchased_millicredits == {"starter": STARTER_MC}


async def test_webhook_same_event_50_times_concurrently_grants_once(admin: Admin) -> None:
    account = await admin.account()
    session_id = await admin.checkout(account, "enterprise")
    event = admin.stub.event("checkout.session.completed", admin.stub.pay(session_id))

    responses = await asyncio.gather(*(admin.deliver(event) for _ in range(50)))

    assert [r.status for r in responses] == [200] * 50
    bodies = [await r.json() for r in responses]
    assert sum(not b["duplicate"] for b in bodies) == 1
    assert await admin.counts() == (1, 1)
    assert (await admin.balance(account)).balance_millicredits == 109_990_000


async def test_webhook_repeat_answers_200_and_changes_nothing(admin: Admin) -> None:
    account = await admin.account()
    session_id = await admin.checkout(account)
    event = admin.stub.event("checkout.session.completed", admin.stub.pay(session_id))
    await admin.deliver(event)

    again = await admin.deliver(event)

    assert again.status == 200
    assert (await again.json())["duplicate"] is True
    assert await admin.counts() == (1, 1)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("bad_signature", 400),
        ("stale", 400),
        ("future", 400),
        ("old_secret", 400),
        ("malformed_json", 400),
        ("not_an_event", 400),
        ("no_header", 400),
        ("garbled_header", 400),
        ("tampered_body", 400),
        ("nested_5000_deep", 400),
        ("object_without_id", 400),
    ],
)
async def test_webhook_bad_delivery_answers_400_and_writes_nothing(
    admin: Admin, case: str, expected: int
) -> None:
    account = await admin.account()
    session_id = await admin.checkout(account)
    event = admin.stub.event("checkout.session.completed", admin.stub.pay(session_id))
    payload = event_body(event)
    now = int(time.time())
    kwargs: dict[str, Any] = {
        "bad_signature": {"header": f"t={now},v1={'0' * 64}"},
        "stale": {"timestamp": now - 301},
        "future": {"timestamp": now + 60},
        "old_secret": {"secret": OLD_WEBHOOK_SECRET},
        "malformed_json": {"body": payload[:-5]},
        "not_an_event": {"body": b'["not", "an", "event"]'},
        "no_header": {"header": ""},
        "garbled_header": {"header": "v1=abc,t=yesterday"},
        "tampered_body": {
            "header": sign(payload, WEBHOOK_SECRET),
            "body": payload.replace(b'"paid"', b'"PAID"'),
        },
        # Validly signed; past the JSON parser's recursion limit (it raised RecursionError).
        "nested_5000_deep": {"body": b"[" * 5000 + b"]" * 5000},
        # Validly signed; a Stripe object always has an id (applying it raised KeyError).
        "object_without_id": {
            "body": b'{"id":"evt_1","object":"event","type":"checkout.session.completed",'
            b'"data":{"object":{}}}'
        },
    }[case]

    response = await admin.deliver(event, **kwargs)

    assert response.status == expected
    body = await response.json()
    assert body["error"]["code"] == "invalid_webhook"
    assert await admin.counts() == (0, 0)
    assert admin.client.app[appkeys.STRIPE_WEBHOOK_STATS].failures["signature"] == 1


async def test_webhook_accepts_both_secrets_during_rotation(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> None:
    settings = make_settings(
        database_url,
        redis_url,
        stripe_stub,
        stripe_webhook_secrets=("whsec_test_newest", WEBHOOK_SECRET),
    )
    admin = await _admin(aiohttp_client, settings, stripe_stub)
    account = await admin.account()
    first = await admin.checkout(account)
    second = await admin.checkout(account)

    old = await admin.deliver(
        admin.stub.event("checkout.session.completed", admin.stub.pay(first)),
        secret=WEBHOOK_SECRET,
    )
    new = await admin.deliver(
        admin.stub.event("checkout.session.completed", admin.stub.pay(second)),
        secret="whsec_test_newest",
    )

    assert (old.status, new.status) == (200, 200)
    assert (await admin.balance(account)).balance_millicredits == 2 * STARTER_MC


async def test_webhook_header_with_several_signatures_matches_any(admin: Admin) -> None:
    account = await admin.account()
    session_id = await admin.checkout(account)
    event = admin.stub.event("checkout.session.completed", admin.stub.pay(session_id))
    payload = event_body(event)
    now = int(time.time())
    good = sign(payload, WEBHOOK_SECRET, now).split(",")[1]
    header = f"t={now},v1={'1' * 64},{good},v0=deadbeef"

    response = await admin.deliver(event, header=header)

    assert response.status == 200


async def test_webhook_without_secrets_configured_answers_503(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> None:
    settings = make_settings(database_url, redis_url, stripe_stub, stripe_webhook_secrets=())
    admin = await _admin(aiohttp_client, settings, stripe_stub)
    event = admin.stub.event("customer.created", {"id": "cus_test_1", "object": "customer"})

    response = await admin.deliver(event)

    assert response.status == 503
    assert await admin.counts() == (0, 0)


async def test_webhook_get_answers_405_envelope_with_allow(admin: Admin) -> None:
    response = await admin.client.get("/stripe/webhook")

    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert response.headers["x-request-id"].startswith("req_")
    error = (await response.json())["error"]
    assert error["code"] == "method_not_allowed"
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "Method GET is not allowed for /stripe/webhook; allowed: POST."


async def test_admin_unknown_path_answers_404_envelope(admin: Admin) -> None:
    response = await admin.client.post("/stripe/webhooks")

    assert response.status == 404
    assert response.headers["x-request-id"].startswith("req_")
    error = (await response.json())["error"]
    assert error["code"] == "not_found"
    assert error["message"] == "Unknown request URL: POST /stripe/webhooks."


async def test_webhook_unknown_type_answers_200_and_is_counted(admin: Admin) -> None:
    event = admin.stub.event("customer.created", {"id": "cus_test_1", "object": "customer"})

    response = await admin.deliver(event)

    assert response.status == 200
    assert (await response.json())["outcome"] == "unhandled"
    stats = admin.client.app[appkeys.STRIPE_WEBHOOK_STATS]
    assert stats.events[("other", "unhandled")] == 1  # label values bounded
    assert await admin.pool.fetchval("SELECT event_type FROM stripe_events") == "customer.created"


async def test_webhook_session_not_ours_is_ignored(admin: Admin) -> None:
    session = admin.stub.create_session(
        {
            "mode": "payment",
            "line_items": [{"price_data": {"currency": "usd", "unit_amount": "500"}}],
        }
    )
    event = admin.stub.event("checkout.session.completed", admin.stub.pay(session["id"]))

    response = await admin.deliver(event)

    assert response.status == 200
    assert (await response.json())["outcome"] == "ignored"
    assert await admin.counts() == (1, 0)


async def test_webhook_charge_refunded_lists_refunds_from_stripe(admin: Admin) -> None:
    account = await admin.account()
    session_id = await admin.paid(account)
    admin.stub.refund(session_id, 333)
    admin.stub.refund(session_id, 666)
    charge = admin.stub.charge_of(session_id)
    assert "refunds" not in charge  # as at API versions since 2022-11-15

    response = await admin.deliver(admin.stub.event("charge.refunded", charge))

    assert response.status == 200
    listed = [r for r in admin.stub.requests if r[1] == "/v1/refunds"]
    assert listed and listed[0][2]["charge"] == charge["id"]
    posted = await admin.balance(account)
    expected = STARTER_MC - STARTER_MC * 333 // 999 - STARTER_MC * 666 // 999
    assert posted.balance_millicredits == expected == 0
    state = await admin.holds.account_state(account)
    assert (state.balance_millicredits, state.version) == (0, posted.version)


async def test_webhook_refund_events_and_charge_refunded_count_once(admin: Admin) -> None:
    account = await admin.account()
    session_id = await admin.paid(account)
    refund = admin.stub.refund(session_id, 500)
    charge = admin.stub.charge_of(session_id)

    for event in (
        admin.stub.event("refund.created", refund),
        admin.stub.event("charge.refunded", charge),
        admin.stub.event("refund.updated", refund),
    ):
        assert (await admin.deliver(event)).status == 200

    posted = await admin.balance(account)
    assert posted.balance_millicredits == STARTER_MC - STARTER_MC * 500 // 999


async def test_webhook_refund_after_spending_stops_paid_use(admin: Admin) -> None:
    account = await admin.account()
    session_id = await admin.paid(account)
    async with admin.pool.acquire() as conn:
        await ledger.post_entry(
            conn,
            account_id=account,
            entry_type="deduction",
            amount_millicredits=-9_000_000,
            idempotency_key="usage:spent",
        )
    await admin.holds.sync_balance(account, await admin.balance(account))
    await admin.holds.reserve(account, 1000, request_id="before")

    response = await admin.deliver(
        admin.stub.event("refund.created", admin.stub.refund(session_id))
    )

    assert response.status == 200
    posted = await admin.balance(account)
    assert (posted.balance_millicredits, posted.shortfall_millicredits) == (0, 9_000_000)
    with pytest.raises(AccountSuspendedError) as caught:
        await admin.holds.reserve(account, 1000, request_id="after")
    assert caught.value.shortfall_millicredits == 9_000_000
    async with admin.pool.acquire() as conn:
        assert await ledger.ledger_sum_matches_balance(conn, account)


async def test_webhook_disputes_lost_and_won(admin: Admin) -> None:
    account = await admin.account()
    lost_session = await admin.paid(account)
    won_session = await admin.paid(account)
    lost = admin.stub.dispute(lost_session)
    won = admin.stub.dispute(won_session)

    for event in (
        admin.stub.event("charge.dispute.created", lost),
        admin.stub.event("charge.dispute.created", won),
    ):
        assert (await admin.deliver(event)).status == 200
    assert (await admin.balance(account)).balance_millicredits == 0
    for event in (
        admin.stub.event("charge.dispute.closed", admin.stub.close_dispute(lost["id"], won=False)),
        admin.stub.event("charge.dispute.closed", admin.stub.close_dispute(won["id"], won=True)),
    ):
        assert (await admin.deliver(event)).status == 200

    posted = await admin.balance(account)
    assert (posted.balance_millicredits, posted.shortfall_millicredits) == (STARTER_MC, 0)
    state = await admin.holds.account_state(account)
    assert state.balance_millicredits == STARTER_MC


async def test_webhook_expired_and_failed_sessions_grant_nothing(admin: Admin) -> None:
    account = await admin.account()
    expired = await admin.checkout(account)
    failing = await admin.checkout(account)
    completed = admin.stub.pay(failing, asynchronous=True)
    failed = admin.stub.settle_async(failing, succeeded=False)

    for event in (
        admin.stub.event("checkout.session.expired", admin.stub.expire(expired)),
        admin.stub.event("checkout.session.async_payment_failed", failed),
        admin.stub.event("checkout.session.completed", completed),
    ):
        assert (await admin.deliver(event)).status == 200

    statuses = await admin.pool.fetch(
        "SELECT checkout_session_id, status FROM purchases ORDER BY id"
    )
    assert [(r[0], r[1]) for r in statuses] == [(expired, "expired"), (failing, "failed")]
    assert (await admin.balance(account)).balance_millicredits == 0


async def test_webhook_stripe_down_while_listing_refunds_answers_503(admin: Admin) -> None:
    account = await admin.account()
    session_id = await admin.paid(account)
    admin.stub.refund(session_id)
    admin.stub.fail_with = 500

    response = await admin.deliver(
        admin.stub.event("charge.refunded", admin.stub.charge_of(session_id))
    )

    assert response.status == 503
    assert await admin.counts() == (1, 1)  # only the checkout event and its purchase entry
    admin.stub.fail_with = None


async def test_webhook_charge_refunded_when_stripe_refuses_the_listing(admin: Admin) -> None:
    account = await admin.account()
    session_id = await admin.paid(account)
    refund = admin.stub.refund(session_id, 500)
    admin.stub.refused_paths.add("/v1/refunds")

    charge_event = await admin.deliver(
        admin.stub.event("charge.refunded", admin.stub.charge_of(session_id))
    )
    refund_event = await admin.deliver(admin.stub.event("refund.created", refund))

    assert (charge_event.status, refund_event.status) == (200, 200)
    posted = await admin.balance(account)
    assert posted.balance_millicredits == STARTER_MC - STARTER_MC * 500 // 999


async def test_publish_balance_with_redis_down_does_not_raise(redis_url: str) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1", decode_responses=True)
    holds = HoldStore(dead, lambda account_id: None)  # type: ignore[arg-type,return-value]
    try:
        await publish_balance(holds, 1, PostedBalance(5, 1, 0))
    finally:
        await dead.aclose()


async def test_publish_balance_drops_a_stale_cache_when_sync_fails(redis_url: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        holds = HoldStore(client, lambda account_id: None)  # type: ignore[arg-type,return-value]
        await client.hset(account_key(7), mapping={"bal": 100, "ver": 1, "held": 40})
        await client.hset(account_key(7), "ver", "not-a-number")  # makes the script fail
        await publish_balance(holds, 7, PostedBalance(5, 2, 0))
        assert await client.hgetall(account_key(7)) == {"held": "40"}
    finally:
        await client.aclose()


def test_event_body_is_what_was_signed() -> None:
    event = StripeStub.event("customer.created", {"id": "cus_1", "object": "customer"})
    assert json.loads(event_body(event)) == event
