"""The admin service's money metrics on its registry (``app[appkeys.METRICS]``), read as
Prometheus scrapes them: the webhook's counters after scripted Stripe traffic, the fleet gauges
against SQL sums, and the reconciliation gauges after a corrupted row.

The series and values the reconciliation test checks are the ones the alert rules' unit tests
(``promtool test rules``) feed in."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from admin_api.app import create_admin_app
from admin_api.money_metrics import FLEET_GAUGES
from billing import ledger
from billing.admin_tokens import Role, create_admin_token
from billing.audit import CLI_ACTOR
from billing.metering.outbox import posting_row
from billing.metering.posting import post_settlements
from billing.purchases.purchase_ledger import share_millicredits
from billing.reconciliation import default_since, reconcile, record_run
from devtools.stripe_sim import WEBHOOK_SECRET, StripeStub
from gateway.app import create_app
from runtime import appkeys
from tests.admin_api.test_stripe_webhook import Admin, _admin, make_settings
from tests.billing.money import usage_record
from tests.e2e.test_checkout_flow import Shop, shop_settings

STARTER_MC = 9_990_000
PROFESSIONAL_MC = 52_490_000

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(app: web.Application) -> Samples:
    """Every sample of the app's registry, as Prometheus's text format carries it."""
    text = generate_latest(app[appkeys.METRICS]).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One series' value; 0 when absent (a counter not yet incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
async def admin(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> Admin:
    return await _admin(
        aiohttp_client, make_settings(database_url, redis_url, stripe_stub), stripe_stub
    )


async def _deliver_ok(admin: Admin, event: dict[str, Any]) -> dict[str, Any]:
    response = await admin.deliver(event)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_scripted_stripe_traffic_moves_every_counter_exactly(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = admin.client.app
    before = scrape(app)
    account = await admin.account()
    starter = await admin.checkout(account, "starter")
    professional = await admin.checkout(account, "professional")
    # The first session was opened 100 s before it is paid: its latency lands in (60, 120].
    admin.stub.sessions[starter]["created"] -= 100
    paid_starter = admin.stub.event("checkout.session.completed", admin.stub.pay(starter))

    assert (await _deliver_ok(admin, paid_starter))["outcome"] == "processed"
    assert (await _deliver_ok(admin, paid_starter))["duplicate"] is True
    await _deliver_ok(
        admin, admin.stub.event("checkout.session.completed", admin.stub.pay(professional))
    )
    refund = admin.stub.refund(starter, 333)
    await _deliver_ok(admin, admin.stub.event("refund.created", refund))
    await _deliver_ok(
        admin, admin.stub.event("charge.dispute.created", admin.stub.dispute(professional))
    )
    bad = await admin.deliver(admin.stub.event("refund.created", refund), secret="whsec_not_ours")
    assert bad.status == 400

    after = scrape(app)
    refunded_mc = share_millicredits(STARTER_MC, 333, 999)
    assert refunded_mc == 3_330_000
    assert (
        await admin.pool.fetchval(
            "SELECT -amount_millicredits FROM ledger_entries WHERE idempotency_key = $1",
            f"refund:{refund['id']}",
        )
        == refunded_mc
    )
    expected = {
        ("creditgate_purchases_total", ("package", "starter")): 1,
        ("creditgate_purchases_total", ("package", "professional")): 1,
        ("creditgate_purchased_millicredits_total", ("package", "starter")): STARTER_MC,
        ("creditgate_purchased_millicredits_total", ("package", "professional")): PROFESSIONAL_MC,
        ("creditgate_reversed_millicredits_total", ("kind", "refund")): refunded_mc,
        ("creditgate_reversed_millicredits_total", ("kind", "dispute")): PROFESSIONAL_MC,
        ("creditgate_stripe_webhook_failures_total", ("reason", "signature")): 1,
        ("creditgate_stripe_webhook_failures_total", ("reason", "unavailable")): 0,
    }
    for (name, (label, label_value)), amount in expected.items():
        assert moved(before, after, name, **{label: label_value}) == amount, (name, label_value)
    events = "creditgate_stripe_webhook_events_total"
    completed = "checkout.session.completed"
    assert moved(before, after, events, type=completed, outcome="processed") == 2
    assert moved(before, after, events, type=completed, outcome="duplicate") == 1
    assert moved(before, after, events, type="refund.created", outcome="processed") == 1
    assert moved(before, after, events, type="charge.dispute.created", outcome="processed") == 1
    # The bad signature's delivery is a failure, not an event.
    assert sum(v for (n, _), v in after.items() if n == events) == 5
    latency = "creditgate_stripe_fulfilment_latency_seconds"
    assert moved(before, after, f"{latency}_count") == 2
    assert moved(before, after, f"{latency}_bucket", le="60.0") == 1  # the professional one
    assert moved(before, after, f"{latency}_bucket", le="120.0") == 2
    assert 100 <= moved(before, after, f"{latency}_sum") < 110

    money = [r for r in caplog.records if getattr(r, "event", "").startswith("purchase.")]
    assert [(r.event, r.packageCode, r.millicredits, r.kind) for r in money] == [  # type: ignore[attr-defined]
        ("purchase.fulfilled", "starter", str(STARTER_MC), None),
        ("purchase.fulfilled", "professional", str(PROFESSIONAL_MC), None),
        ("purchase.reversed", "starter", str(-refunded_mc), "refund"),
        ("purchase.reversed", "professional", str(-PROFESSIONAL_MC), "dispute"),
    ]
    assert money[0].stripeEventId == paid_starter["id"]  # type: ignore[attr-defined]
    assert all(r.accountId == account for r in money)  # type: ignore[attr-defined]
    for record in caplog.records:  # never a secret or a payload
        text = f"{record.getMessage()} {record.__dict__}"
        assert WEBHOOK_SECRET not in text
        assert "payment_intent_data" not in text and '"object"' not in text


async def test_fleet_gauges_after_one_refresh_equal_sql_sums(admin: Admin) -> None:
    app = admin.client.app
    rich = await admin.account(5_000_000)
    await admin.account(1_234)
    owing = await admin.account()
    await admin.pool.execute(
        "UPDATE accounts SET shortfall_millicredits = 700 WHERE id = $1", owing
    )
    card = await admin.pool.fetchval(
        """INSERT INTO rate_cards (model, model_kind, input_millicredits_per_1k_tokens,
               output_millicredits_per_1k_tokens, max_output_tokens,
               upstream_input_microusd_per_1k_tokens, upstream_output_microusd_per_1k_tokens,
               effective_at)
           VALUES ('gauge-model', 'chat', 1000, 4000, 4096, 150, 600, now() - interval '1 day')
           RETURNING id"""
    )
    await _use(admin, rich, "req-g1", "gauge-model", card, (1_000, 200, 500), 3_000)
    await _use(admin, rich, "req-g2", "gauge-model", card, (333, 0, 77), 457)
    await _use(admin, rich, "req-x", "no-card-model", None, (10, 0, 10), 5)

    await app[FLEET_GAUGES].refresh(app)
    samples = scrape(app)

    outstanding = int(await admin.pool.fetchval("SELECT sum(balance_millicredits) FROM accounts"))
    assert outstanding == 5_000_000 + 1_234 - 3_000 - 457 - 5
    assert value(samples, "creditgate_outstanding_millicredits") == outstanding
    assert value(samples, "creditgate_outstanding_liability_usd") == pytest.approx(
        outstanding / 1_000_000
    )
    assert value(samples, "creditgate_accounts_in_shortfall") == 1
    margin_nanousd = int(
        await admin.pool.fetchval(
            """SELECT sum(u.charged_millicredits) * 1000
                  - sum(u.prompt_tokens * r.upstream_input_microusd_per_1k_tokens
                        + u.completion_tokens * r.upstream_output_microusd_per_1k_tokens)
             FROM usage_events u JOIN rate_cards r ON r.id = u.rate_card_id
            WHERE u.model = 'gauge-model'
              AND u.recorded_at >= date_trunc('day', now(), 'UTC')"""
        )
    )
    assert margin_nanousd == 3_457_000 - (1_333 * 150 + 577 * 600)
    model = {"model": "gauge-model"}
    assert value(samples, "creditgate_daily_revenue_usd", **model) == pytest.approx(0.003457)
    assert value(samples, "creditgate_daily_upstream_cost_usd", **model) == pytest.approx(
        0.00054615
    )
    assert value(samples, "creditgate_daily_gross_margin_usd", **model) == pytest.approx(
        margin_nanousd / 1e9
    )
    # A model without a rate card is summed under "other" (bounded label values).
    assert value(samples, "creditgate_daily_revenue_usd", model="other") == pytest.approx(5e-6)
    assert not any(dict(labels).get("model") == "no-card-model" for _, labels in samples)


async def _use(
    admin: Admin,
    account_id: int,
    request_id: str,
    model: str,
    rate_card_id: int | None,
    tokens: tuple[int, int, int],
    cost: int,
) -> None:
    """One settled request as the settlement poster posts it (usage row and deduction)."""
    prompt, cached, completion = tokens
    record = usage_record(
        request_id=request_id, account_id=account_id, cost_millicredits=cost
    )._replace(
        model=model,
        rate_card_id=rate_card_id,
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
    )
    async with admin.pool.acquire() as conn:
        await post_settlements(
            conn, "[" + posting_row(record.to_json(), charged_millicredits=cost) + "]"
        )


async def test_reconciliation_mismatch_counted_and_exported(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = admin.client.app
    first = await admin.account(50_000)
    second = await admin.account(20_000)
    for request_id, cost in (("req-r1", 1_234), ("req-r2", 766), ("req-r3", 5_000)):
        await _use(admin, second, request_id, "gpt-4o-mini", None, (10, 0, 10), cost)
    redis = admin.holds.redis
    clean = await reconcile(admin.pool, redis, since=default_since())
    await record_run(admin.pool, clean, source="cli")
    await app[FLEET_GAUGES].refresh(app)
    before = scrape(app)
    assert value(before, "creditgate_reconciliation_runs_total", outcome="ok") == 1
    assert value(before, "creditgate_reconciliation_mismatches", check="account_balance") == 0

    # Corrupt one balance as the superuser (the ledger's sum no longer matches).
    await admin.pool.execute(
        "UPDATE accounts SET balance_millicredits = balance_millicredits + 1 WHERE id = $1", first
    )
    report = await reconcile(admin.pool, redis, since=default_since())
    await record_run(admin.pool, report, source="cli")
    # A partial clean run afterwards (a late `since`, no Redis) hides nothing.
    partial = await reconcile(admin.pool, None, since=datetime.now(UTC).date())
    partial.mismatch_counts = dict.fromkeys(partial.mismatch_counts, 0)
    partial.mismatches = []
    await record_run(admin.pool, partial, source="cli")
    await app[FLEET_GAUGES].refresh(app)
    after = scrape(app)

    assert value(after, "creditgate_reconciliation_mismatches", check="account_balance") == 1
    for check in ("daily_deductions", "redis_balance", "expired_hold", "rate_snapshot"):
        assert value(after, "creditgate_reconciliation_mismatches", check=check) == 0
    assert moved(before, after, "creditgate_reconciliation_runs_total", outcome="mismatch") == 1
    assert moved(before, after, "creditgate_reconciliation_runs_total", outcome="ok") == 1
    # The complete run's (the partial clean one is not shown): the balance's 1 millicredit.
    assert value(after, "creditgate_reconciliation_mismatched_millicredits") == 1
    assert value(after, "creditgate_reconciliation_daily_deductions_millicredits") == 7_000
    assert report.finished_at is not None and clean.finished_at is not None
    assert value(after, "creditgate_reconciliation_last_run_timestamp_seconds") == pytest.approx(
        report.finished_at.timestamp()
    )
    assert value(
        after, "creditgate_reconciliation_last_success_timestamp_seconds"
    ) == pytest.approx(clean.finished_at.timestamp())
    [finished] = [
        r
        for r in caplog.records
        if getattr(r, "event", "") == "reconciliation.finished" and not r.ok  # type: ignore[attr-defined]
    ]
    assert finished.levelno == logging.ERROR
    assert finished.mismatchCounts["account_balance"] == 1  # type: ignore[attr-defined]


async def test_adjustment_logs_its_money_event(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    account = await admin.account()
    response = await admin.client.post(
        f"/admin/v1/accounts/{account}/adjustments",
        json={"direction": "credit", "amountCredits": "2.5", "reason": "goodwill"},
        headers={"Idempotency-Key": "adj-1", **await _admin_headers(admin)},
    )
    assert response.status in (200, 201), await response.text()
    [line] = [r for r in caplog.records if getattr(r, "event", "") == "adjustment.posted"]
    assert (line.accountId, line.millicredits, line.kind) == (account, "2500", "adjustment")  # type: ignore[attr-defined]
    posted = await ledger.posted_balance(admin.pool, account)
    assert line.balanceAfterMillicredits == str(posted.balance_millicredits)  # type: ignore[attr-defined]


async def _admin_headers(admin: Admin) -> dict[str, str]:
    async with admin.pool.acquire() as conn:
        token, _ = await create_admin_token(conn, CLI_ACTOR, role=Role.ADMIN, name="metrics")
    return {"Authorization": f"Bearer {token}"}


async def test_reconciliation_deleted_deduction_exports_the_days_difference(admin: Admin) -> None:
    app = admin.client.app
    account = await admin.account(50_000)
    for request_id, cost in (("req-d1", 1_234), ("req-d2", 766), ("req-d3", 5_000)):
        await _use(admin, account, request_id, "gpt-4o-mini", None, (10, 0, 10), cost)
    async with admin.pool.acquire() as conn, conn.transaction():
        # The append-only trigger refuses even the owner; a superuser can switch triggers off.
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute("DELETE FROM ledger_entries WHERE idempotency_key = 'usage:req-d1'")
    await record_run(
        admin.pool, await reconcile(admin.pool, None, since=default_since()), source="cli"
    )

    await app[FLEET_GAUGES].refresh(app)
    samples = scrape(app)

    mismatches = "creditgate_reconciliation_mismatches"
    assert value(samples, mismatches, check="account_balance") == 1
    assert value(samples, mismatches, check="daily_deductions") == 1
    assert value(samples, mismatches, check="deduction_pairing") == 1
    # The balance off by 1,234 and the day's deductions 1,234 short.
    assert value(samples, "creditgate_reconciliation_mismatched_millicredits") == 2_468
    assert value(samples, "creditgate_reconciliation_daily_deductions_millicredits") == 5_766
    assert value(samples, "creditgate_reconciliation_runs_total", outcome="mismatch") == 1
    assert value(samples, "creditgate_reconciliation_runs_total", outcome="ok") == 0
    # No clean run yet: no last-success series (an alert on its absence fires).
    assert not any(
        name == "creditgate_reconciliation_last_success_timestamp_seconds" for name, _ in samples
    )


async def test_won_dispute_restores_credits_without_uncounting_the_reversal(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = admin.client.app
    account = await admin.account()
    session_id = await admin.paid(account)
    dispute = admin.stub.dispute(session_id)
    await _deliver_ok(admin, admin.stub.event("charge.dispute.created", dispute))
    won = admin.stub.close_dispute(dispute["id"], won=True)
    await _deliver_ok(admin, admin.stub.event("charge.dispute.closed", won))

    samples = scrape(app)

    # A counter only grows: what the dispute took stays counted; the restoration is logged.
    assert value(samples, "creditgate_reversed_millicredits_total", kind="dispute") == STARTER_MC
    assert value(samples, "creditgate_reversed_millicredits_total", kind="refund") == 0
    reversed_lines = [
        (r.millicredits, r.kind)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", "") == "purchase.reversed"
    ]
    assert reversed_lines == [(str(-STARTER_MC), "dispute"), (str(STARTER_MC), "dispute")]
    assert (await admin.balance(account)).balance_millicredits == STARTER_MC


async def test_purchase_fulfilled_by_the_success_return_counts_once_with_its_webhook(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> None:
    """The success return fulfils first (the gateway), the webhook then finds nothing to do:
    the purchase counts once, on the admin registry, as ``creditgate serve`` wires the apps
    (one ``PurchaseStats`` for both)."""
    settings = shop_settings(database_url, redis_url, stripe_stub)
    admin_app = create_admin_app(settings)
    gateway_app = create_app(
        settings,
        restarts=admin_app[appkeys.TASK_RESTARTS],
        purchases=admin_app[appkeys.PURCHASE_STATS],
    )
    shop = Shop(await aiohttp_client(gateway_app), await aiohttp_client(admin_app), stripe_stub)
    shop.account_id, shop.key = await shop.add_buyer()
    before = scrape(admin_app)
    checkout = await shop.started("professional")
    session_id = checkout["checkoutSessionId"]
    stripe_stub.sessions[session_id]["created"] -= 100
    stripe_stub.pay(session_id)

    status, page = await shop.page(shop.success_path(checkout))
    assert status == 200 and 'data-status="paid"' in page
    returned = scrape(admin_app)
    late = stripe_stub.event("checkout.session.completed", stripe_stub.session(session_id))
    response = await shop.webhook(late)
    assert response.status == 200
    assert (await response.json())["outcome"] == "processed"
    after = scrape(admin_app)

    for samples in (returned, after):
        assert moved(before, samples, "creditgate_purchases_total", package="professional") == 1
        assert (
            moved(
                before, samples, "creditgate_purchased_millicredits_total", package="professional"
            )
            == PROFESSIONAL_MC
        )
        latency = "creditgate_stripe_fulfilment_latency_seconds"
        assert moved(before, samples, f"{latency}_count") == 1
        assert 100 <= moved(before, samples, f"{latency}_sum") < 110
    assert len(await shop.purchase_entries()) == 1
    # The gateway's registry does not export the purchases (no family twice in serve).
    assert not any(name.startswith("creditgate_purchase") for name, _ in scrape(gateway_app))


async def test_restarts_count_an_admin_loop_that_raised(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> None:
    app = create_admin_app(make_settings(database_url, redis_url, stripe_stub))
    gauges = app[FLEET_GAUGES]
    failures = [RuntimeError("boom")]
    refresh = gauges.refresh
    restarted = asyncio.Event()

    async def failing_once(app: web.Application) -> None:
        if failures:
            raise failures.pop()
        restarted.set()  # the supervisor counted the restart before it started the loop again
        await refresh(app)

    gauges.refresh = failing_once  # type: ignore[method-assign]
    await aiohttp_client(app)

    await restarted.wait()
    restarts = "creditgate_background_task_restarts_total"
    assert value(scrape(app), restarts, task="fleet-gauges") == 1
