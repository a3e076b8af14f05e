"""The admin service's money metrics, on its own registry (``runtime.appkeys.METRICS``).

- The webhook's counters (``billing.purchases.stripe_events.WebhookStats``, plain counters bumped
  where the work happens) and the process's purchases (``billing.purchases.money_events.
  PurchaseStats``: fulfilled by the webhook or the gateway's success return) are read at
  scrape time by ``WebhookCollector``; the fulfilment latency is a ``prometheus_client``
  histogram fed by ``PurchaseStats.on_fulfilment``.
- The fleet gauges (outstanding credits, accounts in shortfall, today's revenue, upstream cost
  and margin per model, the reconciliation run shown and the last success) come from Postgres
  (``billing.fleet_gauges.read_fleet``), read by a supervised loop every
  ``METRICS_DB_REFRESH_S`` (``fleet_gauges_ctx``) and exported by ``FleetCollector`` from the
  last reading: a scrape never waits on Postgres. Every process exports the same fleet values
  (aggregate with ``max without (instance)``); Postgres down, the gauges keep their last
  values (absent before the first reading).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

from aiohttp import web
from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from billing.finance import NANOUSD_PER_USD
from billing.fleet_gauges import FleetReading, read_fleet
from billing.purchases.money_events import REVERSAL_KINDS, PurchaseStats
from billing.purchases.stripe_events import WebhookStats
from billing.reconciliation import CHECKS
from billing.units import MILLICREDITS_PER_USD
from runtime import appkeys
from runtime.supervision import cancel_and_wait, periodically, supervise

#: Seconds from a Checkout Session's creation to its fulfilment: a user pays in seconds to
#: minutes; asynchronous payment methods (bank debits) take days.
FULFILMENT_LATENCY_BUCKETS_S = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400, 259200)
#: The failure reasons of the webhook (``admin_api.stripe_webhook``), exported from 0.
WEBHOOK_FAILURE_REASONS = ("unconfigured", "signature", "unavailable", "error")


class WebhookCollector(Collector):
    """``WebhookStats`` and ``PurchaseStats`` as Prometheus counters, read at scrape time."""

    def __init__(self, stats: WebhookStats, purchases: PurchaseStats) -> None:
        self._stats = stats
        self._purchases = purchases

    def collect(self) -> Iterator[Metric]:
        """The webhook's counters now."""
        stats = self._stats
        events = CounterMetricFamily(
            "creditgate_stripe_webhook_events",
            "Stripe webhook deliveries processed, by event type (other: a type not handled) "
            "and outcome (processed, ignored, unhandled, rejected, duplicate).",
            labels=["type", "outcome"],
        )
        for (event_type, outcome), count in sorted(stats.events.items()):
            events.add_metric([event_type, outcome], count)
        yield events
        yield _labelled(
            "creditgate_stripe_webhook_failures",
            "Stripe webhook deliveries answered with an error, by reason.",
            "reason",
            {reason: stats.failures[reason] for reason in WEBHOOK_FAILURE_REASONS}
            | dict(stats.failures),
        )
        yield _labelled(
            "creditgate_purchases",
            "Purchases fulfilled (by the webhook or the success return, whichever came "
            "first), by package code.",
            "package",
            self._purchases.purchases,
        )
        yield _labelled(
            "creditgate_purchased_millicredits",
            "Millicredits granted by the purchases fulfilled, by package code.",
            "package",
            self._purchases.purchased_millicredits,
        )
        yield _labelled(
            "creditgate_reversed_millicredits",
            "Millicredits taken back by refunds and disputes, by kind (restorations not "
            "subtracted).",
            "kind",
            {kind: stats.reversed_millicredits[kind] for kind in REVERSAL_KINDS},
        )


