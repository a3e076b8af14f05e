"""The ``creditgate`` command line. Every command prints one JSON document on stdout
(``report``: CSV).

    creditgate migrate       (MIGRATION_SNAPSHOT_DIR: pg_dump snapshot first)
    creditgate seed
    creditgate serve
    creditgate accounts create --email E [--credits N]
    creditgate accounts show ID
    creditgate keys create --account ID [--name NAME]
    creditgate keys revoke ID
    creditgate credits grant --account ID --credits N --reason R
    creditgate settle        (post everything waiting in the settlement outbox, then exit)
    creditgate outbox dead-letters [--all]
    creditgate outbox replay ENTRY_ID
    creditgate admin create-token --role viewer|operator|admin [--name N] [--expires-in-days D]
    creditgate admin tokens
    creditgate admin revoke-token ID            (creditgate.cli_admin_tokens)
    creditgate reconcile [--since YYYY-MM-DD]   (exit status 1 when anything does not add up)
    creditgate report liability|revenue --month YYYY-MM   (CSV, not JSON; billing.finance)
    creditgate qa --gateway URL --admin URL [--admin-token T] [--smoke] [--json]
                             (the token from ADMIN_TOKEN unless --admin-token is given)
                             (go-live QA over HTTP, creditgate.qa; a summary, not JSON, unless
                             --json; exit status 1 when a section fails; no DATABASE_URL)

Configuration comes from the environment (see README). A command reads only what it uses:
``serve`` the whole ``Settings``; ``settle``, ``credits grant`` and ``outbox replay``
DATABASE_URL and REDIS_URL;
the others DATABASE_URL, and REDIS_URL when it is set (``accounts show`` without it cannot
know held and pending amounts, and says so). Errors print ``{"error": "..."}`` on stdout and
exit with status 1 (2 for usage errors).

Every command that changes something writes one audit row as the actor ``cli``
(``billing.audit.CLI_ACTOR``) in the transaction of its change.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import date
from functools import partial
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from billing import api_keys, finance, ledger, reconciliation
from billing.accounts import balance_fields
from billing.adjustments import actor_log_fields
from billing.audit import CLI_ACTOR, record_audit
from billing.errors import AccountNotFoundError, BillingError, BillingUnavailableError
from billing.metering.dead_letters import (
    DeadLetter,
    ReplayOutcome,
    list_dead_letters,
    replay_dead_letter,
)
from billing.metering.holds import HoldStore
from billing.metering.rate_cards import seed_rate_cards
from billing.purchases.fulfilment import publish_balance
from billing.purchases.packages import seed_packages
from billing.statements import parse_month
from billing.units import credits_to_millicredits, money_fields
from creditgate import qa
from creditgate.cli_admin_tokens import add_admin_parser
from creditgate.cli_partitions import add_partitions_parser
from creditgate.migrator import MigrationError, run_migrations
from runtime.json_logs import install_json_logging
from runtime.resources import RedisEvictionPolicyError, open_redis
from runtime.settings import ConfigError, Settings, StoreSettings


def _print(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


class _Stores:
    """The Postgres pool of one command and, when ``REDIS_URL`` is set, its Redis hold store
    (``holds`` is None without it)."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.holds: HoldStore | None = None
        self._redis: aioredis.Redis | None = None

    async def __aenter__(self) -> _Stores:
        self.pool = await asyncpg.create_pool(self.settings.database_url, min_size=1, max_size=2)
        if self.settings.redis_url is not None:
            self._redis = open_redis(self.settings.redis_url, cluster=self.settings.redis_cluster)
            self.holds = HoldStore(self._redis, partial(ledger.posted_balance, self.pool))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        await self.pool.close()


async def cmd_migrate(settings: StoreSettings, args: argparse.Namespace) -> dict[str, Any]:
    """Apply pending migrations; with ``MIGRATION_SNAPSHOT_DIR`` set, a numbered migration
    pending first takes a ``pg_dump`` snapshot there (``snapshot``: its path; the key is
    absent when none was taken), and a failed dump applies nothing (exit status 1)."""
    run = await run_migrations(settings.database_url, snapshot_dir=settings.migration_snapshot_dir)
    doc: dict[str, Any] = {"applied": run.applied}
    if run.snapshot is not None:
        doc["snapshot"] = str(run.snapshot)
    return doc


