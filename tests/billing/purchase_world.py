"""The purchase tests' world: accounts, purchases and Stripe's side of them, on a real
Postgres (Stripe objects from ``devtools.stripe_sim``, built in-process)."""

from __future__ import annotations

from typing import Any

import asyncpg

from billing import ledger
from billing.purchases.packages import get_package
from billing.purchases.purchase_records import Purchase, attach_checkout_session, create_purchase
from devtools.stripe_sim import StripeStub

STARTER_MC = 9_990_000
PROFESSIONAL_MC = 52_490_000
ENTERPRISE_MC = 109_990_000


class World:
    """Accounts, purchases and Stripe's side of them, for one test."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.stripe = StripeStub()
        self._emails = 0

    async def account(self, credits_millicredits: int = 0) -> int:
        self._emails += 1
        async with self.pool.acquire() as conn:
            account_id = await ledger.create_account(conn, f"buyer{self._emails}@example.com")
            if credits_millicredits:
                await ledger.post_entry(
                    conn,
                    account_id=account_id,
                    entry_type="adjustment",
                    amount_millicredits=credits_millicredits,
                    idempotency_key=f"grant:{account_id}",
                )
        return account_id

    async def checkout(self, account_id: int, code: str = "starter") -> tuple[Purchase, str]:
        """A pending purchase with its Checkout Session (as the gateway creates them)."""
        package = await get_package(self.pool, code)
        async with self.pool.acquire() as conn:
            purchase = await create_purchase(
                conn, account_id=account_id, package=package, return_path=None
            )
        metadata = {
            "purchase_id": purchase.public_id,
            "package_code": code,
            "account_id": str(account_id),
        }
        session = self.stripe.create_session(
            {
                "mode": "payment",
                "line_items": [
                    {
                        "quantity": "1",
                        "price_data": {
                            "currency": package.currency,
                            "unit_amount": str(package.price_minor_units),
                            "product_data": {"name": package.name},
                        },
                    }
                ],
                "client_reference_id": str(account_id),
                "metadata": metadata,
                "payment_intent_data": {"metadata": metadata},
                "success_url": "http://gw/credits?session_id={CHECKOUT_SESSION_ID}",
                "cancel_url": "http://gw/credits",
            }
        )
        purchase = await attach_checkout_session(
            self.pool, purchase.id, checkout_session_id=session["id"], checkout_url=session["url"]
        )
        return purchase, session["id"]

    async def apply(self, fn: Any, obj: dict[str, Any], **kwargs: Any) -> Any:
        async with self.pool.acquire() as conn:
            return await fn(conn, obj, **kwargs)

    async def spend(self, account_id: int, amount_millicredits: int, key: str) -> None:
        async with self.pool.acquire() as conn:
            await ledger.post_entry(
                conn,
                account_id=account_id,
                entry_type="deduction",
                amount_millicredits=-amount_millicredits,
                idempotency_key=key,
            )

    async def balance(self, account_id: int) -> ledger.PostedBalance:
        return await ledger.posted_balance(self.pool, account_id)

    async def entries(self, account_id: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT * FROM ledger_entries WHERE account_id = $1 ORDER BY id", account_id
        )

    async def assert_books_balance(self, account_id: int) -> None:
        async with self.pool.acquire() as conn:
            assert await ledger.ledger_sum_matches_balance(conn, account_id)
