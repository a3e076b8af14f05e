"""The ``creditgate`` command line. Every command prints one JSON document on stdout.

    creditgate migrate
    creditgate seed
    creditgate serve
    creditgate accounts create --email E [--credits N]
    creditgate accounts show ID
    creditgate keys create --account ID [--name NAME]
    creditgate keys revoke ID
    creditgate credits grant --account ID --credits N --reason R
    creditgate settle        (post everything waiting in the settlement outbox, then exit)

Configuration comes from the environment (see README); errors print
``{"error": "..."}`` on stdout and exit with status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from billing import api_keys, ledger
from billing.errors import BillingError
from billing.metering.holds import HoldStore
from billing.metering.rate_cards import seed_rate_cards
from billing.units import credits_to_millicredits, money_fields
from creditgate.migrator import apply_migrations
from runtime.settings import ConfigError, Settings


def _print(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


class _Services:
    """Postgres pool and Redis hold store for one CLI command."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __aenter__(self) -> _Services:
        self.pool = await asyncpg.create_pool(self.settings.database_url, min_size=1, max_size=2)
        self.redis = aioredis.from_url(self.settings.redis_url, decode_responses=True)
        self.holds = HoldStore(self.redis, lambda a: ledger.posted_balance(self.pool, a))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.redis.aclose()
        await self.pool.close()

    async def push_balance(self, account_id: int, posted: Any) -> None:
        """Tell Redis about a new posted balance (a missing key is loaded on next use)."""
        with contextlib.suppress(Exception):
            await self.holds.sync_balance(account_id, posted)


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    applied = await apply_migrations(settings.database_url)
    return {"applied": applied}


