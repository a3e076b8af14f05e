"""The gateway's traffic and money metrics: recorded once per billed request where it ends
(``gateway.proxy.handle_billed``), and at its settlement.

``TrafficMetrics`` holds every per-request metric of the gateway as plain integers and floats
in dicts keyed by label values, and exports them when Prometheus scrapes (a ``Collector`` on
the app's registry, ``runtime.appkeys.METRICS``), as ``runtime.metrics`` does for the process
counters: recording costs the hot path a dict lookup and a few additions, no lock (the event
loop's thread writes them and the scrape reads them on that same thread). prometheus_client's
own ``Counter``/``Histogram`` take a lock per ``inc`` and per bucket; with a dozen of them per
request they cost several times more.

Label values are bounded: ``model`` is a model that has a rate card (``other`` when the
request named none, or none we price); ``endpoint`` is one of ``gateway.proxy.ENDPOINTS``;
``status`` is an HTTP status code; ``reason`` is an error code of a 402 answer.

The checkout route's answers (``creditgate_checkout_requests_total{status}``, for the purchase
availability SLO) are counted here too (``count_checkout``).

Counters are per process: several gateway processes are several scrape targets and PromQL
sums them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from billing.metering.pricing import RateCard
from billing.metering.rate_cards import UNRATED_MODEL_LABEL

if TYPE_CHECKING:
    from gateway.usage import Usage

#: The model label of a request that named no model we price.
OTHER_MODEL = UNRATED_MODEL_LABEL

#: Seconds; a streamed answer can last minutes, so the buckets go past the default 10 s.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# Token counts are per 1,000 at micro-USD rates: tokens x rate is in 1e-9 USD.
_NANO_USD_PER_USD = 1_000_000_000

# The per-model money counters, by index in ``TrafficMetrics._money[model]``.
_INPUT, _CACHED_INPUT, _OUTPUT, _DEDUCTED, _COST_NANO_USD = range(5)
_TOKEN_TYPES = (("input", _INPUT), ("cached_input", _CACHED_INPUT), ("output", _OUTPUT))


class LatencyHistogram:
    """One histogram's counts: observations per bucket (not cumulative; the last one is
    ``+Inf``) and their sum, in seconds."""

    __slots__ = ("counts", "sum_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation (a bucket holds the values up to and including its bound,
        Prometheus's ``le``)."""
        self.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs as Prometheus exports them."""
        total = 0
        out = []
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(total)))
        return out


class TrafficMetrics(Collector):
    """Every per-request metric of one gateway app (see the module docstring); registered
    on ``registry`` at construction.

    Attributes:
        holds_open: holds this process placed and has not settled or voided yet.
        held_millicredits: the sum of those holds.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.holds_open = 0
        self.held_millicredits = 0
        self._requests: dict[tuple[str, str, int], int] = {}
        # endpoint -> (request duration, time to first byte, upstream duration)
        self._latency: dict[str, tuple[LatencyHistogram, LatencyHistogram, LatencyHistogram]]
        self._latency = {}
        self._money: dict[str, list[int]] = {}
        self._payment_required: dict[str, int] = {}
        self._checkout: dict[int, int] = {}
        registry.register(self)

    # -- per request ----------------------------------------------------------------------

    def count_request(self, endpoint: str, model: str, status: int) -> None:
        """One answer of a billed route (``model``: one with a rate card, or ``other``)."""
        key = (endpoint, model, status)
        self._requests[key] = self._requests.get(key, 0) + 1

    def observe_latency(
        self, endpoint: str, *, total_s: float, first_byte_s: float, upstream_s: float | None
    ) -> None:
        """The latencies of one answered request, in seconds (``upstream_s`` None: the
        upstream was never asked)."""
        histograms = self._latency.get(endpoint)
        if histograms is None:
            histograms = self._latency[endpoint] = (
                LatencyHistogram(),
                LatencyHistogram(),
                LatencyHistogram(),
            )
        total, first_byte, upstream = histograms
        total.observe(total_s)
        first_byte.observe(first_byte_s)
        if upstream_s is not None:
            upstream.observe(upstream_s)

    def count_payment_required(self, reason: str) -> None:
        """One 402 answer with error code ``reason``."""
        self._payment_required[reason] = self._payment_required.get(reason, 0) + 1

    def count_checkout(self, status: int) -> None:
        """One answer of the checkout route (``POST /api/billing/checkout``), by HTTP status."""
        self._checkout[status] = self._checkout.get(status, 0) + 1

    def count_settlement(self, card: RateCard, usage: Usage, cost_millicredits: int) -> None:
        """A settlement's tokens, charge and upstream cost (``card``: the one it was
        charged at; its ``model`` is the label)."""
        money = self._money.get(card.model)
        if money is None:
            money = self._money[card.model] = [0, 0, 0, 0, 0]
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        money[_INPUT] += usage.prompt_tokens - cached
        money[_CACHED_INPUT] += cached
        money[_OUTPUT] += usage.completion_tokens
        money[_DEDUCTED] += cost_millicredits
        money[_COST_NANO_USD] += upstream_cost_nano_usd(card, usage)

    def hold_placed(self, amount_millicredits: int) -> None:
        """A hold of ``amount_millicredits`` was placed by this process."""
        self.holds_open += 1
        self.held_millicredits += amount_millicredits

    def hold_released(self, amount_millicredits: int) -> None:
        """A hold of this process was settled or voided."""
        self.holds_open -= 1
        self.held_millicredits -= amount_millicredits

    # -- scrape ---------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Every metric with its value now."""
        requests = CounterMetricFamily(
            "creditgate_requests",
            "Answers of billed routes, refusals included, by endpoint, model and HTTP status "
            "(499: the client went away before the answer ended).",
            labels=["endpoint", "model", "status"],
        )
        for (endpoint, model, status), count in self._requests.items():
            requests.add_metric([endpoint, model, str(status)], count)
        yield requests
        yield from self._latency_families()
        yield from self._money_families()
        payment_required = CounterMetricFamily(
            "creditgate_payment_required",
            "402 answers by error code (insufficient_credits, spend_cap_exceeded, ...).",
            labels=["reason"],
        )
        for reason, count in self._payment_required.items():
            payment_required.add_metric([reason], count)
        yield payment_required
        checkout = CounterMetricFamily(
            "creditgate_checkout_requests",
            "Answers of the checkout route (POST /api/billing/checkout) by HTTP status "
            "(5xx: Stripe or Postgres unreachable, Stripe refused, purchases switched off, "
            "an error).",
            labels=["status"],
        )
        for status, count in self._checkout.items():
            checkout.add_metric([str(status)], count)
        yield checkout
        yield GaugeMetricFamily(
            "creditgate_holds_open",
            "Holds this process placed and has not settled or voided yet.",
            value=self.holds_open,
        )
        yield GaugeMetricFamily(
            "creditgate_held_millicredits",
            "Millicredits held by this process's open holds.",
            value=self.held_millicredits,
        )

    def _latency_families(self) -> Iterator[Metric]:
        families = (
            HistogramMetricFamily(
                "creditgate_request_duration_seconds",
                "Billed requests from arrival to the last byte sent (streams included).",
                labels=["endpoint"],
            ),
            HistogramMetricFamily(
                "creditgate_time_to_first_byte_seconds",
                "Billed requests from arrival to the first body byte relayed to the client.",
                labels=["endpoint"],
            ),
            HistogramMetricFamily(
                "creditgate_upstream_duration_seconds",
                "Upstream requests from their start to the end of the upstream's body.",
                labels=["endpoint"],
            ),
        )
        for endpoint, histograms in self._latency.items():
            for family, histogram in zip(families, histograms, strict=True):
                family.add_metric([endpoint], histogram.buckets(), histogram.sum_s)
        yield from families

    def _money_families(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily(
            "creditgate_tokens",
            "Tokens of settled usage by model and type: input (uncached prompt tokens), "
            "cached_input, output; the three add up to the requests' tokens.",
            labels=["model", "type"],
        )
        deducted = CounterMetricFamily(
            "creditgate_deducted_millicredits",
            "Millicredits charged at settlement (exactly the settled charges).",
            labels=["model"],
        )
        upstream_cost = CounterMetricFamily(
            "creditgate_upstream_cost_usd",
            "What the upstream charges for the settled tokens, in USD, at the upstream prices "
            "of the rate card each request was charged at (cached input at the input price).",
            labels=["model"],
        )
        for model, money in self._money.items():
            for token_type, index in _TOKEN_TYPES:
                tokens.add_metric([model, token_type], money[index])
            deducted.add_metric([model], money[_DEDUCTED])
            upstream_cost.add_metric([model], money[_COST_NANO_USD] / _NANO_USD_PER_USD)
        yield from (tokens, deducted, upstream_cost)


def upstream_cost_nano_usd(card: RateCard, usage: Usage) -> int:
    """What the upstream charges for ``usage`` at ``card``'s upstream prices, in 1e-9 USD
    (exact: micro-USD per 1,000 tokens times tokens). Cached prompt tokens are priced at the
    input price; a card without upstream prices costs 0."""
    return (
        usage.prompt_tokens * card.upstream_input_microusd_per_1k_tokens
        + usage.completion_tokens * card.upstream_output_microusd_per_1k_tokens
    )