async def cmd_seed(settings: StoreSettings, args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return {
            "rateCardsAdded": await seed_rate_cards(conn),
            "packages": await seed_packages(conn),
        }
    finally:
        await conn.close()


async def _account_doc(stores: _Stores, account_id: int) -> dict[str, Any]:
    row = await stores.pool.fetchrow(
        "SELECT id, email, created_at FROM accounts WHERE id = $1", account_id
    )
    if row is None:
        raise AccountNotFoundError(account_id)
    posted = await ledger.posted_balance(stores.pool, account_id)
    return {
        "id": row["id"],
        "email": row["email"],
        "createdAt": row["created_at"].isoformat(),
        **await balance_fields(stores.holds, account_id, posted),
    }


async def cmd_accounts_create(settings: StoreSettings, args: argparse.Namespace) -> dict[str, Any]:
    async with _Stores(settings) as stores:
        result = None
        async with stores.pool.acquire() as conn, conn.transaction():
            account_id = await ledger.create_account(conn, args.email)
            if args.credits:
                result = await ledger.post_entry(
                    conn,
                    account_id=account_id,
                    entry_type="adjustment",
                    amount_millicredits=credits_to_millicredits(args.credits),
                    idempotency_key=f"grant:{uuid.uuid4()}",
                    reference="initial credits",
                    log_fields=actor_log_fields(CLI_ACTOR, kind="starting_grant"),
                )
            after = {"email": args.email, "initial_entry_id": result.entry.id if result else None}
            await record_audit(
                conn,
                CLI_ACTOR,
                action="account.create",
                target_type="account",
                target_id=account_id,
                after=after,
            )
        if result is not None:
            await publish_balance(stores.holds, account_id, result.posted)
        return await _account_doc(stores, account_id)


async def cmd_accounts_show(settings: StoreSettings, args: argparse.Namespace) -> dict[str, Any]:
    async with _Stores(settings) as stores:
        return await _account_doc(stores, args.id)


async def cmd_keys_create(settings: StoreSettings, args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            key, record = await api_keys.create_api_key(conn, args.account, name=args.name)
            await record_audit(
                conn,
                CLI_ACTOR,
                action="key.create",
                target_type="api_key",
                target_id=record.id,
                after=dataclasses.asdict(record),
            )
    except asyncpg.ForeignKeyViolationError:
        raise AccountNotFoundError(args.account) from None
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


async def cmd_keys_revoke(settings: StoreSettings, args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            revoked = await api_keys.revoke_api_key(conn, args.id)
            if revoked:  # an unknown or already revoked key: nothing changed, nothing audited
                await record_audit(
                    conn, CLI_ACTOR, action="key.revoke", target_type="api_key", target_id=args.id
                )
    finally:
        await conn.close()
    return {"id": args.id, "revoked": revoked}


async def cmd_credits_grant(settings: StoreSettings, args: argparse.Namespace) -> dict[str, Any]:
    amount = credits_to_millicredits(args.credits)
    async with _Stores(settings) as stores:
        async with stores.pool.acquire() as conn, conn.transaction():
            result = await ledger.post_entry(
                conn,
                account_id=args.account,
                entry_type="adjustment",
                amount_millicredits=amount,
                idempotency_key=args.idempotency_key or f"grant:{uuid.uuid4()}",
                reference=args.reason,
                log_fields=actor_log_fields(CLI_ACTOR, kind="grant"),
            )
            if result.created:  # a repeated idempotency key posts nothing: no audit row
                await record_audit(
                    conn,
                    CLI_ACTOR,
                    action="credits.grant",
                    target_type="ledger_entry",
                    target_id=result.entry.id,
                    after=dataclasses.asdict(result.entry),
                )
        # The gateway reserves against Redis's cached balance: without this push a grant
        # would show only after the account's next posting (REDIS_URL is required here).
        await publish_balance(stores.holds, args.account, result.posted)
        return {
            "entryId": result.entry.id,
            "created": result.created,
            "accountId": args.account,
            **money_fields("amount", result.entry.amount_millicredits),
            **money_fields("balanceAfter", result.entry.balance_after_millicredits),
            "reason": args.reason,
        }


async def cmd_settle(settings: StoreSettings, args: argparse.Namespace) -> dict[str, Any]:
    from billing.metering.posting import SettlementPoster

    async with _Stores(settings) as stores:
        assert stores.holds is not None  # REDIS_URL is required for this command
        poster = SettlementPoster(
            stores.holds,
            stores.pool,
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
            "deadLettered": poster.stats.dead_lettered,
        }


def _dead_letter_doc(letter: DeadLetter) -> dict[str, Any]:
    charged = letter.charged_millicredits
    return {
        "entryId": letter.stream_entry_id,
        "requestId": letter.request_id,
        "accountId": letter.account_id,
        "chargedMillicredits": None if charged is None else str(charged),
        "error": letter.error,
        "payload": letter.payload,
        "createdAt": letter.created_at.isoformat(),
        "replayedAt": letter.replayed_at.isoformat() if letter.replayed_at else None,
    }


async def cmd_outbox_dead_letters(
    settings: StoreSettings, args: argparse.Namespace
) -> dict[str, Any]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        letters = await list_dead_letters(conn, include_replayed=args.all)
    finally:
        await conn.close()
    return {"deadLetters": [_dead_letter_doc(letter) for letter in letters]}


_REPLAY_NOTES = {
    ReplayOutcome.POSTED: "posted",
    ReplayOutcome.ALREADY_REPLAYED: "replayed before; nothing posted",
    ReplayOutcome.ALREADY_POSTED: "its request id was already posted; nothing posted",
}


async def cmd_outbox_replay(settings: StoreSettings, args: argparse.Namespace) -> dict[str, Any]:
    async with _Stores(settings) as stores:
        async with stores.pool.acquire() as conn, conn.transaction():
            replay = await replay_dead_letter(conn, args.entry_id)
            if replay.outcome is not ReplayOutcome.ALREADY_REPLAYED:  # it set replayed_at
                await record_audit(
                    conn,
                    CLI_ACTOR,
                    action="dead_letter.replay",
                    target_type="settlement_dead_letter",
                    target_id=args.entry_id,
                    after={"outcome": replay.outcome.value},
                )
        posting = replay.posting
        if posting is not None:
            # The charge was released from Redis's pending when dead-lettered; the gateway
            # reserves against the cached balance, which must now show the deduction.
            await publish_balance(stores.holds, posting.account_id, posting.balance)
        return {
            "outcome": replay.outcome.value,
            "note": _REPLAY_NOTES[replay.outcome],
            **money_fields("charged", posting.charged_millicredits if posting else 0),
            "deadLetter": _dead_letter_doc(replay.dead_letter),
        }


async def cmd_report(settings: StoreSettings, args: argparse.Namespace) -> str:
    """A finance report, read from DATABASE_REPLICA_URL when set."""
    url = settings.database_replica_url or settings.database_url
    pool = await asyncpg.create_pool(
        url, min_size=1, max_size=1, server_settings={"plan_cache_mode": "force_custom_plan"}
    )
    try:
        if args.report == "liability":
            return finance.liability_csv(await finance.liability_report(pool, args.month))
        return finance.revenue_csv(await finance.revenue_report(pool, args.month))
    finally:
        await pool.close()


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    from creditgate.serve import serve

    serve(settings)


@dataclasses.dataclass(frozen=True, slots=True)
class _Answer:
    """A command's JSON document with an exit status other than 0 (``text``: printed
    instead of the document)."""

    doc: dict[str, Any]
    status: int
    text: str | None = None


def _since(text: str) -> date:
    """``--since``: a ``YYYY-MM-DD`` day from ``reconciliation.EARLIEST_SINCE`` to today (UTC);
    anything else is a usage error (exit 2)."""
    try:
        return reconciliation.check_since(date.fromisoformat(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


async def cmd_reconcile(settings: StoreSettings, args: argparse.Namespace) -> _Answer:
    """Run every reconciliation check (``billing.reconciliation``), record the run and print
    the report; exit status 1 on any mismatch. Without REDIS_URL the Redis checks are skipped
    (``counts.redisChecked`` 0)."""
    since = args.since or reconciliation.default_since()
    async with _Stores(settings) as stores:
        redis = stores.holds.redis if stores.holds is not None else None
        try:
            report = await reconciliation.reconcile(stores.pool, redis, since=since)
        except RedisError as exc:
            raise BillingUnavailableError(f"redis: {exc}") from exc
        run_id = await reconciliation.record_run(stores.pool, report, source="cli")
    return _Answer({"runId": run_id, **report.to_doc()}, 0 if report.ok else 1)


async def cmd_qa(settings: None, args: argparse.Namespace) -> _Answer:
    """Run the go-live QA (``creditgate.qa``) against a deployed gateway and admin service."""
    options = qa.Options(
        gateway=args.gateway,
        admin=args.admin,
        admin_token=args.admin_token,
        smoke=args.smoke,
        rate_model=args.rate_model,
        stripe_api_key=args.stripe_api_key,
    )
    report = await qa.run_qa(options)
    status = 0 if report["ok"] else 1
    return _Answer(report, status, None if args.json else qa.summary_text(report))


def _no_settings() -> None:
    return None


def _stores() -> StoreSettings:
    return StoreSettings.from_env()


def _migrate_settings() -> StoreSettings:
    return StoreSettings.from_env(migrating=True)


def _stores_with_redis() -> StoreSettings:
    return StoreSettings.from_env(redis_required=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="creditgate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # ``config`` reads what a command uses and nothing else: only ``serve`` needs the whole
    # ``Settings``; the others Postgres, and Redis where they touch holds or balances.
    migrating = (
        "Apply database migrations; with MIGRATION_SNAPSHOT_DIR set, first take a pg_dump "
        "(custom format) snapshot there when a numbered migration is pending."
    )
    sub.add_parser("migrate", help=migrating, description=migrating).set_defaults(
        fn=cmd_migrate, config=_migrate_settings
    )
    sub.add_parser("seed", help="insert default rate cards and packages").set_defaults(
        fn=cmd_seed, config=_stores
    )
    sub.add_parser("serve", help="run the gateway and admin service").set_defaults(
        fn=cmd_serve, config=Settings.from_env, sync=True
    )
    sub.add_parser("settle", help="post the settlement outbox to Postgres now").set_defaults(
        fn=cmd_settle, config=_stores_with_redis
    )

    outbox = sub.add_parser(
        "outbox", help="dead-lettered settlements: list and replay"
    ).add_subparsers(dest="action", required=True)
    listing = (
        "List dead-lettered settlements, oldest first, as one JSON document "
        '{"deadLetters": [{entryId, requestId, accountId, chargedMillicredits, error, payload, '
        "createdAt, replayedAt}, ...]} (like every command; not JSON lines, not a table)."
    )
    dead = outbox.add_parser("dead-letters", help=listing, description=listing)
    dead.add_argument("--all", action="store_true", help="include those already replayed")
    dead.set_defaults(fn=cmd_outbox_dead_letters, config=_stores)
    replaying = (
        "Post one dead letter through post_settlements after its cause was fixed, and mark "
        "it replayed; a second replay, or one whose request id was already posted, is a no-op "
        "that says so."
    )
    replay = outbox.add_parser("replay", help=replaying, description=replaying)
    replay.add_argument(
        "entry_id",
        metavar="ENTRY_ID",
        help="its id as `outbox dead-letters` lists it (s07/1733212345678-0)",
    )
    replay.set_defaults(fn=cmd_outbox_replay, config=_stores_with_redis)

    accounts = sub.add_parser("accounts", help="create and show accounts").add_subparsers(
        dest="action", required=True
    )
    create = accounts.add_parser("create")
    create.add_argument("--email", required=True)
    create.add_argument("--credits", default=None, help="initial credits (adjustment entry)")
    create.set_defaults(fn=cmd_accounts_create, config=_stores)
    show = accounts.add_parser("show")
    show.add_argument("id", type=int)
    show.set_defaults(fn=cmd_accounts_show, config=_stores)

    keys = sub.add_parser("keys", help="create and revoke API keys").add_subparsers(
        dest="action", required=True
    )
    kc = keys.add_parser("create")
    kc.add_argument("--account", type=int, required=True)
    kc.add_argument("--name", default="")
    kc.set_defaults(fn=cmd_keys_create, config=_stores)
    kr = keys.add_parser("revoke")
    kr.add_argument("id", type=int)
    kr.set_defaults(fn=cmd_keys_revoke, config=_stores)

    add_admin_parser(sub)
    add_partitions_parser(sub)

    reconciling = (
        "Check that the money adds up (billing.reconciliation): ledger sums against balances, "
        "usage charges against deductions per UTC day, Redis's balances and holds; print the "
        "report as JSON, record it in reconciliation_runs, exit 1 on any mismatch."
    )
    reconcile = sub.add_parser("reconcile", help=reconciling, description=reconciling)
    reconcile.add_argument(
        "--since",
        type=_since,
        default=None,
        metavar="YYYY-MM-DD",
        help=f"first UTC day of the per-day check, {reconciliation.EARLIEST_SINCE} to today "
        f"(default: last {reconciliation.DEFAULT_DAYS}; a later day makes a partial run)",
    )
    reconcile.set_defaults(fn=cmd_reconcile, config=_stores)
    reporting = (
        "A finance report of one UTC month over all accounts, as CSV on stdout: liability "
        "(opening, purchases, consumption, refunds, disputes, adjustments, closing) or revenue "
        "(per model: requests, tokens, revenue, upstream cost, gross margin; a total row)."
    )
    report = sub.add_parser("report", help="finance reports (CSV)", description=reporting)
    report.add_argument("report", choices=["liability", "revenue"])
    report.add_argument("--month", type=parse_month, required=True, help="YYYY-MM (UTC)")
    report.set_defaults(fn=cmd_report, config=_stores, csv=True)

    _qa_parser(sub)

    credits = sub.add_parser("credits", help="grant credits").add_subparsers(
        dest="action", required=True
    )
    grant = credits.add_parser("grant")
    grant.add_argument("--account", type=int, required=True)
    grant.add_argument("--credits", required=True, help="credits (up to 3 decimals; < 0 takes)")
    grant.add_argument("--reason", required=True)
    grant.add_argument("--idempotency-key", default=None)
    grant.set_defaults(fn=cmd_credits_grant, config=_stores_with_redis)
    return parser


def _qa_parser(sub: Any) -> None:
    checking = (
        "Go-live QA against a deployed gateway and admin service (docs/qa.md): makes throwaway "
        "accounts through the admin API, prints pass/fail per section, exit 1 on any failure. "
        "The full run changes --rate-model's rate card for a moment (use it in staging); "
        "--smoke (the runbook's T-0 check) does not."
    )
    check = sub.add_parser("qa", help="go-live QA over HTTP", description=checking)
    check.add_argument("--gateway", required=True, help="the gateway's base URL")
    check.add_argument("--admin", required=True, help="the admin service's base URL")
    # The token from the environment by default: on the command line it would show in `ps`
    # and in the shell's history (`make run` prints an `export ADMIN_TOKEN=...` line).
    env_token = os.environ.get("ADMIN_TOKEN") or None
    check.add_argument(
        "--admin-token",
        default=env_token,
        required=env_token is None,
        help="an admin-role admin API token (default: $ADMIN_TOKEN; one of them is required)",
    )
    check.add_argument(
        "--smoke", action="store_true", help="T-0: one call, one 402, no rate change"
    )
    check.add_argument("--json", action="store_true", help="print the JSON report")
    check.add_argument(
        "--rate-model", default=None, help="the model whose rate changes (default: cheapest)"
    )
    check.add_argument(
        "--stripe-api-key",
        default=None,
        help="the simulated Stripe's API key, to resend the completion event",
    )
    check.set_defaults(fn=cmd_qa, config=_no_settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``creditgate`` console script; returns the exit status."""
    install_json_logging(logging.INFO)
    args = _parser().parse_args(argv)
    config: Callable[[], Settings | StoreSettings] = args.config
    try:
        settings = config()
    except ConfigError as exc:
        _print({"error": str(exc), "problems": exc.problems})
        return 1
    fn: Callable[..., Any] = args.fn
    try:
        if getattr(args, "sync", False):
            fn(settings, args)
            return 0
        result = asyncio.run(fn(settings, args))
        if getattr(args, "csv", False):
            sys.stdout.write(result)
            sys.stdout.flush()
            return 0
    except (
        BillingError,
        MigrationError,
        RedisEvictionPolicyError,
        ValueError,
        asyncpg.PostgresError,
        OSError,
    ) as exc:
        _print({"error": str(exc), "type": type(exc).__name__})
        return 1
    if isinstance(result, _Answer):
        if result.text is not None:
            sys.stdout.write(result.text)
            sys.stdout.flush()
        else:
            _print(result.doc)
        return result.status
    _print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