async def cmd_seed(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        result: dict[str, Any] = {"rateCardsAdded": await seed_rate_cards(conn)}
        try:
            from billing.purchases.packages import seed_packages
        except ImportError:
            pass
        else:
            seeded = await seed_packages(conn)
            result["packages"] = seeded if isinstance(seeded, list | dict) else str(seeded)
        return result
    finally:
        await conn.close()


async def _account_doc(svc: _Services, account_id: int) -> dict[str, Any]:
    row = await svc.pool.fetchrow(
        "SELECT id, email, created_at, shortfall_millicredits FROM accounts WHERE id = $1",
        account_id,
    )
    if row is None:
        raise BillingError(f"account {account_id} not found")
    posted = await ledger.posted_balance(svc.pool, account_id)
    state = await svc.holds.account_state(account_id)
    held = state.held_millicredits
    pending = state.pending_millicredits
    available = max(posted.balance_millicredits - held - pending, 0)
    return {
        "id": row["id"],
        "email": row["email"],
        "createdAt": row["created_at"].isoformat(),
        **money_fields("balance", posted.balance_millicredits),
        **money_fields("held", held),
        **money_fields("pendingSettlement", pending),
        **money_fields("available", available),
        **money_fields("shortfall", posted.shortfall_millicredits),
    }


async def cmd_accounts_create(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    async with _Services(settings) as svc:
        async with svc.pool.acquire() as conn:
            account_id = await ledger.create_account(conn, args.email)
            if args.credits:
                result = await ledger.post_entry(
                    conn,
                    account_id=account_id,
                    entry_type="adjustment",
                    amount_millicredits=credits_to_millicredits(args.credits),
                    idempotency_key=f"grant:{uuid.uuid4()}",
                    reference="initial credits",
                )
                await svc.push_balance(account_id, result.posted)
        return await _account_doc(svc, account_id)


async def cmd_accounts_show(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    async with _Services(settings) as svc:
        return await _account_doc(svc, args.id)


async def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        key, record = await api_keys.create_api_key(conn, args.account, name=args.name)
    except asyncpg.ForeignKeyViolationError:
        raise BillingError(f"account {args.account} not found") from None
    finally:
        await conn.close()
    return {
        "id": record.id,
        "accountId": record.account_id,
        "name": record.name,
        "keyPrefix": record.key_prefix,
        "key": key,
        "note": "The key is shown once; only its SHA-256 digest is stored.",
    }


async def cmd_keys_revoke(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        revoked = await api_keys.revoke_api_key(conn, args.id)
    finally:
        await conn.close()
    return {"id": args.id, "revoked": revoked}


async def cmd_credits_grant(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    amount = credits_to_millicredits(args.credits)
    async with _Services(settings) as svc:
        async with svc.pool.acquire() as conn:
            result = await ledger.post_entry(
                conn,
                account_id=args.account,
                entry_type="adjustment",
                amount_millicredits=amount,
                idempotency_key=args.idempotency_key or f"grant:{uuid.uuid4()}",
                reference=args.reason,
            )
        await svc.push_balance(args.account, result.posted)
        return {
            "entryId": result.entry.id,
            "created": result.created,
            "accountId": args.account,
            **money_fields("amount", result.entry.amount_millicredits),
            **money_fields("balanceAfter", result.entry.balance_after_millicredits),
            "reason": args.reason,
        }


async def cmd_settle(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from billing.metering.posting import SettlementPoster

    async with _Services(settings) as svc:
        poster = SettlementPoster(
            svc.holds,
            svc.pool,
            consumer=f"cli-{uuid.uuid4().hex[:8]}",
            claim_idle_ms=settings.settlement_claim_idle_ms,
        )
        await poster.ensure_group()
        claimed = await poster.claim_stale()
        posted = await poster.drain_all()
        return {
            "claimed": claimed,
            "read": posted,
            "recorded": poster.stats.posted,
            "duplicates": poster.stats.duplicates,
        }


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    from creditgate.serve import serve

    serve(settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="creditgate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(fn=cmd_migrate)
    sub.add_parser("seed", help="insert default rate cards and packages").set_defaults(fn=cmd_seed)
    sub.add_parser("serve", help="run the gateway and admin service").set_defaults(
        fn=cmd_serve, sync=True
    )
    sub.add_parser("settle", help="post the settlement outbox to Postgres now").set_defaults(
        fn=cmd_settle
    )

    accounts = sub.add_parser("accounts", help="create and show accounts").add_subparsers(
        dest="action", required=True
    )
    create = accounts.add_parser("create")
    create.add_argument("--email", required=True)
    create.add_argument("--credits", default=None, help="initial credits (adjustment entry)")
    create.set_defaults(fn=cmd_accounts_create)
    show = accounts.add_parser("show")
    show.add_argument("id", type=int)
    show.set_defaults(fn=cmd_accounts_show)

    keys = sub.add_parser("keys", help="create and revoke API keys").add_subparsers(
        dest="action", required=True
    )
    kc = keys.add_parser("create")
    kc.add_argument("--account", type=int, required=True)
    kc.add_argument("--name", default="")
    kc.set_defaults(fn=cmd_keys_create)
    kr = keys.add_parser("revoke")
    kr.add_argument("id", type=int)
    kr.set_defaults(fn=cmd_keys_revoke)

    credits = sub.add_parser("credits", help="grant credits").add_subparsers(
        dest="action", required=True
    )
    grant = credits.add_parser("grant")
    grant.add_argument("--account", type=int, required=True)
    grant.add_argument("--credits", required=True, help="credits (up to 3 decimals; < 0 takes)")
    grant.add_argument("--reason", required=True)
    grant.add_argument("--idempotency-key", default=None)
    grant.set_defaults(fn=cmd_credits_grant)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``creditgate`` console script; returns the exit status."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        _print({"error": str(exc), "problems": exc.problems})
        return 1
    fn: Callable[..., Any] = args.fn
    try:
        if getattr(args, "sync", False):
            fn(settings, args)
            return 0
        result = asyncio.run(fn(settings, args))
    except (BillingError, ValueError, asyncpg.PostgresError, OSError) as exc:
        _print({"error": str(exc), "type": type(exc).__name__})
        return 1
    _print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