def _labelled(
    name: str, documentation: str, label: str, values: dict[str, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(values.items()):
        family.add_metric([value], count)
    return family


class FleetGauges(Collector):
    """The fleet gauges from the last ``read_fleet`` (none before the first)."""

    def __init__(self) -> None:
        self.reading: FleetReading | None = None

    async def refresh(self, app: web.Application) -> None:
        """Read the fleet now (Postgres unreachable: raises; the last reading stays)."""
        self.reading = await read_fleet(app[appkeys.DB_POOL])

    def collect(self) -> Iterator[Metric]:
        """The last reading's gauges."""
        reading = self.reading
        if reading is None:
            return
        yield GaugeMetricFamily(
            "creditgate_outstanding_millicredits",
            "Credits sold and not yet used (sum of account balances), in millicredits.",
            value=reading.outstanding_millicredits,
        )
        yield GaugeMetricFamily(
            "creditgate_outstanding_liability_usd",
            "The outstanding credits in USD (1,000 credits = $1).",
            value=reading.outstanding_millicredits / MILLICREDITS_PER_USD,
        )
        yield GaugeMetricFamily(
            "creditgate_accounts_in_shortfall",
            "Accounts owing reversed credits they had spent (paid use stopped).",
            value=reading.accounts_in_shortfall,
        )
        yield from _daily_gauges(reading)
        yield from _reconciliation_gauges(reading)


def _daily_gauges(reading: FleetReading) -> Iterator[Metric]:
    revenue, cost, margin = (
        GaugeMetricFamily(f"creditgate_daily_{name}_usd", doc, labels=["model"])
        for name, doc in (
            ("revenue", "Today's (UTC) usage charges, in USD, by model."),
            ("upstream_cost", "Today's (UTC) upstream cost by the rate card, in USD, by model."),
            ("gross_margin", "Today's (UTC) revenue minus upstream cost, in USD, by model."),
        )
    )
    for row in reading.models:
        revenue.add_metric([row.model], row.revenue_nanousd / NANOUSD_PER_USD)
        cost.add_metric([row.model], row.upstream_cost_nanousd / NANOUSD_PER_USD)
        margin.add_metric([row.model], row.gross_margin_nanousd / NANOUSD_PER_USD)
    yield from (revenue, cost, margin)


def _reconciliation_gauges(reading: FleetReading) -> Iterator[Metric]:
    run = reading.reconciliation
    if run is None:
        return
    runs = CounterMetricFamily(
        "creditgate_reconciliation_runs",
        "Reconciliation runs recorded in reconciliation_runs (fleet-wide), by outcome.",
        labels=["outcome"],
    )
    for outcome, count in sorted(run.runs_by_outcome.items()):
        runs.add_metric([outcome], count)
    yield runs
    if run.last_success_at is not None:
        yield GaugeMetricFamily(
            "creditgate_reconciliation_last_success_timestamp_seconds",
            "When the newest complete run without a mismatch finished (Unix time).",
            value=run.last_success_at.timestamp(),
        )
    shown = run.shown
    if shown is None:
        return
    mismatches = GaugeMetricFamily(
        "creditgate_reconciliation_mismatches",
        "The shown run's mismatches, by check (the newest complete run, or a newer one that "
        "found mismatches).",
        labels=["check"],
    )
    for check in CHECKS:
        mismatches.add_metric([check], shown.mismatch_counts.get(check, 0))
    yield mismatches
    yield GaugeMetricFamily(
        "creditgate_reconciliation_mismatched_millicredits",
        "The shown run's |expected - actual| summed over its balance, per-day deduction and "
        "Redis balance mismatches.",
        value=shown.mismatched_millicredits,
    )
    yield GaugeMetricFamily(
        "creditgate_reconciliation_daily_deductions_millicredits",
        "The deductions of an average day the shown run checked (its deductions / its days).",
        value=shown.daily_deductions_millicredits,
    )
    yield GaugeMetricFamily(
        "creditgate_reconciliation_last_run_timestamp_seconds",
        "When the shown reconciliation run finished (Unix time).",
        value=shown.finished_at.timestamp(),
    )


FLEET_GAUGES = web.AppKey("fleet_gauges", FleetGauges)


def install_webhook_metrics(app: web.Application) -> None:
    """Register the webhook's counters (``appkeys.STRIPE_WEBHOOK_STATS``), the process's
    purchases (``appkeys.PURCHASE_STATS``; both set before) and the fulfilment latency
    histogram on the app's registry: the only registry that exports the purchases."""
    registry = app[appkeys.METRICS]
    purchases = app[appkeys.PURCHASE_STATS]
    registry.register(WebhookCollector(app[appkeys.STRIPE_WEBHOOK_STATS], purchases))
    purchases.on_fulfilment = Histogram(
        "creditgate_stripe_fulfilment_latency_seconds",
        "Seconds from a Checkout Session's creation to its purchase's fulfilment (by the "
        "webhook or the success return).",
        buckets=FULFILMENT_LATENCY_BUCKETS_S,
        registry=registry,
    ).observe


def install_fleet_gauges(app: web.Application) -> None:
    """Register the fleet gauges and their refresh loop (``cleanup_ctx``, after the
    app's Postgres context)."""
    gauges = FleetGauges()
    app[FLEET_GAUGES] = gauges
    app[appkeys.METRICS].register(gauges)
    app.cleanup_ctx.append(fleet_gauges_ctx)


async def fleet_gauges_ctx(app: web.Application) -> AsyncIterator[None]:
    """Read the fleet gauges at start and every ``METRICS_DB_REFRESH_S``, supervised (a
    failed read is logged and retried with backoff; the gauges keep their last values)."""
    gauges = app[FLEET_GAUGES]
    interval_s = app[appkeys.SETTINGS].metrics_db_refresh_s

    async def run() -> None:
        await gauges.refresh(app)
        await periodically(interval_s, lambda: gauges.refresh(app))

    task = asyncio.create_task(
        supervise("fleet-gauges", run, restarts=app[appkeys.TASK_RESTARTS]), name="fleet-gauges"
    )
    yield
    await cancel_and_wait(task)
